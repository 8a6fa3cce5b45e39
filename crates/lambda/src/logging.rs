//! Logs to stderr, as Lambda's advanced logging controls expect.

use crate::runtime::var;

/// Logs to stderr, honouring Lambda's advanced logging controls: `AWS_LAMBDA_LOG_LEVEL`
/// (`RUST_LOG` wins when set) and `AWS_LAMBDA_LOG_FORMAT=JSON` (one JSON object a line).
/// Under Lambda (`AWS_LAMBDA_RUNTIME_API` set) the text format leaves the timestamp to
/// CloudWatch and writes no colour codes. A second call keeps the first set-up.
pub fn init_logging() {
    let level = var("AWS_LAMBDA_LOG_LEVEL")
        .map(|l| l.to_ascii_lowercase())
        .unwrap_or_else(|| "info".into());
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let json = var("AWS_LAMBDA_LOG_FORMAT").is_some_and(|f| f.eq_ignore_ascii_case("json"));
    let installed = match (json, crate::in_lambda()) {
        (true, _) => builder.json().try_init(),
        // CloudWatch shows colour codes as text.
        (false, true) => builder.without_time().with_ansi(false).try_init(),
        (false, false) => builder.try_init(),
    };
    if let Err(e) = installed {
        tracing::debug!(error = %e, "logging was already set up");
    }
}
