//! The inference API: `/ping`, `/predictions/{model}[/{version}]`,
//! `/explanations/{model}[/{version}]`, and the KServe forms: v1
//! (`/v1/models/{model}:predict`, `:explain`) and the Open Inference Protocol v2
//! (`/v2/models/{model}[/versions/{v}]/infer`, `/v2/models/{model}/explain`, model metadata and
//! readiness, `/v2/health/*`).

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::header::AsHeaderName;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Extension;
use axum::Router;
use serde_json::{json, Map, Value};

use super::{json_response, json_text_response, read_body, AppState, RequestId};
use crate::error::HttpError;
use crate::timing::{ServerTiming, TIMING_REQUEST};
use torchfn_engine::batcher::Outcome;
use torchfn_engine::handler::{tensors, Answer, Decoded, Request};
use torchfn_engine::manager::ModelVersion;

pub fn routes() -> Router<AppState> {
    use super::openapi::{respond, INFERENCE};
    Router::new()
        .route(
            "/",
            axum::routing::options(|| async { respond(INFERENCE) })
                .fallback(|| async { HttpError::method_not_allowed() }),
        )
        .route("/api-description", any(|| async { respond(INFERENCE) }))
        .route("/ping", any(ping))
        .route("/predictions/{*path}", any(predict::<false>))
        .route("/explanations/{*path}", any(predict::<true>))
        .route("/v1/models/{*path}", any(kserve_v1))
        .route(
            "/v2",
            axum::routing::get(v2_server).fallback(|| async { HttpError::method_not_allowed() }),
        )
        .route(
            "/v2/health/{which}",
            axum::routing::get(v2_health).fallback(|| async { HttpError::method_not_allowed() }),
        )
        .route("/v2/models/{*path}", any(kserve_v2))
}

/// Healthy once the models named at start-up are loaded, none failed, and every model has
/// its minimum of workers (TorchServe's rule; Kubernetes readiness and liveness).
async fn ping(State(state): State<AppState>) -> Response {
    if state.is_healthy() {
        json_response(StatusCode::OK, &json!({"status": "Healthy"}))
    } else {
        json_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            &json!({"status": "Unhealthy"}),
        )
    }
}

/// `/predictions/{model}[/{version}]` (`EXPLAIN` false), and `/explanations/{model}[/{version}]`
/// (`EXPLAIN` true): the same route with TorchServe's `explain` header set, so the handler
/// answers its explanation (Captum's, for TorchServe's handlers).
///
/// The request is taken whole and its headers and request id moved out of it, where the
/// `HeaderMap` and `Extension` extractors would copy them.
async fn predict<const EXPLAIN: bool>(
    State(state): State<AppState>,
    Path(path): Path<String>,
    request: axum::extract::Request,
) -> Response {
    let (mut parts, body) = request.into_parts();
    let call = Call {
        path,
        query: parts.uri.query().map(str::to_owned),
        id: parts
            .extensions
            .remove::<RequestId>()
            .map(|RequestId(id)| id),
        method: parts.method,
        headers: parts.headers,
        body,
    };
    predict_or_explain(&state, call, EXPLAIN).await
}

/// One request to a prediction or explanation route, as it arrived.
struct Call {
    method: Method,
    path: String,
    query: Option<String>,
    id: Option<String>,
    headers: HeaderMap,
    body: Body,
}

