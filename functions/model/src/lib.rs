//! `torchfn-model`: what every model function runs. One model, configured by the
//! environment, pulled from object storage and loaded once during start-up (Lambda's INIT
//! phase), then served with the same router as the emulator's inference port.
//!
//! Where the model comes from (one of):
//! - `TORCHFN_MODEL_URI`: an archive (`s3://bucket/key.mar` or a path), optionally checked
//!   against `TORCHFN_MODEL_SHA256`;
//! - `TORCHFN_REGISTRY` (`s3://bucket/prefix` or a folder) and `TORCHFN_MODEL_NAME`: the
//!   registry's default version, or `TORCHFN_MODEL_VERSION` when set (pinned); the archive is
//!   checked against the size and SHA-256 the registry recorded.
//!
//! Serving: under Lambda (`AWS_LAMBDA_RUNTIME_API` set) through `lambda_http`, with
//! concurrent invocations (`AWS_LAMBDA_MAX_CONCURRENCY`) sharing the micro-batcher; elsewhere
//! (Cloud Run, Knative, a container) as plain HTTP on `$PORT` (8080) on all interfaces
//! (`TORCHFN_HOST` overrides), inference routes, `/ping` and `/metrics` only. Lambda's
//! SHUTDOWN phase is honoured (module `shutdown`); over plain HTTP, SIGTERM drains the
//! requests in flight and exits.
//!
//! Other settings: `TORCHFN_MODEL_NAME` (the name served), `TORCHFN_HANDLER` (a built-in
//! handler, or one the function registered, for archives that name a Python handler),
//! `TORCHFN_BATCH_SIZE`, `TORCHFN_MAX_BATCH_DELAY_MS`, `TORCHFN_JOB_QUEUE_SIZE`,
//! `TORCHFN_DEVICE`, `TORCHFN_SHUTDOWN_BUDGET_MS`, `OMP_NUM_THREADS` (libtorch threads per
//! model thread); logs honour `AWS_LAMBDA_LOG_LEVEL` / `RUST_LOG` and
//! `AWS_LAMBDA_LOG_FORMAT=JSON`.
//!
//! This crate is a library and a binary. The `torchfn-model` binary is
//! `torchfn_model::main_with(|| {})`; a model function of one's own (a crate in `functions/`,
//! see `functions/regressor`) registers its custom handlers in the closure it hands
//! [`main_with`] and is otherwise this function: same environment, same routes, same
//! behaviour on Lambda and over plain HTTP. Each binary sets its own global allocator (the
//! library sets none; `torchfn-model` uses mimalloc).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use torchfn_archive::settings::Settings;
use torchfn_engine::manager::{LoadSpec, Manager};
use torchfn_engine::metrics::Metrics;
use torchfn_http::{self as api, AppState};
use torchfn_store::registry::{Registry, VersionStatus};
use torchfn_store::store::{Expect, Location, ObjectStore};

#[path = "../../support/lambda_env.rs"]
mod lambda_env;
mod shutdown;
use lambda_env::env;

fn env_num<T: std::str::FromStr>(name: &str) -> anyhow::Result<Option<T>> {
    env(name)
        .map(|v| {
            v.trim()
                .parse()
                .map_err(|_| anyhow::anyhow!("{name}={v} is not a whole number"))
        })
        .transpose()
}

fn settings() -> anyhow::Result<Settings> {
    let mut s = Settings::default();
    if let Some(n) = env_num("TORCHFN_BATCH_SIZE")? {
        s.batch_size = n;
    }
    if let Some(ms) = env_num("TORCHFN_MAX_BATCH_DELAY_MS")? {
        s.max_batch_delay = Duration::from_millis(ms);
    }
    if let Some(n) = env_num("TORCHFN_JOB_QUEUE_SIZE")? {
        s.job_queue_size = n;
    }
    if let Some(d) = env("TORCHFN_DEVICE") {
        s.device = d.parse().map_err(|e: String| anyhow::anyhow!(e))?;
    }
    // Lambda gives each environment /tmp; archives unpack there.
    s.unpack_dir = Some(std::env::temp_dir());
    // Lambda's limit for a synchronous invocation's payload; the plain-HTTP mode keeps it.
    s.max_request_size = 6 * 1024 * 1024;
    s.default_service_handler = env("TORCHFN_HANDLER");
    Ok(s)
}

