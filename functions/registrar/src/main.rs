//! `torchfn-registrar`: the Lambda function behind the models bucket's notifications (directly,
//! or through an SQS queue with a dead-letter queue). Each `ObjectCreated` archive under the
//! prefix becomes a version record in the registry (and the default when it is the highest
//! version, unless the model is pinned); each `ObjectRemoved` marks its version removed.
//!
//! Environment: `TORCHFN_REGISTRY` (`s3://bucket/prefix`), `TORCHFN_ARCHIVE_PREFIX`
//! (default `archives/`), `TORCHFN_MAX_ARCHIVE_BYTES` (default 10 GiB); AWS settings from the
//! standard environment. It links no libtorch.
//!
//! An archive that is refused (not a model archive, eager-mode, missing files) is logged and
//! not retried; a store or registry failure fails the invocation so that S3 or SQS retries it
//! (and SQS finally moves it to the dead-letter queue).

use anyhow::Context;
use lambda_runtime::{service_fn, LambdaEvent};
use serde_json::{json, Value};
use torchfn_store::registrar::{handle, parse_events, Outcome, RegistrarConfig, RegistrarError};
use torchfn_store::registry::Registry;
use torchfn_store::store::ObjectStore;

#[path = "../../support/lambda_env.rs"]
mod lambda_env;
use lambda_env::env;

async fn on_event(
    registry: &Registry,
    store: &ObjectStore,
    config: &RegistrarConfig,
    payload: Value,
) -> Result<Value, lambda_runtime::Error> {
    let events = parse_events(&payload)?;
    let mut outcomes = Vec::with_capacity(events.len());
    for event in &events {
        let outcome = match handle(registry, store, config, event).await {
            Ok(outcome) => outcome,
            Err(RegistrarError::Refused { location, reason }) => {
                tracing::error!(%location, %reason, "archive refused");
                Outcome::Ignored {
                    reason: format!("refused: {reason}"),
                }
            }
            Err(e) => {
                tracing::error!(bucket = %event.bucket, key = %event.key, error = %e, "event failed; it will be retried");
                return Err(e.into());
            }
        };
        tracing::info!(bucket = %event.bucket, key = %event.key, ?outcome, "archive event handled");
        outcomes.push(outcome);
    }
    Ok(json!({ "outcomes": outcomes }))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    lambda_env::init_logging();
    let (registry, store, config) = match setup() {
        Ok(parts) => parts,
        Err(e) => {
            // A bad configuration fails the start, and Lambda is told why.
            lambda_env::report_init_error(&e).await;
            return Err(e);
        }
    };
    let (registry, store, config) = (&registry, &store, &config);
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| async move {
        on_event(registry, store, config, event.payload).await
    }))
    .await
    .map_err(|e| anyhow::anyhow!("Lambda runtime stopped: {e}"))
}

/// The registry, store and settings, from the environment.
fn setup() -> anyhow::Result<(Registry, ObjectStore, RegistrarConfig)> {
    let registry_root = env("TORCHFN_REGISTRY")
        .context("TORCHFN_REGISTRY (s3://bucket/prefix of the registry) is not set")?;
    let config = RegistrarConfig {
        prefix: env("TORCHFN_ARCHIVE_PREFIX").unwrap_or_else(|| "archives/".into()),
        max_archive_bytes: env("TORCHFN_MAX_ARCHIVE_BYTES")
            .map(|v| {
                v.parse()
                    .context("TORCHFN_MAX_ARCHIVE_BYTES is not a number")
            })
            .transpose()?
            .unwrap_or(10 << 30),
    };
    let store = ObjectStore::from_env();
    let registry = Registry::new(store.clone(), registry_root.parse()?);
    Ok((registry, store, config))
}
