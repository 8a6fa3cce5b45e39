//! The Lambda environment: whether a function runs under Lambda, whether the variables
//! Lambda sets are all there, and the Runtime API calls a function makes itself (the
//! init-error report; the shutdown extension's registration in [`crate::shutdown`]).

/// A variable of the environment Lambda sets up; blank counts as unset.
pub fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Whether the function runs under a Lambda Runtime API (`AWS_LAMBDA_RUNTIME_API` set).
pub fn in_lambda() -> bool {
    var("AWS_LAMBDA_RUNTIME_API").is_some()
}

/// The variables Lambda sets besides `AWS_LAMBDA_RUNTIME_API`, without which the runtime
/// client cannot start.
pub const LAMBDA_VARIABLES: [&str; 3] = [
    "AWS_LAMBDA_FUNCTION_NAME",
    "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
    "AWS_LAMBDA_FUNCTION_VERSION",
];

/// Under a Runtime API, fails when any of [`LAMBDA_VARIABLES`] is missing (Lambda sets them
/// all; a half-configured emulator does not), naming them. Outside Lambda it passes.
pub fn check_environment() -> anyhow::Result<()> {
    check_variables(in_lambda(), |name| var(name).is_some())
}

fn check_variables(in_lambda: bool, is_set: impl Fn(&str) -> bool) -> anyhow::Result<()> {
    if !in_lambda {
        return Ok(());
    }
    let missing: Vec<&str> = LAMBDA_VARIABLES
        .into_iter()
        .filter(|name| !is_set(name))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    anyhow::bail!(
        "AWS_LAMBDA_RUNTIME_API is set but {} not (Lambda sets them all)",
        missing.join(", ")
    )
}

/// A client of Lambda's Runtime API (`AWS_LAMBDA_RUNTIME_API`); `None` outside Lambda or when
/// the address is not valid (logged).
pub fn runtime_api_client() -> Option<lambda_runtime_api_client::PooledClient> {
    let api = var("AWS_LAMBDA_RUNTIME_API")?;
    let Some(base) = runtime_api_base(&api) else {
        tracing::warn!(api = %api, "AWS_LAMBDA_RUNTIME_API is not a valid address");
        return None;
    };
    Some(
        lambda_runtime_api_client::PooledClient::builder()
            .with_endpoint(base)
            .build(),
    )
}

/// The Runtime API's base URI: Lambda gives `host:port`; local emulators may give a URL with
/// a base path.
fn runtime_api_base(api: &str) -> Option<http::Uri> {
    let base = if api.contains("://") {
        api.to_string()
    } else {
        format!("http://{api}")
    };
    base.parse().ok()
}

/// Sends a request to the Runtime API; one that could not be built fails like one that could
/// not be sent.
pub async fn send(
    client: &lambda_runtime_api_client::PooledClient,
    request: http::Result<http::Request<lambda_runtime_api_client::body::Body>>,
) -> Result<http::Response<impl Sized>, lambda_runtime_api_client::BoxError> {
    client.call(request?).await
}

/// The body of an init-error report.
fn init_error_body(error: &anyhow::Error) -> serde_json::Value {
    serde_json::json!({
        "errorType": "Runtime.InitError",
        "errorMessage": format!("{error:#}"),
    })
}

/// Under Lambda, tells the Runtime API why the start failed (`/runtime/init/error`), so the
/// pending invocation fails at once with that message instead of waiting for a runtime that
/// will never ask for it. Elsewhere, or when the report cannot be sent, only the log has it.
pub async fn report_init_error(error: &anyhow::Error) {
    let Some(client) = runtime_api_client() else {
        return;
    };
    let request = lambda_runtime_api_client::build_request()
        .method("POST")
        .uri("/2018-06-01/runtime/init/error")
        .header("lambda-runtime-function-error-type", "Runtime.InitError")
        .header("content-type", "application/json")
        .body(lambda_runtime_api_client::body::Body::from(
            init_error_body(error).to_string(),
        ));
    if let Err(e) = send(&client, request).await {
        tracing::warn!(error = %e, "could not report the start-up failure to the Runtime API");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn outside_lambda_nothing_is_required() {
        assert!(check_variables(false, |_| false).is_ok());
    }

    #[test]
    fn under_lambda_the_missing_variables_are_named() {
        assert!(check_variables(true, |_| true).is_ok());
        let error = check_variables(true, |name| name == "AWS_LAMBDA_FUNCTION_NAME")
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            "AWS_LAMBDA_RUNTIME_API is set but AWS_LAMBDA_FUNCTION_MEMORY_SIZE, \
             AWS_LAMBDA_FUNCTION_VERSION not (Lambda sets them all)"
        );
    }

    #[test]
    fn the_runtime_api_address_is_host_port_or_a_url() {
        assert_eq!(
            runtime_api_base("127.0.0.1:9001").unwrap().to_string(),
            "http://127.0.0.1:9001/"
        );
        assert_eq!(
            runtime_api_base("http://localhost:9000/lambda")
                .unwrap()
                .to_string(),
            "http://localhost:9000/lambda"
        );
        assert!(runtime_api_base("not an address").is_none());
    }

    #[test]
    fn an_init_error_carries_the_whole_chain() {
        let error = anyhow::anyhow!("no such file").context("model not loaded");
        assert_eq!(
            init_error_body(&error),
            serde_json::json!({
                "errorType": "Runtime.InitError",
                "errorMessage": "model not loaded: no such file",
            })
        );
    }
}
