//! The management API (TorchServe's port 8081): list, describe, register, scale,
//! set-default and unregister, with TorchServe 0.12's parameters, statuses and messages.

use std::collections::HashMap;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::Router;
use serde_json::{json, Value};

use super::{json_response, AppState};
use crate::error::HttpError;
use torchfn_engine::error::ErrorKind;
use torchfn_engine::manager::{retire, LoadSpec, Manager, RegisterParams};
use torchfn_store::store::{Expect, Location};

pub fn routes() -> Router<AppState> {
    use super::openapi::{respond, MANAGEMENT};
    let not_allowed = || async { HttpError::method_not_allowed() };
    Router::new()
        .route(
            "/",
            axum::routing::options(|| async { respond(MANAGEMENT) }).fallback(not_allowed),
        )
        .route(
            "/api-description",
            axum::routing::any(|| async { respond(MANAGEMENT) }),
        )
        .route("/token", get(super::security::token).fallback(not_allowed))
        .route("/models", get(list).post(register).fallback(not_allowed))
        .route(
            "/models/{name}",
            get(describe_default)
                .put(scale_default)
                .delete(unregister_default)
                .fallback(not_allowed),
        )
        .route(
            "/models/{name}/{version}",
            get(describe_version)
                .put(scale_version)
                .delete(unregister_version)
                .fallback(not_allowed),
        )
        .route(
            "/models/{name}/{version}/set-default",
            put(set_default).fallback(not_allowed),
        )
}

fn status(code: StatusCode, message: String) -> Response {
    json_response(code, &json!({ "status": message }))
}

/// `GET /models?limit=&next_page_token=`: default versions, sorted by name, paginated as
/// TorchServe does (limit 1..=100, default 100; the token is an offset).
async fn list(State(state): State<AppState>, Query(q): Query<HashMap<String, String>>) -> Response {
    let limit = q
        .get("limit")
        .and_then(|v| v.parse::<i64>().ok())
        .filter(|l| (0..=100).contains(l))
        .unwrap_or(100) as usize;
    let offset = q
        .get("next_page_token")
        .and_then(|v| v.parse::<i64>().ok())
        .unwrap_or(0)
        .max(0) as usize;
    let all = state.manager.defaults();
    let page: Vec<Value> = all
        .iter()
        .skip(offset)
        .take(limit)
        .map(|m| json!({"modelName": m.name, "modelUrl": m.url}))
        .collect();
    let mut body = serde_json::Map::new();
    // TorchServe's rule (ApiUtils.getModelList): a token whenever the page's end is within the
    // list, so also for a page that ends exactly at the last model.
    if offset + limit <= all.len() {
        body.insert("nextPageToken".into(), json!((offset + limit).to_string()));
    }
    body.insert("models".into(), Value::Array(page));
    json_response(StatusCode::OK, &Value::Object(body))
}

async fn describe_default(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    describe(&state, &name, None, &q).await
}

async fn describe_version(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    describe(&state, &name, Some(&version), &q).await
}

/// `GET /models/{m}[/{v}|/all]`; with `?customized=true` on one version, the handler's own
/// description (`describe_handle()` of a Python handler, asked of a worker) is added as
/// `customizedMetadata`, as TorchServe does.
async fn describe(
    state: &AppState,
    name: &str,
    version: Option<&str>,
    q: &HashMap<String, String>,
) -> Response {
    let models = match version {
        Some("all") => state.manager.all_versions(name),
        v => state.manager.get(name, v).map(|m| vec![m]),
    };
    let models = match models {
        Ok(models) => models,
        Err(e) => return HttpError::from(e).into_response(),
    };
    let mut described: Vec<Value> = models.iter().map(|m| m.describe()).collect();
    let customized = q
        .get("customized")
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    if customized && version != Some("all") {
        if let (Some(model), Some(entry)) = (models.first(), described.first_mut()) {
            match customized_metadata(model).await {
                Ok(Some(meta)) => {
                    if let Value::Object(fields) = entry {
                        fields.insert("customizedMetadata".into(), meta);
                    }
                }
                Ok(None) => {}
                Err(e) => return e.into_response(),
            }
        }
    }
    json_response(StatusCode::OK, &Value::Array(described))
}