async fn predict_or_explain(state: &AppState, call: Call, explain: bool) -> Response {
    if call.method == Method::OPTIONS {
        return describe_predictions(state, &call.path).unwrap_or_else(IntoResponse::into_response);
    }
    match predict_inner(state, call, explain).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn predict_inner(state: &AppState, call: Call, explain: bool) -> Result<Response, HttpError> {
    let Call {
        path,
        query,
        id,
        headers,
        body,
        ..
    } = call;
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (name, version) = match segments.as_slice() {
        [] => return Err(HttpError::resource_not_found()),
        [name] => (*name, None),
        [name, version, ..] => (*name, Some(*version)),
    };
    let model = state.manager.get(name, version)?;
    let Some(handler) = model.handler().cloned() else {
        // What follows the version reaches the handler as `url_path`, as in TorchServe.
        let frontend = FrontendHeaders {
            explain,
            url_path: Some(segments.get(2..).unwrap_or_default().join("/")),
        };
        let request = PythonCall {
            version_given: version.is_some(),
            query: query.as_deref(),
            id,
            headers: &headers,
            frontend,
        };
        return predict_python(state, model, request, body).await;
    };
    if explain {
        return Err(no_builtin_explanations(&model));
    }
    let content_type = header_str(&headers, &header::CONTENT_TYPE);
    let tensor_shape = header_str(&headers, &X_TENSOR_SHAPE);
    let mut answer = infer(state, model, version.is_some(), &headers, body, |bytes| {
        handler
            .decode(&Request {
                body: bytes,
                content_type,
                tensor_shape,
            })
            .map_err(HttpError::from)
    })
    .await?;
    let mut answers = std::mem::take(&mut answer.answers);
    // Numbers come back as a .npy file when the client asks for one.
    let wants_npy =
        header_str(&headers, &header::ACCEPT).is_some_and(|a| a.contains("application/x-npy"));
    let mut resp = if wants_npy {
        let values = values_of(answers)?;
        let body = if answer.is_list {
            Value::Array(values)
        } else {
            values.into_iter().next().unwrap_or(Value::Null)
        };
        match tensors::json_to_tensor(&body) {
            Some((kind, shape, bytes)) => {
                let mut r = tensors::write_npy(kind, &shape, &bytes).into_response();
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/x-npy"),
                );
                r
            }
            None => json_response(StatusCode::OK, &body),
        }
    } else {
        answers_response(&mut answers, answer.is_list, None)
    };
    answer.add_headers(&mut resp);
    Ok(resp)
}

/// `OPTIONS /predictions/{model}[/{version}]`: the model's predictions API, as TorchServe
/// describes it.
fn describe_predictions(state: &AppState, path: &str) -> Result<Response, HttpError> {
    let mut segments = path.split('/').filter(|s| !s.is_empty());
    let name = segments.next().ok_or_else(HttpError::resource_not_found)?;
    let version = segments.next();
    state.manager.get(name, version)?;
    Ok(json_response(
        StatusCode::OK,
        &super::openapi::model_document(name, version),
    ))
}

/// The answer to an explanation asked of a model a Rust built-in serves.
fn no_builtin_explanations(model: &ModelVersion) -> HttpError {
    HttpError::bad_request(format!(
        "model {}: the built-in handler `{}` gives no explanations; explanations come from \
         handlers run by the Python backend (an eager-mode model or a handler file of its own)",
        model.name,
        model.handler_name()
    ))
}

/// A header's value as text. Named by a `HeaderName` (a constant or a static), not a `&str`,
/// which `HeaderMap` would check and lower-case again on every request.
fn header_str(headers: &HeaderMap, name: impl AsHeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// A model's answers to one request, before they are shaped for the route.
struct Answered {
    model: Arc<ModelVersion>,
    answers: Vec<Answer>,
    is_list: bool,
    outcome: Outcome,
    /// Where the request's time went, when the client asked (`x-torchfn-timing`).
    timing: Option<ServerTiming>,
}

impl Answered {
    fn add_headers(&self, resp: &mut Response) {
        timing_headers(
            resp,
            self.outcome.queue_time,
            self.outcome.inference_time,
            self.outcome.batch_size,
        );
        if let Some(t) = self.timing {
            resp.extensions_mut().insert(t);
        }
    }
}

static X_TENSOR_SHAPE: HeaderName = HeaderName::from_static("x-tensor-shape");
static X_QUEUE_US: HeaderName = HeaderName::from_static("x-torchfn-queue-us");
static X_INFERENCE_US: HeaderName = HeaderName::from_static("x-torchfn-inference-us");
static X_BATCH_SIZE: HeaderName = HeaderName::from_static("x-torchfn-batch-size");

/// torchfn's timing headers: time queued, time in the model, requests or instances batched.
fn timing_headers(
    resp: &mut Response,
    queue: std::time::Duration,
    inference: std::time::Duration,
    batch_size: usize,
) {
    let h = resp.headers_mut();
    for (name, value) in [
        (&X_QUEUE_US, queue.as_micros()),
        (&X_INFERENCE_US, inference.as_micros()),
        (&X_BATCH_SIZE, batch_size as u128),
    ] {
        let value = u64::try_from(value).unwrap_or(u64::MAX);
        h.insert(name.clone(), HeaderValue::from(value));
    }
}

/// The request headers TorchServe's frontend sets before handing a request to a worker, in
/// place of any the client sent under those names: `explain` (`True` on the explanation
/// routes, else `False`: TorchServe's handlers and envelopes read it) and, on `/predictions`
/// and `/explanations`, `url_path` (the path's segments after the version, joined by `/`).
struct FrontendHeaders {
    explain: bool,
    url_path: Option<String>,
}

/// A request on its way to a Python-backend version.
struct PythonCall<'a> {
    version_given: bool,
    query: Option<&'a str>,
    id: Option<String>,
    headers: &'a HeaderMap,
    frontend: FrontendHeaders,
}

