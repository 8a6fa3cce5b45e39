//! Who may change the loaded models. The rule follows where the management listener is
//! bound, not who connects (a proxy or a container network makes every caller look local):
//!
//! - bound to loopback (the default): the model API (register, unregister, scale,
//!   set-default) is on and needs no token, so TorchServe's documented commands work as
//!   written on the same machine;
//! - bound to any other address: those calls need `Authorization: Bearer <management key>`
//!   from the `key_file.json` written at start-up (TorchServe 0.12's token authorization),
//!   unless `disable_token_authorization=true` / `--disable-token-auth` says otherwise.
//!
//! `enable_model_api=false` turns registering and unregistering off altogether (405, as
//! TorchServe). Reads (list, describe), `/ping`, predictions and `/metrics` never need a
//! token.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::error::HttpError;
use torchfn_archive::settings::Settings;
use torchfn_engine::error::ErrorKind;

/// The keys of a server, as TorchServe's `key_file.json` holds them.
#[derive(Debug, Clone)]
struct Keys {
    management: (String, SystemTime),
    inference: (String, SystemTime),
    api: String,
}

/// What the management API lets callers do.
#[derive(Debug)]
pub struct Access {
    /// Register and unregister are served (else 405).
    pub model_api: bool,
    /// When set, calls that change models need the management key.
    keys: Option<std::sync::Mutex<Keys>>,
    /// How long a key is valid.
    ttl: Duration,
    /// Where the keys were written, rewritten when one is rotated.
    key_file: std::sync::Mutex<Option<PathBuf>>,
}

impl Default for Access {
    /// Open: what a server whose management API only the local machine can reach gets.
    fn default() -> Self {
        Access {
            model_api: true,
            keys: None,
            ttl: Duration::from_secs(3600),
            key_file: std::sync::Mutex::new(None),
        }
    }
}

/// Six random bytes as eight URL-safe base64 characters, as TorchServe's keys are.
fn new_key() -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bytes = uuid::Uuid::new_v4().into_bytes();
    let n = bytes[..6]
        .iter()
        .fold(0u64, |n, b| (n << 8) | u64::from(*b));
    (0..8)
        .map(|i| A[((n >> (42 - 6 * i)) & 63) as usize] as char)
        .collect()
}

impl Access {
    /// The access `settings` call for (see the module comment).
    pub fn decide(settings: &Settings) -> Access {
        let exposed = !settings.management_address.ip().is_loopback();
        let ttl = Duration::from_secs(settings.token_expiration_min.saturating_mul(60));
        let expires = SystemTime::now() + ttl;
        let keys = (exposed && !settings.disable_token_authorization).then(|| {
            std::sync::Mutex::new(Keys {
                management: (new_key(), expires),
                inference: (new_key(), expires),
                api: new_key(),
            })
        });
        Access {
            model_api: settings.enable_model_api.unwrap_or(true),
            keys,
            ttl,
            key_file: std::sync::Mutex::new(None),
        }
    }

    /// The same access with the model API on or off.
    pub fn model_api(mut self, on: bool) -> Self {
        self.model_api = on;
        self
    }

    /// Whether changing models needs a key.
    pub fn requires_token(&self) -> bool {
        self.keys.is_some()
    }