/// A Python handler's `describe_handle()` output, asked of one of its workers with
/// TorchServe's `describe: True` request header; `None` for built-ins (they describe nothing
/// beyond describe's own fields) or a handler that returns nothing.
async fn customized_metadata(
    model: &torchfn_engine::manager::ModelVersion,
) -> Result<Option<Value>, HttpError> {
    let Some(pool) = model.pool() else {
        return Ok(None);
    };
    let request = torchfn_python::Request {
        id: uuid::Uuid::new_v4().to_string(),
        headers: vec![("describe".into(), b"True".to_vec())],
        inputs: vec![torchfn_python::Input {
            name: "body".into(),
            content_type: String::new(),
            value: Vec::new(),
        }],
    };
    let no_worker = || {
        HttpError::new(
            ErrorKind::ServiceUnavailable,
            format!(
                "Model \"{}\" has no worker to serve describe request. Please use scale workers \
                 API to add workers.",
                model.name
            ),
        )
    };
    if pool.workers() == 0 {
        return Err(no_worker());
    }
    let reply = pool.submit(request).map_err(|_| no_worker())?;
    let timeout = model.settings.response_timeout;
    let outcome = tokio::time::timeout(timeout, reply)
        .await
        .map_err(|_| HttpError::internal("the worker did not describe the model in time"))?
        .map_err(|_| HttpError::internal("Worker died."))?;
    let response = outcome
        .result
        .map_err(|f| HttpError::from(torchfn_engine::python::failure(f)))?;
    let text = String::from_utf8_lossy(&response.body);
    Ok(match serde_json::from_str::<Value>(&text) {
        Ok(Value::Null) => None,
        Ok(v) => Some(v),
        // A handler answering plain text is described by that text.
        Err(_) => Some(Value::String(text.into_owned())),
    })
}

/// The parameters of a registration, from the query string or (with
/// `Content-Type: application/json`) a JSON body with the same keys.
fn register_params(
    query: HashMap<String, String>,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<HashMap<String, String>, HttpError> {
    let json_body = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json_body || body.is_empty() {
        return Ok(query);
    }
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        HttpError::new(
            ErrorKind::BadRequest,
            format!("the registration body is not JSON: {e}"),
        )
    })?;
    let Value::Object(map) = value else {
        return Err(HttpError::new(
            ErrorKind::BadRequest,
            "the registration body must be a JSON object",
        ));
    };
    let mut params = query;
    for (k, v) in map {
        let text = match v {
            Value::String(s) => s,
            Value::Null => continue,
            other => other.to_string(),
        };
        params.insert(k, text);
    }
    Ok(params)
}

/// A whole-number parameter; absent, empty or unparsable values fall back to the default
/// (TorchServe's `getIntParameter`), negative ones count as unset.
fn int_param(params: &HashMap<String, String>, key: &str) -> Option<i64> {
    params.get(key).and_then(|v| v.trim().parse::<i64>().ok())
}

fn non_negative(params: &HashMap<String, String>, key: &str) -> Option<u64> {
    int_param(params, key).and_then(|v| u64::try_from(v).ok())
}

/// Where a registration URL points, checked as TorchServe checks it: no `..`, a bare name
/// in the model store, or an absolute path, `file://` or `s3://` URL matching
/// `allowed_urls`.
fn resolve_url(manager: &Manager, url: &str) -> Result<Location, HttpError> {
    let not_found = |message: String| HttpError::new(ErrorKind::ModelNotFound, message);
    if url.is_empty() {
        return Err(not_found("empty url".into()));
    }
    if url.split(['/', '\\']).any(|part| part == "..") {
        return Err(not_found(format!(
            "Relative path is not allowed in url: {url}"
        )));
    }
    let settings = manager.settings();
    let allowed = |as_url: &str| -> Result<(), HttpError> {
        if settings.url_allowed(as_url) {
            Ok(())
        } else {
            Err(not_found(format!(
                "Given URL {url} does not match any allowed URL(s)"
            )))
        }
    };
    if url.starts_with("http://") || url.starts_with("https://") {
        // Downloaded into the model store by `register` (see `download_url`).
        allowed(url)?;
        return Ok(Location::File(PathBuf::from(url)));
    }
    if url.starts_with("s3://") {
        allowed(url)?;
        return url
            .parse::<Location>()
            .map_err(|e| HttpError::new(ErrorKind::BadRequest, e.to_string()));
    }
    if let Some(path) = url.strip_prefix("file://") {
        allowed(url)?;
        return Ok(Location::File(PathBuf::from(path)));
    }
    if FsPath::new(url).is_absolute() {
        allowed(&format!("file://{url}"))?;
        return Ok(Location::File(PathBuf::from(url)));
    }
    if url.contains('/') || url.contains(':') {
        return Err(not_found(format!(
            "Model not found at: {url}: a model store archive is named without folders"
        )));
    }
    let store = settings
        .model_store
        .as_deref()
        .ok_or_else(|| not_found("Model store has not been configured.".into()))?;
    Ok(store
        .to_string_lossy()
        .parse::<Location>()
        .map_err(|e| not_found(e.to_string()))?
        .join(url))
}

