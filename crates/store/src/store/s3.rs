//! The S3 client's set-up (region, endpoint, timeouts, retries), the mapping of SDK errors
//! onto the store's, and the backoff between the store's own retries.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStreamError;
use aws_sdk_s3::Client;

use super::error::Result;
use super::{Location, StoreError};

/// Attempts the SDK makes for one request (standard retry mode) unless the environment sets
/// `AWS_MAX_ATTEMPTS` / `AWS_RETRY_MODE`.
const SDK_ATTEMPTS: u32 = 5;

pub(super) async fn build_client(endpoint: Option<String>) -> Result<Client> {
    use aws_config::retry::RetryConfig;
    use aws_config::timeout::TimeoutConfig;
    use aws_config::BehaviorVersion;
    use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};

    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http)
        // Connect timeout as the SDK's default; the attempt timeout bounds a server that
        // accepts and never answers (for GetObject it covers the headers, not the body, whose
        // stalls the SDK's stalled-stream protection catches).
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_millis(3100))
                .operation_attempt_timeout(Duration::from_secs(60))
                .build(),
        );
    if env_unset("AWS_MAX_ATTEMPTS") && env_unset("AWS_RETRY_MODE") {
        // Standard mode: exponential backoff with full jitter for 5xx, throttling (503
        // SlowDown), timeouts and connection failures, bounded by attempts and a retry quota.
        loader = loader.retry_config(
            RetryConfig::standard()
                .with_max_attempts(SDK_ATTEMPTS)
                .with_initial_backoff(Duration::from_millis(100))
                .with_max_backoff(Duration::from_secs(5)),
        );
    }
    let custom_endpoint =
        endpoint.is_some() || !env_unset("AWS_ENDPOINT_URL_S3") || !env_unset("AWS_ENDPOINT_URL");
    let shared = loader.load().await;
    if shared.region().is_none() {
        return Err(StoreError::Config(
            "no AWS region: set AWS_REGION (for example AWS_REGION=us-east-1)".to_string(),
        ));
    }
    let mut config = aws_sdk_s3::config::Builder::from(&shared);
    if let Some(url) = endpoint {
        config = config.endpoint_url(url);
    }
    if custom_endpoint {
        // S3-compatible servers on an address (moto on 127.0.0.1) have no per-bucket host names.
        config = config.force_path_style(true);
    }
    tracing::debug!(
        region = ?shared.region(),
        custom_endpoint,
        "S3 client built"
    );
    Ok(Client::from_conf(config.build()))
}

fn env_unset(name: &str) -> bool {
    std::env::var_os(name).is_none_or(|v| v.is_empty())
}

/// Exponential backoff with full jitter: a random wait in [0, min(5 s, 100 ms × 2^attempt)).
pub(super) fn backoff(attempt: u32) -> Duration {
    let cap = Duration::from_millis(100u64.saturating_mul(1 << attempt.min(10)))
        .min(Duration::from_secs(5));
    let random = RandomState::new().build_hasher().finish();
    cap.mul_f64((random % 10_000) as f64 / 10_000.0)
}

pub(super) fn http_status<E>(err: &SdkError<E, HttpResponse>) -> Option<u16> {
    err.raw_response().map(|r| r.status().as_u16())
}

/// Maps an SDK error to the store's kinds: 404 and `NoSuch*` to `NotFound`, 403 to
/// `AccessDenied`, anything else (left after the SDK's retries) to `S3` with a hint.
pub(super) fn s3_error<E>(
    operation: &'static str,
    location: &Location,
    err: SdkError<E, HttpResponse>,
) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = http_status(&err);
    let code = err.code().map(str::to_string);
    match (status, code.as_deref()) {
        (Some(404), _) | (_, Some("NoSuchKey" | "NoSuchBucket" | "NotFound")) => {
            StoreError::NotFound {
                location: location.clone(),
            }
        }
        (Some(403), _)
        | (_, Some("AccessDenied" | "InvalidAccessKeyId" | "SignatureDoesNotMatch")) => {
            StoreError::AccessDenied {
                location: location.clone(),
            }
        }
        _ => {
            let mut message = DisplayErrorContext(&err).to_string();
            if status == Some(301) || code.as_deref() == Some("PermanentRedirect") {
                message
                    .push_str(" (the bucket is in another region: set AWS_REGION to its region)");
            }
            StoreError::S3 {
                operation,
                location: location.clone(),
                message,
            }
        }
    }
}

/// A body-stream failure of a whole-object read (ranged downloads retry theirs).
pub(super) fn body_error(location: &Location, err: ByteStreamError) -> StoreError {
    StoreError::S3 {
        operation: "GetObject",
        location: location.clone(),
        message: format!("reading the body failed: {}", DisplayErrorContext(err)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded() {
        for attempt in 0..40 {
            assert!(backoff(attempt) <= Duration::from_secs(5));
        }
    }
}