/// Which archive to load, from the environment (and the registry when one is named).
async fn resolve(store: &ObjectStore) -> anyhow::Result<LoadSpec> {
    let name = env("TORCHFN_MODEL_NAME");
    if let Some(uri) = env("TORCHFN_MODEL_URI") {
        let source: Location = uri.parse()?;
        return Ok(LoadSpec {
            url: uri,
            source,
            name,
            loaded_at_startup: true,
            params: Default::default(),
            expect: Expect {
                size: None,
                sha256: env("TORCHFN_MODEL_SHA256"),
            },
        });
    }
    let (Some(registry), Some(name)) = (env("TORCHFN_REGISTRY"), name) else {
        bail!(
            "no model configured: set TORCHFN_MODEL_URI (an archive), or TORCHFN_REGISTRY and \
             TORCHFN_MODEL_NAME (a registered model)"
        );
    };
    let registry = Registry::new(store.clone(), registry.parse()?);
    let version = match env("TORCHFN_MODEL_VERSION") {
        Some(v) => v,
        None => {
            registry
                .default_pointer(&name)
                .await?
                .with_context(|| {
                    format!("model {name} has no default version in {}", registry.root())
                })?
                .0
                .version
        }
    };
    let record = registry.version(&name, &version).await?;
    if record.status == VersionStatus::Removed {
        bail!("model {name} version {version} was removed from the registry");
    }
    tracing::info!(model = %name, version = %version, source = %record.source, "resolved from the registry");
    Ok(LoadSpec {
        url: record.source.clone(),
        source: record.source.parse()?,
        name: Some(name),
        loaded_at_startup: true,
        params: Default::default(),
        expect: Expect {
            size: Some(record.size),
            sha256: Some(record.sha256),
        },
    })
}

/// Polls the registry's default pointer (a conditional GET, cheap while nothing changes) and,
/// when it moves, loads the new version beside the old, makes it the default, and retires the
/// old one once the requests holding it have finished. No request is dropped.
async fn follow_default(
    registry: Registry,
    manager: Arc<Manager>,
    name: String,
    mut current: String,
    every: Duration,
) {
    let mut etag = match registry.default_pointer(&name).await {
        Ok(Some((_, etag))) => etag,
        _ => String::new(),
    };
    loop {
        tokio::time::sleep(every).await;
        let pointer = match registry.default_pointer_if_changed(&name, &etag).await {
            Ok(Some(found)) => found,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "could not read the default version; keeping the current one");
                continue;
            }
        };
        etag = pointer.1;
        let version = pointer.0.version;
        if version == current {
            continue;
        }
        if let Err(e) = swap(&registry, &manager, &name, &current, &version).await {
            tracing::error!(model = %name, version = %version, error = %e, "new default version not loaded; keeping {current}");
            continue;
        }
        current = version;
    }
}

async fn swap(
    registry: &Registry,
    manager: &Arc<Manager>,
    name: &str,
    old: &str,
    new: &str,
) -> anyhow::Result<()> {
    let record = registry.version(name, new).await?;
    let spec = LoadSpec {
        url: record.source.clone(),
        source: record.source.parse()?,
        name: Some(name.to_string()),
        loaded_at_startup: false,
        params: Default::default(),
        expect: Expect {
            size: Some(record.size),
            sha256: Some(record.sha256),
        },
    };
    let loader = manager.clone();
    let loaded = tokio::task::spawn_blocking(move || loader.load(&spec))
        .await?
        .map_err(|e| anyhow::anyhow!("{}", e.message))?;
    if loaded.version != new {
        tracing::warn!(registry = new, archive = %loaded.version, "the archive's manifest names another version");
    }
    manager
        .set_default(name, &loaded.version)
        .map_err(|e| anyhow::anyhow!("{}", e.message))?;
    let retired = manager
        .unload(name, old)
        .map_err(|e| anyhow::anyhow!("{}", e.message))?;
    torchfn_engine::manager::retire(retired);
    tracing::info!(model = name, from = old, to = %loaded.version, "default version swapped");
    Ok(())
}