/// An `http(s)://` registration: the archive is downloaded into the (local) model store
/// under the URL's file name, as TorchServe does, and registered from there.
async fn download_url(manager: &Arc<Manager>, url: &str) -> Result<PathBuf, HttpError> {
    let settings = manager.settings();
    let store = settings.model_store.clone().ok_or_else(|| {
        HttpError::new(
            ErrorKind::ModelNotFound,
            "Model store has not been configured.",
        )
    })?;
    if store.to_string_lossy().starts_with("s3://") {
        return Err(HttpError::new(
            ErrorKind::DownloadArchive,
            format!(
                "Failed to download archive from: {url}: registering an http(s) URL downloads \
                 into the model store, which must be a local folder (this one is {})",
                store.display()
            ),
        ));
    }
    let checker = manager.clone();
    let allowed: Arc<dyn Fn(&str) -> bool + Send + Sync> =
        Arc::new(move |u: &str| checker.settings().url_allowed(u));
    let max = settings.archive_limits.max_unpacked_bytes;
    crate::fetch::download(url, &store, allowed, max)
        .await
        .map_err(|e| match e {
            crate::fetch::FetchError::Exists(_) => HttpError::internal(e.to_string()),
            e => HttpError::new(
                ErrorKind::DownloadArchive,
                format!("Failed to download archive from: {url}: {e}"),
            ),
        })
}

/// Removes an archive a URL registration downloaded into the model store.
fn remove_download(path: &FsPath) {
    match std::fs::remove_file(path) {
        Ok(()) => {
            tracing::info!(file = %path.display(), "downloaded archive removed from the model store")
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "could not remove a downloaded archive")
        }
    }
}