/// A Python-backend version's answer to any inference route: the request goes to the worker
/// as TorchServe hands it over (query parameters, form fields or the body, the headers), and
/// the handler's answer comes back as it gave it: its bytes, status, content type and headers.
async fn predict_python(
    state: &AppState,
    model: Arc<ModelVersion>,
    call: PythonCall<'_>,
    body: Body,
) -> Result<Response, HttpError> {
    let PythonCall {
        version_given,
        query,
        id,
        headers,
        frontend,
    } = call;
    let started = Instant::now();
    let m = model.request_metrics(version_given);
    let Some(pool) = model.pool() else {
        return Err(HttpError::internal("the model has no Python workers"));
    };
    let bytes = count_and_read(state, m, headers, body).await?;
    let set_by_frontend =
        |k: &str| k == "explain" || (k == "url_path" && frontend.url_path.is_some());
    let mut request_headers: Vec<(String, Vec<u8>)> = headers
        .iter()
        .filter(|(k, _)| !set_by_frontend(k.as_str()))
        .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec()))
        .collect();
    if let Some(url_path) = frontend.url_path {
        request_headers.push(("url_path".into(), url_path.into_bytes()));
    }
    let explain = if frontend.explain { "True" } else { "False" };
    request_headers.push(("explain".into(), explain.as_bytes().to_vec()));
    let request = torchfn_engine::python::request(
        id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        request_headers,
        query,
        &bytes,
        header_str(headers, &header::CONTENT_TYPE),
    )?;
    let reply = pool
        .submit(request)
        .map_err(torchfn_engine::python::failure)?;
    let outcome = wait(&model, started, reply).await?;
    record(
        &model,
        m,
        started,
        outcome.queue_time,
        outcome.inference_time,
        outcome.batch_size,
    );
    let response = outcome.result.map_err(torchfn_engine::python::failure)?;
    let status = u16::try_from(response.status)
        .ok()
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    // No Content-Type unless the handler set one, as TorchServe answers.
    let mut resp = Response::new(Body::from(response.body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    for (k, v) in &response.headers {
        if let (Ok(k), Ok(v)) = (
            axum::http::HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            h.insert(k, v);
        }
    }
    if !response.content_type.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&response.content_type) {
            h.insert(header::CONTENT_TYPE, v);
        }
    }
    timing_headers(
        &mut resp,
        outcome.queue_time,
        outcome.inference_time,
        outcome.batch_size,
    );
    Ok(resp)
}

/// Counts a prediction request (before queueing, as TorchServe does, so refused requests
/// count too) and reads its body, bounded by `max_request_size`.
async fn count_and_read(
    state: &AppState,
    m: &torchfn_engine::metrics::RequestMetrics,
    headers: &HeaderMap,
    body: Body,
) -> Result<axum::body::Bytes, HttpError> {
    m.requests_total.inc();
    read_body(body, headers, state.manager.settings().max_request_size).await
}

/// Waits for a queued request's answer, within what is left of the model's response timeout.
async fn wait<T>(
    model: &ModelVersion,
    started: Instant,
    reply: tokio::sync::oneshot::Receiver<T>,
) -> Result<T, HttpError> {
    // response_timeout bounds the request's whole time, reading and decoding included.
    let timeout = model.settings.response_timeout;
    let left = timeout.saturating_sub(started.elapsed());
    match tokio::time::timeout(left, reply).await {
        Ok(Ok(outcome)) => Ok(outcome),
        Ok(Err(_)) => Err(HttpError::internal("Worker died.")),
        Err(_) => Err(HttpError::internal(format!(
            "Prediction did not finish within the model's response timeout ({} s)",
            timeout.as_secs()
        ))),
    }
}

/// The answers as JSON values (for the routes that reshape them).
fn values_of(answers: Vec<Answer>) -> Result<Vec<Value>, HttpError> {
    Ok(answers
        .into_iter()
        .map(Answer::into_value)
        .collect::<Result<_, _>>()?)
}

