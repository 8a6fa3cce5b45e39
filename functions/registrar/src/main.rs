//! `torchfn-registrar`: the Lambda function behind the models bucket's notifications (directly,
//! or through an SQS queue with a dead-letter queue). Each `ObjectCreated` archive under the
//! prefix becomes a version record in the registry (and the default when it is the highest
//! version, unless the model is pinned); each `ObjectRemoved` marks its version removed.
//!
//! Settings (`torchfn-registrar --help` lists them): `TORCHFN_REGISTRY` (`s3://bucket/prefix`),
//! `TORCHFN_ARCHIVE_PREFIX` (default `archives/`), `TORCHFN_MAX_ARCHIVE_BYTES` (default
//! 10 GiB); AWS settings from the standard environment. It links no libtorch.
//!
//! An archive that is refused (not a model archive, eager-mode, missing files) is logged and
//! not retried; a store or registry failure fails the invocation so that S3 or SQS retries it
//! (and SQS finally moves it to the dead-letter queue).

mod events;

use anyhow::Context;
use lambda_runtime::{service_fn, LambdaEvent};
use serde_json::{json, Value};
use torchfn_store::registrar::{handle, Outcome, RegistrarConfig, RegistrarError};
use torchfn_store::registry::Registry;
use torchfn_store::store::ObjectStore;

/// The registrar's settings, from flags or (under Lambda) the environment; a blank variable
/// counts as unset.
#[derive(Debug, clap::Parser)]
#[command(name = "torchfn-registrar", version, about)]
struct Args {
    /// The registry the versions are recorded in (`s3://bucket/prefix`). Required.
    #[arg(long, env = "TORCHFN_REGISTRY", value_name = "URI")]
    registry: Option<String>,
    /// Only objects under this key prefix are archives.
    #[arg(
        long,
        env = "TORCHFN_ARCHIVE_PREFIX",
        value_name = "PREFIX",
        default_value = "archives/"
    )]
    archive_prefix: String,
    /// Larger archives are refused.
    #[arg(
        long,
        env = "TORCHFN_MAX_ARCHIVE_BYTES",
        value_name = "BYTES",
        default_value_t = 10 << 30
    )]
    max_archive_bytes: u64,
}

async fn on_event(
    registry: &Registry,
    store: &ObjectStore,
    config: &RegistrarConfig,
    payload: Value,
) -> Result<Value, lambda_runtime::Error> {
    let events = events::archive_events(payload)?;
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
    // `--help` and `--version` answer before anything starts.
    let args = torchfn_lambda::settings::parse::<Args>();
    torchfn_lambda::init_logging();
    let (registry, store, config) = match setup(args) {
        Ok(parts) => parts,
        Err(e) => {
            // A bad configuration fails the start, and Lambda is told why.
            torchfn_lambda::report_init_error(&e).await;
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

/// The registry, store and settings.
fn setup(
    args: Result<Args, clap::Error>,
) -> anyhow::Result<(Registry, ObjectStore, RegistrarConfig)> {
    let args = args.context("invalid settings")?;
    torchfn_lambda::check_environment()?;
    let registry_root = args
        .registry
        .context("TORCHFN_REGISTRY (s3://bucket/prefix of the registry) is not set")?;
    let config = RegistrarConfig {
        prefix: args.archive_prefix,
        max_archive_bytes: args.max_archive_bytes,
    };
    let store = ObjectStore::from_env();
    let registry = Registry::new(store.clone(), registry_root.parse()?);
    Ok((registry, store, config))
}