/// `POST /models?url=…`: loads an archive as a new model version.
async fn register(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, HttpError> {
    let params = register_params(query, &headers, &body)?;
    let url = params
        .get("url")
        .cloned()
        .ok_or_else(|| HttpError::new(ErrorKind::BadRequest, "Parameter url is required."))?;
    if let Some(runtime) = params.get("runtime").filter(|r| !r.is_empty()) {
        if !["python", "python3", "LSP"].contains(&runtime.as_str()) {
            return Err(HttpError::new(
                ErrorKind::BadRequest,
                format!("Invalid RuntimeType value: {runtime}"),
            ));
        }
    }
    let mut source = resolve_url(&state.manager, &url)?;
    // The file an http(s) registration downloaded: removed again when the registration fails
    // and when the model is unregistered, as TorchServe does (so the same URL can be
    // registered again).
    let mut downloaded = None;
    if url.starts_with("http://") || url.starts_with("https://") {
        let path = download_url(&state.manager, &url).await?;
        downloaded = Some(path.clone());
        source = Location::File(path);
    }
    let synchronous = params
        .get("synchronous")
        .is_none_or(|v| v.eq_ignore_ascii_case("true"));
    let spec = LoadSpec {
        url: url.clone(),
        source,
        expect: Expect::default(),
        name: params
            .get("model_name")
            .filter(|n| !n.trim().is_empty())
            .cloned(),
        loaded_at_startup: false,
        params: RegisterParams {
            batch_size: non_negative(&params, "batch_size")
                .filter(|&b| b > 0)
                .map(|b| b as usize),
            max_batch_delay_ms: non_negative(&params, "max_batch_delay"),
            initial_workers: non_negative(&params, "initial_workers").map(|w| w as usize),
            response_timeout_s: non_negative(&params, "response_timeout").filter(|&t| t > 0),
            startup_timeout_s: non_negative(&params, "startup_timeout"),
            handler: params
                .get("handler")
                .filter(|h| !h.trim().is_empty())
                .cloned(),
            from_rest: true,
        },
    };
    // With no workers to start (TorchServe's default for a registration), there is nothing
    // to do in the background: the registration answers 200 once the archive is in.
    let no_workers = spec.params.initial_workers.unwrap_or_else(|| {
        state
            .manager
            .settings()
            .default_workers_per_model
            .unwrap_or(0)
    }) == 0;
    let synchronous = synchronous || no_workers;
    let manager = state.manager.clone();
    let load = move || {
        let loaded = manager.load(&spec);
        if let (Err(_), Some(path)) = (&loaded, &downloaded) {
            remove_download(path);
        }
        loaded
    };
    if !synchronous {
        // TorchServe answers at once and loads in the background.
        tokio::task::spawn_blocking(move || {
            if let Err(e) = load() {
                tracing::error!(url = %url, error = %e.message, "asynchronous registration failed");
            }
        });
        return Ok(status(
            StatusCode::ACCEPTED,
            "Processing worker updates...".into(),
        ));
    }
    let model = tokio::task::spawn_blocking(load)
        .await
        .map_err(|e| HttpError::internal(format!("registration stopped: {e}")))??;
    let workers = model.workers();
    let (min, _) = model.worker_range();
    if workers < min {
        // Some workers started, not all: TorchServe's partial answer (the model stays).
        return Ok(status(
            StatusCode::PARTIAL_CONTENT,
            "Workers scaling in progress...".into(),
        ));
    }
    let message = if workers == 0 {
        format!(
            "Model \"{}\" Version: {} registered with 0 initial workers. Use scale workers API \
             to add workers for the model.",
            model.name, model.version
        )
    } else {
        format!(
            "Model \"{}\" Version: {} registered with {workers} initial workers",
            model.name, model.version
        )
    };
    Ok(status(StatusCode::OK, message))
}

async fn scale_default(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, HttpError> {
    let version = q.get("model_version").cloned();
    scale(&state.manager, &name, version.as_deref(), &q).await
}

async fn scale_version(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, HttpError> {
    scale(&state.manager, &name, Some(&version), &q).await
}

/// `PUT /models/{m}[/{v}]?min_worker=&max_worker=&synchronous=`: runs `min_worker` workers
/// (TorchServe does not autoscale between min and max).
async fn scale(
    manager: &Arc<Manager>,
    name: &str,
    version: Option<&str>,
    q: &HashMap<String, String>,
) -> Result<Response, HttpError> {
    let min = int_param(q, "min_worker").unwrap_or(1);
    let max = int_param(q, "max_worker").unwrap_or(min);
    if min < 0 || max < 0 {
        return Err(HttpError::new(
            ErrorKind::BadRequest,
            "min_worker and max_worker cannot be negative.",
        ));
    }
    if max < min {
        return Err(HttpError::new(
            ErrorKind::BadRequest,
            "max_worker cannot be less than min_worker.",
        ));
    }
    // Unknown model or version: 404 before anything changes.
    manager.get(name, version)?;
    let synchronous = q
        .get("synchronous")
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let (min, max) = (min as usize, max as usize);
    let (m, n, v) = (manager.clone(), name.to_string(), version.map(String::from));
    let job = tokio::task::spawn_blocking(move || m.scale(&n, v.as_deref(), min, max));
    if !synchronous {
        tokio::spawn(async move {
            if let Ok(Err(e)) = job.await {
                tracing::error!(error = %e.message, "asynchronous scaling failed");
            }
        });
        return Ok(status(
            StatusCode::ACCEPTED,
            "Processing worker updates...".into(),
        ));
    }
    let model = job
        .await
        .map_err(|e| HttpError::internal(format!("scaling stopped: {e}")))??;
    if model.workers() < min {
        // Some of the missing workers started, not all: TorchServe's partial answer.
        return Ok(status(
            StatusCode::PARTIAL_CONTENT,
            "Workers scaling in progress...".into(),
        ));
    }
    let mut message = format!("Workers scaled to {min} for model: {name}");
    if let Some(v) = version {
        message.push_str(&format!(", version: {v}"));
    }
    Ok(status(StatusCode::OK, message))
}

/// `PUT /models/{m}/{v}/set-default`.
async fn set_default(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Response, HttpError> {
    state.manager.set_default(&name, &version)?;
    Ok(status(
        StatusCode::OK,
        format!("Default version successfully updated for model \"{name}\" to \"{version}\""),
    ))
}

async fn unregister_default(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, HttpError> {
    let version = state.manager.get(&name, None)?.version.clone();
    unregister(&state, &name, &version)
}

async fn unregister_version(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Response, HttpError> {
    unregister(&state, &name, &version)
}

/// `DELETE /models/{m}[/{v}]`: new requests get 404 at once; requests already holding the
/// version finish, then its workers stop and its memory is released.
fn unregister(state: &AppState, name: &str, version: &str) -> Result<Response, HttpError> {
    let model = state.manager.unload(name, version)?;
    tracing::info!(model = name, version, "unregistered");
    // An archive that registering its http(s) URL downloaded into the model store goes with
    // it, unless another registered version was loaded from the same URL.
    if model.url.starts_with("http://") || model.url.starts_with("https://") {
        let shared = state
            .manager
            .defaults()
            .iter()
            .flat_map(|m| state.manager.all_versions(&m.name).unwrap_or_default())
            .any(|m| m.url == model.url);
        let store = state.manager.settings().model_store.clone();
        if let (false, Some(store), Some(file)) =
            (shared, store, crate::fetch::file_name(&model.url))
        {
            remove_download(&store.join(file));
        }
    }
    retire(model);
    Ok(status(
        StatusCode::OK,
        format!("Model \"{name}\" unregistered"),
    ))
}
