//! The inference API: `/ping` and `/predictions/{model}[/{version}]`.

use std::time::Instant;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use serde_json::{json, Value};

use super::{json_response, read_body, AppState};
use crate::error::ApiError;

pub fn routes() -> Router<AppState> {
    use super::openapi::{respond, INFERENCE};
    Router::new()
        .route(
            "/",
            axum::routing::options(|| async { respond(INFERENCE) })
                .fallback(|| async { ApiError::method_not_allowed() }),
        )
        .route("/api-description", any(|| async { respond(INFERENCE) }))
        .route("/ping", any(ping))
        .route("/predictions/{*path}", any(predict))
}

/// Healthy once the models named at start-up are loaded (Kubernetes readiness and liveness).
async fn ping(State(state): State<AppState>) -> Response {
    if state.is_ready() {
        json_response(StatusCode::OK, &json!({"status": "Healthy"}))
    } else {
        json_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            &json!({"status": "Unhealthy"}),
        )
    }
}

async fn predict(
    State(state): State<AppState>,
    Path(path): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match predict_inner(&state, &path, &headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn predict_inner(
    state: &AppState,
    path: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let mut segments = path.split('/').filter(|s| !s.is_empty());
    let name = segments.next().ok_or_else(ApiError::resource_not_found)?;
    let version = segments.next();
    let model = state.manager.get(name, version)?;
    let m = &model.request_metrics[usize::from(version.is_some())];
    // Counted before queueing, as TorchServe does, so refused requests count too.
    m.requests_total.inc();

    let max = state.manager.settings().max_request_size;
    let bytes = read_body(body, headers, max).await?;
    let decoded = model.handler.decode(&bytes)?;
    let max_instances = state.manager.settings().max_instances_per_request;
    if decoded.instances.len() > max_instances {
        return Err(ApiError::bad_request(format!(
            "the request holds {} instances; the limit is {max_instances} \
             (max_instances_per_request): split it into smaller requests",
            decoded.instances.len()
        )));
    }
    let reply = model.batcher.submit(&model.name, decoded.instances)?;
    // response_timeout bounds the request's whole time, reading and decoding included.
    let timeout = model.settings.response_timeout;
    let left = timeout.saturating_sub(started.elapsed());
    let outcome = match tokio::time::timeout(left, reply).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(_)) => return Err(ApiError::internal("Worker died.")),
        Err(_) => {
            return Err(ApiError::internal(format!(
                "Prediction did not finish within the model's response timeout ({} s)",
                timeout.as_secs()
            )))
        }
    };
    let values = outcome.outputs?;
    let body = if decoded.is_list {
        Value::Array(values)
    } else {
        values.into_iter().next().unwrap_or(Value::Null)
    };

    let total = started.elapsed();
    let queue_us = outcome.queue_time.as_secs_f64() * 1e6;
    m.inference_latency_us.inc_by(total.as_secs_f64() * 1e6);
    m.queue_latency_us.inc_by(queue_us);
    m.inference_latency_ms.observe(total.as_secs_f64() * 1e3);
    m.queue_latency_ms.observe(queue_us / 1e3);

    let mut resp = json_response(StatusCode::OK, &body);
    let h = resp.headers_mut();
    for (name, value) in [
        ("x-torchfn-queue-us", outcome.queue_time.as_micros()),
        ("x-torchfn-inference-us", outcome.inference_time.as_micros()),
        ("x-torchfn-batch-size", outcome.batch_size as u128),
    ] {
        if let Ok(v) = HeaderValue::from_str(&value.to_string()) {
            h.insert(name, v);
        }
    }
    // One span with all of the prediction's figures, made once they are known (recording
    // fields one by one re-formats the request span each time).
    tracing::info_span!(
        "prediction",
        model = %model.name,
        version = %model.version,
        queue_us = outcome.queue_time.as_micros() as u64,
        inference_us = outcome.inference_time.as_micros() as u64,
        batch_size = outcome.batch_size,
    )
    .in_scope(|| tracing::debug!("prediction served"));
    Ok(resp)
}