    fn keys(&self) -> Option<Keys> {
        self.keys
            .as_ref()
            .map(|k| k.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// Writes `key_file.json` into `dir` (mode 0600) when there are keys; returns its path.
    pub fn write_key_file(&self, dir: &Path) -> std::io::Result<Option<PathBuf>> {
        if self.keys.is_none() {
            return Ok(None);
        }
        let path = dir.join("key_file.json");
        self.write_keys(&path)?;
        *self.key_file.lock().unwrap_or_else(|e| e.into_inner()) = Some(path.clone());
        Ok(Some(path))
    }

    fn write_keys(&self, path: &Path) -> std::io::Result<()> {
        let Some(keys) = self.keys() else {
            return Ok(());
        };
        let body = serde_json::json!({
            "management": {"key": keys.management.0,
                           "expiration time": torchfn_engine::manager::format_time(keys.management.1)},
            "inference": {"key": keys.inference.0,
                          "expiration time": torchfn_engine::manager::format_time(keys.inference.1)},
            "API": {"key": keys.api},
        });
        let _ = std::fs::remove_file(path);
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(path)?;
        std::io::Write::write_all(&mut file, serde_json::to_vec_pretty(&body)?.as_slice())?;
        Ok(())
    }

    /// `GET /token?type=management|inference`, authorised with the `API` key: a new key of
    /// that type, valid for `token_expiration_min` again, written to `key_file.json` too.
    pub fn rotate(
        &self,
        req: &Request,
        kind: Option<&str>,
    ) -> Result<serde_json::Value, HttpError> {
        let Some(lock) = &self.keys else {
            return Err(HttpError::new(
                ErrorKind::BadRequest,
                "token authorization is off on this server: there are no keys to rotate",
            ));
        };
        let api = lock.lock().unwrap_or_else(|e| e.into_inner()).api.clone();
        if !bearer_matches(req, &api) {
            return Err(invalid_key("API"));
        }
        let key = new_key();
        let expires = SystemTime::now() + self.ttl;
        {
            let mut keys = lock.lock().unwrap_or_else(|e| e.into_inner());
            match kind {
                Some("management") => keys.management = (key.clone(), expires),
                Some("inference") => keys.inference = (key.clone(), expires),
                other => {
                    return Err(HttpError::new(
                        ErrorKind::BadRequest,
                        format!(
                            "type must be management or inference, not {}",
                            other.unwrap_or("(missing)")
                        ),
                    ))
                }
            }
        }
        let path = self
            .key_file
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(path) = path {
            self.write_keys(&path).map_err(|e| {
                HttpError::internal(format!("could not rewrite key_file.json: {e}"))
            })?;
        }
        let kind = kind.unwrap_or_default();
        Ok(serde_json::json!({
            kind: {"key": key, "expiration time": torchfn_engine::manager::format_time(expires)}
        }))
    }

    /// Whether a request may change models: its `Authorization: Bearer` key, when keys are
    /// required.
    fn authorize(&self, req: &Request) -> Result<(), HttpError> {
        let Some(keys) = self.keys() else {
            return Ok(());
        };
        let (key, expires) = keys.management;
        // Both are checked whatever the other says (`&`, not `&&`).
        if bearer_matches(req, &key) & (SystemTime::now() < expires) {
            return Ok(());
        }
        Err(invalid_key("management"))
    }
}

/// The key of `Authorization: Bearer <key>`.
fn bearer(req: &Request) -> Option<&str> {
    req.headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer"))
        .filter(|rest| rest.starts_with(char::is_whitespace))
        .map(str::trim)
        .filter(|k| !k.is_empty())
}

/// Whether the request's `Authorization: Bearer` key is `key`, compared in constant time
/// (how long the comparison takes says nothing about how much of a guess was right). Slices of
/// unequal length compare false at once, which tells only the length, and every key torchfn
/// makes has eight characters.
fn bearer_matches(req: &Request, key: &str) -> bool {
    use subtle::ConstantTimeEq;
    let sent = bearer(req).unwrap_or("");
    !key.is_empty() && bool::from(sent.as_bytes().ct_eq(key.as_bytes()))
}

fn invalid_key(which: &str) -> HttpError {
    HttpError::new(
        ErrorKind::InvalidKey,
        format!(
            "Token Authorization failed. Token either incorrect, expired, or not provided \
             correctly (the management API is reachable from the network: send \
             `Authorization: Bearer <{which} key>` from key_file.json)"
        ),
    )
}

/// `GET /token?type=management|inference`: rotates a key (authorised with the `API` key).
pub async fn token(State(state): State<AppState>, req: Request) -> Response {
    let kind = req
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .find_map(|p| p.strip_prefix("type="))
        .map(str::to_string);
    match state.access.rotate(&req, kind.as_deref()) {
        Ok(body) => super::json_response(axum::http::StatusCode::OK, &body),
        Err(e) => e.into_response(),
    }
}

/// The management port's guard: register and unregister only with the model API on; every
/// call that changes models with the key when one is required.
pub async fn guard(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let changes = matches!(method, Method::POST | Method::PUT | Method::DELETE);
    if changes {
        let path = req.uri().path();
        let registers = (method == Method::POST && path == "/models")
            || (method == Method::DELETE && path.starts_with("/models/"));
        if registers && !state.access.model_api {
            return HttpError::method_not_allowed().into_response();
        }
        if let Err(e) = state.access.authorize(&req) {
            return e.into_response();
        }
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_eight_url_safe_characters() {
        let k = new_key();
        assert_eq!(k.len(), 8);
        assert!(k
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        assert_ne!(k, new_key());
    }

    #[test]
    fn the_binding_decides() {
        let mut s = Settings::default();
        assert!(
            !Access::decide(&s).requires_token(),
            "loopback needs no token"
        );
        s.management_address = "0.0.0.0:8081".parse().unwrap_or(s.management_address);
        assert!(Access::decide(&s).requires_token(), "exposed needs a token");
        s.disable_token_authorization = true;
        assert!(!Access::decide(&s).requires_token());
        s.enable_model_api = Some(false);
        assert!(!Access::decide(&s).model_api);
    }

    #[test]
    fn only_the_whole_key_matches() {
        let with = |auth: Option<&str>| {
            let mut req = Request::new(axum::body::Body::empty());
            if let Some(auth) = auth {
                if let Ok(v) = axum::http::HeaderValue::from_str(auth) {
                    req.headers_mut()
                        .insert(axum::http::header::AUTHORIZATION, v);
                }
            }
            req
        };
        assert!(bearer_matches(&with(Some("Bearer abcd-_12")), "abcd-_12"));
        assert!(bearer_matches(&with(Some("Bearer  abcd-_12 ")), "abcd-_12"));
        assert!(!bearer_matches(&with(Some("Bearer abcd-_13")), "abcd-_12"));
        assert!(!bearer_matches(&with(Some("Bearer abcd")), "abcd-_12"));
        assert!(!bearer_matches(&with(Some("Bearer abcd-_123")), "abcd-_12"));
        assert!(!bearer_matches(&with(Some("abcd-_12")), "abcd-_12"));
        assert!(!bearer_matches(&with(None), "abcd-_12"));
        assert!(!bearer_matches(&with(None), ""));
    }
}
