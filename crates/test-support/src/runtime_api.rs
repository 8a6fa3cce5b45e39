//! A Lambda Runtime API for tests: the invocation endpoints a function's runtime polls
//! (`/next`) and answers (`/response`, `/error`, `/init/error`), on 127.0.0.1 port 0. Tests
//! queue events with the sender `start` returns and await each answer through `waiting`.
//! The Extensions API's registration and next-event endpoints are served too (as Lambda
//! does; `start_without_extensions` leaves them out, as some emulators do).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

#[derive(Clone)]
pub struct RuntimeApi {
    events: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<(String, Value)>>>,
    pub waiting: Arc<Mutex<HashMap<String, oneshot::Sender<Value>>>>,
    pub init_errors: Arc<Mutex<Vec<String>>>,
    /// Invocation ids handed to the runtime, in order.
    pub delivered: Arc<Mutex<Vec<String>>>,
    /// Extensions registered: (name, events asked for, invocations handed out before).
    pub extensions: Arc<Mutex<Vec<(String, Value, usize)>>>,
    /// Extension identifiers waiting in `/extension/event/next`.
    pub extensions_waiting: Arc<Mutex<Vec<String>>>,
}

async fn next(State(api): State<RuntimeApi>) -> impl IntoResponse {
    // Once the test has dropped its sender, the runtime's poll waits out the test.
    let Some((id, event)) = api.events.lock().await.recv().await else {
        return std::future::pending::<(HeaderMap, String)>().await;
    };
    api.delivered.lock().unwrap().push(id.clone());
    let mut headers = HeaderMap::new();
    headers.insert(
        "lambda-runtime-aws-request-id",
        HeaderValue::from_str(&id).unwrap(),
    );
    let deadline = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 60_000;
    headers.insert(
        "lambda-runtime-deadline-ms",
        HeaderValue::from_str(&deadline.to_string()).unwrap(),
    );
    headers.insert(
        "lambda-runtime-invoked-function-arn",
        HeaderValue::from_static("arn:aws:lambda:us-east-1:123456789012:function:slow"),
    );
    headers.insert(
        "lambda-runtime-trace-id",
        HeaderValue::from_static("Root=1-0-0"),
    );
    (headers, event.to_string())
}

async fn respond(
    State(api): State<RuntimeApi>,
    Path(id): Path<String>,
    body: String,
) -> StatusCode {
    let value: Value = serde_json::from_str(&body).unwrap_or(Value::String(body));
    if let Some(tx) = api.waiting.lock().unwrap().remove(&id) {
        let _ = tx.send(value);
    }
    StatusCode::ACCEPTED
}

async fn init_error(State(api): State<RuntimeApi>, body: String) -> StatusCode {
    api.init_errors.lock().unwrap().push(body);
    StatusCode::ACCEPTED
}

async fn register_extension(
    State(api): State<RuntimeApi>,
    headers: HeaderMap,
    body: String,
) -> impl IntoResponse {
    let name = headers
        .get("lambda-extension-name")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let events = serde_json::from_str::<Value>(&body).unwrap_or(Value::Null)["events"].clone();
    let before = api.delivered.lock().unwrap().len();
    let mut extensions = api.extensions.lock().unwrap();
    let id = format!("ext-{}", extensions.len());
    extensions.push((name, events, before));
    let mut out = HeaderMap::new();
    out.insert(
        "lambda-extension-identifier",
        HeaderValue::from_str(&id).unwrap(),
    );
    (
        out,
        r#"{"functionName":"test","functionVersion":"$LATEST","handler":"bootstrap"}"#,
    )
}

/// Lambda answers an extension's next-event request only with an event it subscribed to;
/// these tests send none.
async fn next_extension_event(State(api): State<RuntimeApi>, headers: HeaderMap) -> StatusCode {
    let id = headers
        .get("lambda-extension-identifier")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    api.extensions_waiting.lock().unwrap().push(id);
    std::future::pending::<StatusCode>().await
}

/// Serves the Runtime API and the Extensions API; returns it, the event queue, and its
/// address.
pub async fn start() -> (
    RuntimeApi,
    mpsc::UnboundedSender<(String, Value)>,
    SocketAddr,
) {
    start_with(true).await
}

/// Serves the Runtime API only (no Extensions API: its routes answer 404).
pub async fn start_without_extensions() -> (
    RuntimeApi,
    mpsc::UnboundedSender<(String, Value)>,
    SocketAddr,
) {
    start_with(false).await
}

async fn start_with(
    extensions: bool,
) -> (
    RuntimeApi,
    mpsc::UnboundedSender<(String, Value)>,
    SocketAddr,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let api = RuntimeApi {
        events: Arc::new(tokio::sync::Mutex::new(rx)),
        waiting: Arc::new(Mutex::new(HashMap::new())),
        init_errors: Arc::new(Mutex::new(Vec::new())),
        delivered: Arc::new(Mutex::new(Vec::new())),
        extensions: Arc::new(Mutex::new(Vec::new())),
        extensions_waiting: Arc::new(Mutex::new(Vec::new())),
    };
    let mut router = Router::new()
        .route("/2018-06-01/runtime/invocation/next", get(next))
        .route(
            "/2018-06-01/runtime/invocation/{id}/response",
            post(respond),
        )
        .route("/2018-06-01/runtime/invocation/{id}/error", post(respond))
        .route("/2018-06-01/runtime/init/error", post(init_error));
    if extensions {
        router = router
            .route("/2020-01-01/extension/register", post(register_extension))
            .route(
                "/2020-01-01/extension/event/next",
                get(next_extension_event),
            );
    }
    let router = router.with_state(api.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    (api, tx, addr)
}

/// Queues one invocation and waits (up to `secs`) for the function's answer.
pub async fn invoke(
    api: &RuntimeApi,
    tx: &mpsc::UnboundedSender<(String, Value)>,
    id: &str,
    event: Value,
    secs: u64,
) -> Value {
    let (reply_tx, reply_rx) = oneshot::channel();
    api.waiting.lock().unwrap().insert(id.to_string(), reply_tx);
    tx.send((id.to_string(), event)).unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(secs), reply_rx)
        .await
        .expect("no answer from the function")
        .unwrap()
}

/// An API Gateway HTTP API (v2) event for `POST {path}` with a JSON body.
pub fn http_api_event(id: &str, path: &str, body: &Value) -> Value {
    serde_json::json!({
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": "",
        "headers": {"content-type": "application/json", "host": "example.execute-api.us-east-1.amazonaws.com"},
        "requestContext": {
            "accountId": "123456789012",
            "apiId": "example",
            "domainName": "example.execute-api.us-east-1.amazonaws.com",
            "domainPrefix": "example",
            "http": {"method": "POST", "path": path, "protocol": "HTTP/1.1",
                     "sourceIp": "127.0.0.1", "userAgent": "torchfn-test"},
            "requestId": id,
            "routeKey": "$default",
            "stage": "$default",
            "time": "25/Nov/2026:12:00:00 +0000",
            "timeEpoch": 1_795_000_000_000u64
        },
        "body": body.to_string(),
        "isBase64Encoded": false
    })
}