/// A 200 response with the answers as pretty JSON, printed as `json_response` prints the
/// same values: the one answer, or (`list`) an array of them, held under `key` in an object
/// when one is given (KServe v1's `{"predictions": [...]}`). Answers a handler printed are
/// copied in, indented to their depth, not read back and printed again; one such answer
/// alone is moved, not copied.
fn answers_response(answers: &mut [Answer], list: bool, key: Option<&str>) -> Response {
    // One answer the handler printed is the body as it is, with the closing newline.
    if let ([Answer::Pretty(text)], false, None) = (&mut *answers, list, key) {
        let mut body = std::mem::take(text).into_bytes();
        body.push(b'\n');
        return json_text_response(StatusCode::OK, body);
    }
    let mut out = Vec::with_capacity(64 + answers.len() * 192);
    print_answers(answers, list, key, &mut out);
    json_text_response(StatusCode::OK, out)
}

fn print_answers(answers: &[Answer], list: bool, key: Option<&str>, out: &mut Vec<u8>) {
    let level = usize::from(key.is_some());
    if let Some(key) = key {
        out.extend_from_slice(b"{\n  ");
        let _ = serde_json::to_writer(&mut *out, key);
        out.extend_from_slice(b": ");
    }
    match (list, answers) {
        (false, [first, ..]) => first.write_pretty(level, out),
        (false, []) => out.extend_from_slice(b"null"),
        (true, []) => out.extend_from_slice(b"[]"),
        (true, _) => {
            out.push(b'[');
            for (i, a) in answers.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.push(b'\n');
                out.extend(std::iter::repeat_n(b' ', 2 * (level + 1)));
                a.write_pretty(level + 1, out);
            }
            out.push(b'\n');
            out.extend(std::iter::repeat_n(b' ', 2 * level));
            out.push(b']');
        }
    }
    if key.is_some() {
        out.extend_from_slice(b"\n}");
    }
    out.push(b'\n');
}

/// Records a prediction's latency metrics and its span.
fn record(
    model: &ModelVersion,
    m: &torchfn_engine::metrics::RequestMetrics,
    started: Instant,
    queue_time: std::time::Duration,
    inference_time: std::time::Duration,
    batch_size: usize,
) {
    let total = started.elapsed();
    let queue_us = queue_time.as_secs_f64() * 1e6;
    m.inference_latency_us.inc_by(total.as_secs_f64() * 1e6);
    m.queue_latency_us.inc_by(queue_us);
    m.inference_latency_ms.observe(total.as_secs_f64() * 1e3);
    m.queue_latency_ms.observe(queue_us / 1e3);
    // One debug event with all of the prediction's figures (nothing is made at info level).
    tracing::debug!(
        model = %model.name,
        version = %model.version,
        queue_us = queue_time.as_micros() as u64,
        inference_us = inference_time.as_micros() as u64,
        batch_size = batch_size,
        "prediction served"
    );
}

/// What every built-in-handler route shares: count the request, read the body (bounded by
/// `max_request_size`), decode it with `decode`, queue it, wait for the answer (bounded by
/// the model's `response_timeout`), record the latency metrics.
async fn infer(
    state: &AppState,
    model: Arc<ModelVersion>,
    version_given: bool,
    headers: &HeaderMap,
    body: Body,
    decode: impl FnOnce(&[u8]) -> Result<Decoded, HttpError>,
) -> Result<Answered, HttpError> {
    let started = Instant::now();
    let m = model.request_metrics(version_given);
    let Some(batcher) = model.batcher() else {
        return Err(HttpError::internal("the model has no batcher"));
    };
    // The clock is read for the phases only when the client asks for them.
    let timed = headers.contains_key(&TIMING_REQUEST);
    let bytes = count_and_read(state, m, headers, body).await?;
    let read = timed.then(Instant::now);
    let decoded = decode(&bytes)?;
    let decoded_at = timed.then(Instant::now);
    let max_instances = state.manager.settings().max_instances_per_request;
    if decoded.instances.len() > max_instances {
        return Err(HttpError::bad_request(format!(
            "the request holds {} instances; the limit is {max_instances} \
             (max_instances_per_request): split it into smaller requests",
            decoded.instances.len()
        )));
    }
    let is_list = decoded.is_list;
    let reply = batcher.submit(&model.name, decoded.instances)?;
    let mut outcome = wait(&model, started, reply).await?;
    let timing = read.zip(decoded_at).map(|(read, decoded_at)| ServerTiming {
        handler_start: started,
        read: read - started,
        decode: decoded_at - read,
        phases: outcome.phases,
        resumed: Instant::now(),
    });
    let answers = std::mem::replace(&mut outcome.outputs, Ok(Vec::new()))?;
    record(
        &model,
        m,
        started,
        outcome.queue_time,
        outcome.inference_time,
        outcome.batch_size,
    );
    Ok(Answered {
        model,
        answers,
        is_list,
        outcome,
        timing,
    })
}