/// The model a function serves, for its metric dimensions (the version is looked up per
/// invocation: it changes when the function swaps to a new default).
#[derive(Clone)]
struct Served {
    model: Arc<str>,
    manager: Arc<Manager>,
}

/// One CloudWatch Embedded Metric Format line for a prediction: latency, queue time and
/// batch size, with the model and version as the only dimensions.
fn emf_line(served: &Served, latency_us: u128, headers: &axum::http::HeaderMap) -> Option<String> {
    let header = |name: &str| -> Option<u64> { headers.get(name)?.to_str().ok()?.parse().ok() };
    let queue_us = header("x-torchfn-queue-us")?;
    let batch = header("x-torchfn-batch-size")?;
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let line = serde_json::json!({
        "_aws": {
            "Timestamp": timestamp,
            "CloudWatchMetrics": [{
                "Namespace": "torchfn",
                "Dimensions": [["model", "version"]],
                "Metrics": [
                    {"Name": "Latency", "Unit": "Microseconds"},
                    {"Name": "QueueTime", "Unit": "Microseconds"},
                    {"Name": "BatchSize", "Unit": "Count"}
                ]
            }]
        },
        "model": &*served.model,
        "version": served
            .manager
            .get(&served.model, None)
            .map(|m| m.version.clone())
            .unwrap_or_default(),
        "Latency": latency_us as u64,
        "QueueTime": queue_us,
        "BatchSize": batch,
    });
    Some(line.to_string())
}

/// One Lambda HTTP event through the router; the answer's body is kept as text when it is
/// UTF-8 (JSON answers) and sent base64-encoded otherwise. A prediction also prints its EMF
/// line to stdout, where Lambda's log capture turns it into metrics.
async fn invoke(
    router: axum::Router,
    served: Served,
    req: lambda_http::Request,
) -> Result<lambda_http::Response<lambda_http::Body>, lambda_http::Error> {
    use tower::ServiceExt;
    let started = std::time::Instant::now();
    let resp = router.oneshot(req.map(axum::body::Body::new)).await?;
    let (parts, body) = resp.into_parts();
    if let Some(line) = emf_line(&served, started.elapsed().as_micros(), &parts.headers) {
        println!("{line}");
    }
    let bytes = axum::body::to_bytes(body, usize::MAX).await?.to_vec();
    let body = match String::from_utf8(bytes) {
        Ok(text) => lambda_http::Body::Text(text),
        Err(e) => lambda_http::Body::Binary(e.into_bytes()),
    };
    Ok(lambda_http::Response::from_parts(parts, body))
}

