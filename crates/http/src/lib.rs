//! The REST API, as three axum routers (inference, management, metrics) over one shared
//! state. The emulator serves them on three listeners; functions and tests mount the same
//! routers, so every front end speaks the same dialect.

pub mod error;
pub mod fetch;
pub mod inference;
pub mod management;
pub mod metrics;
pub mod openapi;
pub mod security;
pub mod serve;
pub mod timing;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderName, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::Router;
use http_body_util::BodyExt;

use crate::error::HttpError;
use torchfn_engine::error::ErrorKind;
use torchfn_engine::manager::Manager;
use torchfn_engine::metrics::Metrics;

/// What every route shares.
#[derive(Clone)]
pub struct AppState {
    pub manager: Arc<Manager>,
    pub metrics: Arc<Metrics>,
    /// Set once the models named at start-up have been loaded (`/ping` turns Healthy).
    pub ready: Arc<AtomicBool>,
    /// Models named at start-up that failed to load (`/ping` stays Unhealthy).
    pub startup_failures: Arc<std::sync::atomic::AtomicUsize>,
    /// Who may change the loaded models (open unless set with `with_access`).
    pub access: Arc<security::Access>,
}

impl AppState {
    pub fn new(manager: Arc<Manager>) -> Self {
        Self {
            metrics: manager.metrics().clone(),
            manager,
            ready: Arc::new(AtomicBool::new(false)),
            startup_failures: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            access: Arc::new(security::Access::default()),
        }
    }

    /// The same state with `access` deciding who may change models.
    pub fn with_access(mut self, access: security::Access) -> Self {
        self.access = Arc::new(access);
        self
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Counts a model named at start-up that failed to load: the server is then not healthy,
    /// so a readiness probe keeps traffic away.
    pub fn record_startup_failure(&self) {
        self.startup_failures.fetch_add(1, Ordering::AcqRel);
    }

    /// `/ping`: the start-up models were all loaded, and every model's default version has
    /// the workers its minimum asks for.
    pub fn is_healthy(&self) -> bool {
        self.is_ready()
            && self.startup_failures.load(Ordering::Acquire) == 0
            && self.manager.defaults().iter().all(|m| m.is_healthy())
    }
}

/// The request id of the request being served, put in its extensions by the middleware.
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static SERVER_TIMING: HeaderName = HeaderName::from_static("server-timing");

/// Common to all three ports: a fresh `x-request-id` per request (in a tracing span, the
/// request's extensions and the response), TorchServe's no-cache headers, and the
/// Requests2XX/4XX/5XX counters.
async fn common_layer(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let entered = std::time::Instant::now();
    let id = uuid::Uuid::new_v4().to_string();
    req.extensions_mut().insert(RequestId(id.clone()));
    // A debug-level span: at the default level it is disabled and costs nothing, where an
    // enabled span has its fields formatted for the log on every request (`scripts/bench`'s
    // profile of the seed model at concurrency 16 found that formatting among the top costs).
    let span = tracing::debug_span!(
        "request",
        request_id = %id,
        method = %req.method(),
        path = %req.uri().path(),
    );
    // `parent:` rather than entering the span: nothing at all is done when debug is off.
    tracing::debug!(parent: &span, "received");
    let mut resp = tracing::Instrument::instrument(next.run(req), span.clone()).await;
    let status = resp.status();
    state.metrics.count_response(status.as_u16());
    span.in_scope(|| tracing::debug!(status = status.as_u16(), "responded"));
    if let Some(t) = resp.extensions_mut().remove::<timing::ServerTiming>() {
        if let Some(v) = t.header(entered, std::time::Instant::now()) {
            resp.headers_mut().insert(SERVER_TIMING.clone(), v);
        }
    }
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&id) {
        h.insert(X_REQUEST_ID.clone(), v);
    }
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache; no-store, must-revalidate, private"),
    );
    h.insert(
        header::EXPIRES,
        HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 UTC"),
    );
    // TorchServe's CORS: the configured values, only when an origin is configured.
    let cors = &state.manager.settings().cors;
    if cors[0].is_some() {
        let names = [
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            header::ACCESS_CONTROL_ALLOW_METHODS,
            header::ACCESS_CONTROL_ALLOW_HEADERS,
        ];
        for (name, value) in names.into_iter().zip(cors) {
            if let Some(v) = value.as_deref().and_then(|v| HeaderValue::from_str(v).ok()) {
                h.insert(name, v);
            }
        }
    }
    resp
}