/// KServe v1: `POST /v1/models/{model}:predict` with `{"instances": [...]}` answers
/// `{"predictions": [...]}`; `POST /v1/models/{model}:explain` asks a Python-backend model for
/// its explanation (TorchServe's `kserve` envelope answers `{"explanations": [...]}`);
/// `GET /v1/models/{model}` says whether it is ready.
async fn kserve_v1(
    State(state): State<AppState>,
    method: Method,
    Path(path): Path<String>,
    RawQuery(query): RawQuery,
    id: Option<Extension<RequestId>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let action = [(":predict", false), (":explain", true)]
            .into_iter()
            .find_map(|(suffix, explain)| Some((path.strip_suffix(suffix)?, explain)));
        if let Some((name, explain)) = action {
            if method != Method::POST {
                return Err(HttpError::method_not_allowed());
            }
            let model = state.manager.get(name, None)?;
            let Some(handler) = model.handler().cloned() else {
                // The Python backend gets the body as sent (the handler or its envelope
                // reads KServe's form), as under TorchServe.
                let call = PythonCall {
                    version_given: false,
                    query: query.as_deref(),
                    id: id.map(|Extension(RequestId(id))| id),
                    headers: &headers,
                    frontend: FrontendHeaders {
                        explain,
                        url_path: None,
                    },
                };
                return predict_python(&state, model, call, body).await;
            };
            if explain {
                return Err(no_builtin_explanations(&model));
            }
            let mut answer = infer(&state, model, false, &headers, body, |bytes| {
                let json: Value = torchfn_engine::handler::parse_json(bytes)?;
                if !json.get("instances").is_some_and(Value::is_array) {
                    return Err(HttpError::bad_request(
                        "a KServe v1 body is {\"instances\": [...]}",
                    ));
                }
                Ok(handler.decode(&Request::json(bytes))?)
            })
            .await?;
            let mut resp = answers_response(&mut answer.answers, true, Some("predictions"));
            answer.add_headers(&mut resp);
            return Ok(resp);
        }
        if path.contains(':') {
            return Err(HttpError::resource_not_found());
        }
        if method != Method::GET {
            return Err(HttpError::method_not_allowed());
        }
        let model = state.manager.get(&path, None)?;
        Ok(json_response(
            StatusCode::OK,
            &json!({"name": model.name, "ready": model.live_workers() > 0}),
        ))
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// `GET /v2`: the server's metadata.
async fn v2_server() -> Response {
    json_response(
        StatusCode::OK,
        &json!({"name": "torchfn", "version": env!("CARGO_PKG_VERSION"), "extensions": []}),
    )
}

/// `GET /v2/health/live` and `/v2/health/ready` (ready once the start-up models loaded).
async fn v2_health(State(state): State<AppState>, Path(which): Path<String>) -> Response {
    let ok = match which.as_str() {
        "live" => true,
        "ready" => state.is_healthy(),
        _ => return HttpError::resource_not_found().into_response(),
    };
    json_response(ready_status(ok), &json!({ which: ok }))
}

/// 200 when ready, else 503 (the protocol's readiness answers).
fn ready_status(ready: bool) -> StatusCode {
    if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// The Open Inference Protocol (KServe v2): `POST .../infer`, `POST .../explain` (a
/// Python-backend model's explanation, in TorchServe's `kservev2` envelope when configured),
/// `GET .../ready`, and `GET` of the model (its metadata), each with an optional
/// `/versions/{v}`.
async fn kserve_v2(
    State(state): State<AppState>,
    method: Method,
    Path(path): Path<String>,
    RawQuery(query): RawQuery,
    id: Option<Extension<RequestId>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let parts: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let (name, version, action) = match parts.as_slice() {
            [name] => (*name, None, ""),
            [name, action] => (*name, None, *action),
            [name, "versions", v] => (*name, Some(*v), ""),
            [name, "versions", v, action] => (*name, Some(*v), *action),
            _ => return Err(HttpError::resource_not_found()),
        };
        match (action, &method) {
            (action @ ("infer" | "explain"), &Method::POST) => {
                let explain = action == "explain";
                let model = state.manager.get(name, version)?;
                if model.pool().is_some() {
                    let call = PythonCall {
                        version_given: version.is_some(),
                        query: query.as_deref(),
                        id: id.map(|Extension(RequestId(id))| id),
                        headers: &headers,
                        frontend: FrontendHeaders {
                            explain,
                            url_path: None,
                        },
                    };
                    return predict_python(&state, model, call, body).await;
                }
                if explain {
                    return Err(no_builtin_explanations(&model));
                }
                v2_infer(&state, model, version.is_some(), &headers, body).await
            }
            ("ready", &Method::GET) => {
                let model = state.manager.get(name, version)?;
                let ready = model.live_workers() > 0;
                Ok(json_response(
                    ready_status(ready),
                    &json!({"name": model.name, "ready": ready}),
                ))
            }
            ("", &Method::GET) => {
                let model = state.manager.get(name, version)?;
                let versions: Vec<String> = state
                    .manager
                    .all_versions(name)?
                    .iter()
                    .map(|m| m.version.clone())
                    .collect();
                Ok(json_response(
                    StatusCode::OK,
                    &json!({
                        "name": model.name,
                        "versions": versions,
                        "platform": "pytorch_torchscript",
                        "handler": model.handler_name(),
                        "inputs": [],
                        "outputs": [],
                    }),
                ))
            }
            ("infer" | "explain" | "ready" | "", _) => Err(HttpError::method_not_allowed()),
            _ => Err(HttpError::resource_not_found()),
        }
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn v2_infer(
    state: &AppState,
    model: Arc<ModelVersion>,
    version_given: bool,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, HttpError> {
    let mut id = None;
    let Some(handler) = model.handler().cloned() else {
        return Err(HttpError::internal("the model has no Rust handler"));
    };
    let mut answer = infer(state, model, version_given, headers, body, |bytes| {
        let json = torchfn_engine::handler::parse_json(bytes)?;
        id = json.get("id").cloned();
        Ok(handler.decode_tensors(tensors::parse_v2_inputs(&json)?)?)
    })
    .await?;
    let mut out = Map::new();
    if let Some(id) = id {
        out.insert("id".into(), id);
    }
    out.insert("model_name".into(), Value::from(answer.model.name.clone()));
    out.insert(
        "model_version".into(),
        Value::from(answer.model.version.clone()),
    );
    out.insert(
        "outputs".into(),
        Value::Array(tensors::v2_outputs(
            &values_of(std::mem::take(&mut answer.answers))?,
            answer.model.handler_name() == "tensor",
        )),
    );
    let mut resp = json_response(StatusCode::OK, &Value::Object(out));
    answer.add_headers(&mut resp);
    Ok(resp)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Printed answers, copied in at their depth, make the same bytes as `json_response`
    /// printing the values.
    #[test]
    fn printed_answers_match_the_pretty_printer() {
        let values = [
            json!({"predicted_class": 1, "confidence": 0.5, "probabilities": [0.25, 0.5, 0.25],
                   "class_name": "line\nbreak \"quoted\""}),
            json!([[1, 2], [], {}, {"a": {"b": [true, null]}}]),
            json!(3.5),
            json!("text"),
        ];
        let printed: Vec<Answer> = values
            .iter()
            .map(|v| Answer::Pretty(serde_json::to_string_pretty(v).unwrap()))
            .collect();
        let kept: Vec<Answer> = values.iter().cloned().map(Answer::Value).collect();
        let pretty = |v: &Value| {
            let mut b = serde_json::to_vec_pretty(v).unwrap();
            b.push(b'\n');
            b
        };
        for answers in [&printed, &kept] {
            for (list, key) in [(false, None), (true, None), (true, Some("predictions"))] {
                for n in [1, values.len()] {
                    let mut got = Vec::new();
                    print_answers(&answers[..n], list, key, &mut got);
                    let body = if list {
                        Value::Array(values[..n].to_vec())
                    } else {
                        values[0].clone()
                    };
                    let want = match key {
                        Some(k) => pretty(&json!({ k: body })),
                        None => pretty(&body),
                    };
                    assert_eq!(
                        String::from_utf8(got).unwrap(),
                        String::from_utf8(want).unwrap(),
                        "list {list}, key {key:?}, {n} answers"
                    );
                }
            }
        }
        let mut empty = Vec::new();
        print_answers(&[], true, None, &mut empty);
        assert_eq!(empty, b"[]\n");
    }
}