/// Runs a model function: `setup` first, on the calling thread before any other thread
/// starts (register custom handlers there with `torchfn_engine::handler::register`; it may
/// also set environment defaults, which the settings below then read), then everything
/// `torchfn-model` does: settings from the environment, the model loaded, and serving under
/// Lambda or over plain HTTP until shut down.
///
/// ```no_run
/// fn main() -> anyhow::Result<()> {
///     torchfn_model::main_with(|| {
///         // torchfn_engine::handler::register("my_handler", |archive| { ... });
///     })
/// }
/// ```
pub fn main_with(setup: impl FnOnce()) -> anyhow::Result<()> {
    setup();
    // API Gateway REST APIs (and HTTP APIs with a named stage) put the stage in front of the
    // path (`/prod/predictions/m`); the routes are the same under every stage. Set before any
    // thread starts.
    if std::env::var_os("AWS_LAMBDA_HTTP_IGNORE_STAGE_IN_PATH").is_none() {
        std::env::set_var("AWS_LAMBDA_HTTP_IGNORE_STAGE_IN_PATH", "true");
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("could not start the async runtime")?
        .block_on(run())
}

/// Everything done before the first event (Lambda's INIT phase): settings, the archive, the
/// loaded model, the registry watch.
struct Ready {
    manager: Arc<Manager>,
    model_name: String,
    router: axum::Router,
    shutdown_budget: Duration,
}

async fn init() -> anyhow::Result<Ready> {
    let settings = settings()?;
    let shutdown_budget = shutdown::budget()?;
    let store = ObjectStore::from_env();
    let spec = resolve(&store).await?;
    let metrics = Arc::new(Metrics::new().context("could not create metrics")?);
    let manager =
        Arc::new(Manager::new(settings, metrics).context("could not create the unpack folder")?);
    let state = AppState::new(manager.clone());

    // Load before serving (during Lambda's INIT): a model that cannot load fails the start.
    let loader = manager.clone();
    let model = tokio::task::spawn_blocking(move || loader.load(&spec))
        .await?
        .map_err(|e| anyhow::anyhow!("model not loaded: {}", e.message))?;
    tracing::info!(model = %model.name, version = %model.version, "model function ready");
    state.set_ready();
    // Following the registry's default (not pinned): notice a new default while warm.
    if let (Some(root), None) = (env("TORCHFN_REGISTRY"), env("TORCHFN_MODEL_VERSION")) {
        let every = Duration::from_secs(env_num("TORCHFN_POLL_SECONDS")?.unwrap_or(30));
        let registry = Registry::new(store.clone(), root.parse()?);
        tokio::spawn(follow_default(
            registry,
            manager.clone(),
            model.name.clone(),
            model.version.clone(),
            every,
        ));
    }
    Ok(Ready {
        manager,
        model_name: model.name.clone(),
        router: api::function_router(state),
        shutdown_budget,
    })
}

async fn run() -> anyhow::Result<()> {
    lambda_env::init_logging();
    let Ready {
        manager,
        model_name,
        router,
        shutdown_budget,
    } = match init().await {
        Ok(ready) => ready,
        Err(e) => {
            // Under Lambda the pending invocation then fails at once with this message.
            lambda_env::report_init_error(&e).await;
            return Err(e);
        }
    };

    if env("AWS_LAMBDA_RUNTIME_API").is_some() {
        // Lambda sets these; the runtime client cannot start without them.
        let missing: Vec<&str> = [
            "AWS_LAMBDA_FUNCTION_NAME",
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
            "AWS_LAMBDA_FUNCTION_VERSION",
        ]
        .into_iter()
        .filter(|name| env(name).is_none())
        .collect();
        if !missing.is_empty() {
            let e = anyhow::anyhow!(
                "AWS_LAMBDA_RUNTIME_API is set but {} not (Lambda sets them all)",
                missing.join(", ")
            );
            lambda_env::report_init_error(&e).await;
            return Err(e);
        }
        // Each invocation goes through the same router; concurrent invocations of one
        // environment (AWS_LAMBDA_MAX_CONCURRENCY > 1) share the model's micro-batcher.
        let served = Served {
            model: model_name.as_str().into(),
            manager: manager.clone(),
        };
        let handler = lambda_http::service_fn(move |req: lambda_http::Request| {
            let router = router.clone();
            let served = served.clone();
            async move { invoke(router, served, req).await }
        });
        // Lambda's SHUTDOWN phase: the extension registered before the first invocation is
        // asked for. The signal is handled even where no extension could be registered (an
        // emulator stopping the function still gets a clean exit).
        let inflight = Arc::new(shutdown::InFlight::default());
        shutdown::register_extension().await;
        shutdown::on_signal(manager.clone(), inflight.clone(), shutdown_budget);
        return lambda_http::lambda_runtime::Runtime::new(lambda_http::Adapter::from(handler))
            .layer(shutdown::CountInvocations::layer(inflight))
            .run_concurrent()
            .await
            .map_err(|e| anyhow::anyhow!("Lambda runtime stopped: {e}"));
    }
    let host = env("TORCHFN_HOST").unwrap_or_else(|| "0.0.0.0".into());
    let port: u16 = env_num("PORT")?.unwrap_or(8080);
    let listener = tokio::net::TcpListener::bind((host.as_str(), port))
        .await
        .with_context(|| format!("could not bind {host}:{port}"))?;
    println!("Inference API bind to: http://{}", listener.local_addr()?);
    api::serve::serve(
        listener,
        router,
        api::serve::Limits::from_env(),
        api::shutdown_signal(),
    )
    .await?;
    tokio::task::spawn_blocking(move || manager.shutdown()).await?;
    Ok(())
}
