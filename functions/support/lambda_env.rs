// Shared by torchfn's Lambda functions (included with `#[path]`): their log set-up and how a
// failed start is reported.

/// A non-empty environment variable.
pub fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Logs to stderr, honouring Lambda's advanced logging controls: `AWS_LAMBDA_LOG_LEVEL`
/// (`RUST_LOG` wins when set) and `AWS_LAMBDA_LOG_FORMAT=JSON`. Under Lambda the timestamp is
/// left to CloudWatch.
pub fn init_logging() {
    let level = env("AWS_LAMBDA_LOG_LEVEL")
        .map(|l| l.to_ascii_lowercase())
        .unwrap_or_else(|| "info".into());
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let json = env("AWS_LAMBDA_LOG_FORMAT").is_some_and(|f| f.eq_ignore_ascii_case("json"));
    match (json, env("AWS_LAMBDA_RUNTIME_API").is_some()) {
        (true, _) => builder.json().init(),
        // CloudWatch shows colour codes as text.
        (false, true) => builder.without_time().with_ansi(false).init(),
        (false, false) => builder.init(),
    }
}

/// A client of Lambda's Runtime API (`AWS_LAMBDA_RUNTIME_API`); `None` outside Lambda or when
/// the address is not valid (logged).
pub fn runtime_api_client() -> Option<lambda_runtime_api_client::PooledClient> {
    let api = env("AWS_LAMBDA_RUNTIME_API")?;
    // Lambda gives `host:port`; local emulators may give a URL with a base path.
    let base = if api.contains("://") {
        api
    } else {
        format!("http://{api}")
    };
    let Ok(base) = base.parse::<http::Uri>() else {
        tracing::warn!(api = %base, "AWS_LAMBDA_RUNTIME_API is not a valid address");
        return None;
    };
    Some(
        lambda_runtime_api_client::PooledClient::builder()
            .with_endpoint(base)
            .build(),
    )
}

/// Sends a request to the Runtime API; one that could not be built fails like one that could
/// not be sent.
pub async fn send(
    client: &lambda_runtime_api_client::PooledClient,
    request: http::Result<http::Request<lambda_runtime_api_client::body::Body>>,
) -> Result<http::Response<impl Sized>, lambda_runtime_api_client::BoxError> {
    client.call(request?).await
}

/// Under Lambda, tells the Runtime API why the start failed (`/runtime/init/error`), so the
/// pending invocation fails at once with that message instead of waiting for a runtime that
/// will never ask for it. Elsewhere, or when the report cannot be sent, only the log has it.
pub async fn report_init_error(error: &anyhow::Error) {
    let Some(client) = runtime_api_client() else {
        return;
    };
    let body = serde_json::json!({
        "errorType": "Runtime.InitError",
        "errorMessage": format!("{error:#}"),
    });
    let request = lambda_runtime_api_client::build_request()
        .method("POST")
        .uri("/2018-06-01/runtime/init/error")
        .header("lambda-runtime-function-error-type", "Runtime.InitError")
        .header("content-type", "application/json")
        .body(lambda_runtime_api_client::body::Body::from(
            body.to_string(),
        ));
    if let Err(e) = send(&client, request).await {
        tracing::warn!(error = %e, "could not report the start-up failure to the Runtime API");
    }
}
