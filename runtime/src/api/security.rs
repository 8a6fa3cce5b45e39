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
use crate::error::{ApiError, ErrorKind};
use crate::settings::Settings;

/// The keys of one start-up, as TorchServe's `key_file.json` holds them.
#[derive(Debug, Clone)]
pub struct Keys {
    pub management: String,
    pub inference: String,
    pub api: String,
    pub expires: SystemTime,
}

/// What the management API lets callers do.
#[derive(Debug, Clone)]
pub struct Access {
    /// Register and unregister are served (else 405).
    pub model_api: bool,
    /// When set, calls that change models need the management key.
    pub keys: Option<Keys>,
}

impl Default for Access {
    /// Open: what a server whose management API only the local machine can reach gets.
    fn default() -> Self {
        Access {
            model_api: true,
            keys: None,
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
        let keys = (exposed && !settings.disable_token_authorization).then(|| Keys {
            management: new_key(),
            inference: new_key(),
            api: new_key(),
            expires: SystemTime::now()
                + Duration::from_secs(settings.token_expiration_min.saturating_mul(60)),
        });
        Access {
            model_api: settings.enable_model_api.unwrap_or(true),
            keys,
        }
    }

    /// Writes `key_file.json` into `dir` (mode 0600) when there are keys; returns its path.
    pub fn write_key_file(&self, dir: &Path) -> std::io::Result<Option<PathBuf>> {
        let Some(keys) = &self.keys else {
            return Ok(None);
        };
        let expires = crate::manager::format_time(keys.expires);
        let body = serde_json::json!({
            "management": {"key": keys.management, "expiration time": expires},
            "inference": {"key": keys.inference, "expiration time": expires},
            "API": {"key": keys.api},
        });
        let path = dir.join("key_file.json");
        let _ = std::fs::remove_file(&path);
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&path)?;
        std::io::Write::write_all(&mut file, serde_json::to_vec_pretty(&body)?.as_slice())?;
        Ok(Some(path))
    }

    /// Whether a request may change models: its `Authorization: Bearer` key, when keys are
    /// required.
    fn authorize(&self, req: &Request) -> Result<(), ApiError> {
        let Some(keys) = &self.keys else {
            return Ok(());
        };
        let given = req
            .headers()
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer"))
            .filter(|rest| rest.starts_with(char::is_whitespace))
            .map(str::trim);
        let fresh = SystemTime::now() < keys.expires;
        if fresh && given.is_some_and(|k| !k.is_empty() && k == keys.management) {
            return Ok(());
        }
        Err(ApiError::new(
            ErrorKind::InvalidKey,
            "Token Authorization failed. Token either incorrect, expired, or not provided \
             correctly (the management API is reachable from the network: send \
             `Authorization: Bearer <management key>` from key_file.json)",
        ))
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
            return ApiError::method_not_allowed().into_response();
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
        assert!(Access::decide(&s).keys.is_none(), "loopback needs no token");
        s.management_address = "0.0.0.0:8081".parse().unwrap_or(s.management_address);
        assert!(Access::decide(&s).keys.is_some(), "exposed needs a token");
        s.disable_token_authorization = true;
        assert!(Access::decide(&s).keys.is_none());
        s.enable_model_api = Some(false);
        assert!(!Access::decide(&s).model_api);
    }
}