/// Adds what every port shares (request ids, no-cache headers, status counters, the
/// TorchServe 404 fallback, trailing slashes ignored) to a router. The benchmark's HTTP floor
/// uses it too.
pub fn with_common(router: Router<AppState>, state: AppState) -> Router {
    let routed = router
        .fallback(|| async { HttpError::resource_not_found() })
        .layer(middleware::from_fn_with_state(state.clone(), common_layer))
        .with_state(state);
    // Before routing: TorchServe splits paths on `/` and drops trailing empty segments, so
    // `/models/x/` is `/models/x`.
    Router::new().fallback_service(
        tower::ServiceBuilder::new()
            .map_request(without_trailing_slash)
            .service(routed),
    )
}

/// The request with its path's trailing slashes removed (`/` stays).
fn without_trailing_slash(mut req: Request) -> Request {
    let path = req.uri().path();
    if path.len() <= 1 || !path.ends_with('/') {
        return req;
    }
    let trimmed = match path.trim_end_matches('/') {
        "" => "/",
        t => t,
    };
    let new = match req.uri().query() {
        Some(q) => format!("{trimmed}?{q}"),
        None => trimmed.to_string(),
    };
    let mut parts = req.uri().clone().into_parts();
    if let Ok(pq) = new.parse() {
        parts.path_and_query = Some(pq);
        if let Ok(uri) = axum::http::Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    }
    req
}

/// The inference API (TorchServe's port 8080).
pub fn inference_router(state: AppState) -> Router {
    with_common(inference::routes(), state)
}

/// The management API (TorchServe's port 8081).
pub fn management_router(state: AppState) -> Router {
    let routes = management::routes().layer(middleware::from_fn_with_state(
        state.clone(),
        security::guard,
    ));
    with_common(routes, state)
}

/// What a model function serves on its one port: inference, `/ping` and `/metrics`, and
/// no management routes.
pub fn function_router(state: AppState) -> Router {
    with_common(inference::routes().merge(metrics::routes()), state)
}

/// The metrics API (TorchServe's port 8082).
pub fn metrics_router(state: AppState) -> Router {
    with_common(metrics::routes(), state)
}

/// Reads a request body, refusing more than `limit` bytes without buffering past it.
pub async fn read_body(
    body: Body,
    headers: &axum::http::HeaderMap,
    limit: usize,
) -> Result<Bytes, HttpError> {
    let too_large = || {
        HttpError::new(
            ErrorKind::PayloadTooLarge,
            format!("request body is larger than max_request_size ({limit} bytes)"),
        )
    };
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > limit as u64 {
            return Err(too_large());
        }
    }
    let timeout = serve::Limits::from_env().body_timeout;
    let collected =
        tokio::time::timeout(timeout, http_body_util::Limited::new(body, limit).collect())
            .await
            .map_err(|_| {
                HttpError::new(
                    ErrorKind::RequestTimeout,
                    format!(
                        "the request body did not arrive within {} s",
                        timeout.as_secs_f64()
                    ),
                )
            })?;
    match collected {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(too_large())
        }
        Err(e) => Err(HttpError::bad_request(format!(
            "could not read the request body: {e}"
        ))),
    }
}

/// A JSON response with TorchServe's pretty printing (2-space indent).
pub fn json_response(status: axum::http::StatusCode, value: &serde_json::Value) -> Response {
    let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
    body.push(b'\n');
    json_text_response(status, body)
}

/// A response whose body is JSON text already printed.
///
/// Its header map is made with room for what the response will carry (the content type, the
/// timing headers, the request id, the no-cache headers, Server-Timing): a default map holds 6
/// headers before it grows and re-hashes, which a prediction's answer did on every request.
pub fn json_text_response(status: axum::http::StatusCode, body: Vec<u8>) -> Response {
    let mut headers = axum::http::HeaderMap::with_capacity(RESPONSE_HEADERS);
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}

/// How many headers a JSON response is made with room for.
const RESPONSE_HEADERS: usize = 12;

/// Resolves on Ctrl-C or SIGTERM (what container platforms and Kubernetes send), for a
/// graceful shutdown that finishes in-flight requests.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down: finishing in-flight requests");
}
