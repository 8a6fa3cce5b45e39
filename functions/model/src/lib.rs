//! `torchfn-model`: what every model function runs. One model, configured by the
//! environment, pulled from object storage and loaded once during start-up (Lambda's INIT
//! phase), then served with the same router as the emulator's inference port.
//!
//! Where the model comes from (one of):
//! - `TORCHFN_MODEL_URI`: an archive (`s3://bucket/key.mar`, a path, or a folder holding one
//!   archive, as KServe's storage initializer leaves `/mnt/models`), optionally checked
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
//! `TORCHFN_DEVICE`, `TORCHFN_SHUTDOWN_BUDGET_MS`, `TORCHFN_POLL_SECONDS`, `OMP_NUM_THREADS`
//! (libtorch threads per model thread); logs honour `AWS_LAMBDA_LOG_LEVEL` / `RUST_LOG` and
//! `AWS_LAMBDA_LOG_FORMAT=JSON`. `torchfn-model --help` lists the settings ([`Args`]); each
//! is a flag too, and a blank variable counts as unset.
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
use torchfn_lambda::emf::{self, Metric};
use torchfn_lambda::shutdown;
use torchfn_store::registry::{Registry, VersionStatus};
use torchfn_store::store::{Expect, Location, ObjectStore};

pub mod stage;

/// A model function's settings, from flags or the environment (under Lambda, the function's
/// environment variables); a blank variable counts as unset.
#[derive(Debug, Clone, clap::Parser)]
#[command(version, about)]
pub struct Args {
    /// The archive to serve: `s3://bucket/key.mar`, a path, or a folder holding one archive
    /// (KServe's `/mnt/models`).
    #[arg(long, env = "TORCHFN_MODEL_URI", value_name = "URI")]
    pub model_uri: Option<String>,
    /// The archive's expected SHA-256 (hex), with `--model-uri`.
    #[arg(long, env = "TORCHFN_MODEL_SHA256", value_name = "HEX")]
    pub model_sha256: Option<String>,
    /// The registry to serve a registered model from: `s3://bucket/prefix` or a folder.
    #[arg(long, env = "TORCHFN_REGISTRY", value_name = "URI")]
    pub registry: Option<String>,
    /// The model's name: the one served, and the one looked up in the registry.
    #[arg(long, env = "TORCHFN_MODEL_NAME", value_name = "NAME")]
    pub model_name: Option<String>,
    /// A registered version to serve (pinned); unset, the registry's default is served and
    /// followed.
    #[arg(long, env = "TORCHFN_MODEL_VERSION", value_name = "VERSION")]
    pub model_version: Option<String>,
    /// The handler for archives that name a Python handler: a built-in one, or one the
    /// function registered. Unset, such archives run in the Python backend.
    #[arg(long, env = "TORCHFN_HANDLER", value_name = "NAME")]
    pub handler: Option<String>,
    /// The Python backend's interpreter (with `torchserve` and `torch`), for archives whose
    /// handler has no built-in.
    #[arg(long, env = "TORCHFN_PYTHON", value_name = "PATH")]
    pub python: Option<std::path::PathBuf>,
    /// The most requests in one forward pass.
    #[arg(long, env = "TORCHFN_BATCH_SIZE", value_name = "N")]
    pub batch_size: Option<usize>,
    /// How long a pass waits to fill its batch, in milliseconds.
    #[arg(long, env = "TORCHFN_MAX_BATCH_DELAY_MS", value_name = "MS")]
    pub max_batch_delay_ms: Option<u64>,
    /// The most requests waiting for a pass.
    #[arg(long, env = "TORCHFN_JOB_QUEUE_SIZE", value_name = "N")]
    pub job_queue_size: Option<usize>,
    /// The device to run on (`cpu`, `cuda`, `cuda:N`, …).
    #[arg(long, env = "TORCHFN_DEVICE", value_name = "DEVICE")]
    pub device: Option<String>,
    /// Lambda's SHUTDOWN phase: milliseconds to answer the invocations in flight and clean
    /// up (inside Lambda's 500).
    #[arg(
        long,
        env = "TORCHFN_SHUTDOWN_BUDGET_MS",
        value_name = "MS",
        default_value_t = 400
    )]
    pub shutdown_budget_ms: u64,
    /// How often a function following the registry's default checks it, in seconds.
    #[arg(
        long,
        env = "TORCHFN_POLL_SECONDS",
        value_name = "SECONDS",
        default_value_t = 30
    )]
    pub poll_seconds: u64,
    /// Outside Lambda: the address to serve on.
    #[arg(
        long,
        env = "TORCHFN_HOST",
        value_name = "HOST",
        default_value = "0.0.0.0"
    )]
    pub host: String,
    /// Outside Lambda: the port to serve on.
    #[arg(long, env = "PORT", value_name = "PORT", default_value_t = 8080)]
    pub port: u16,
}

fn settings(args: &Args) -> anyhow::Result<Settings> {
    let mut s = Settings::default();
    if let Some(n) = args.batch_size {
        s.batch_size = n;
    }
    if let Some(ms) = args.max_batch_delay_ms {
        s.max_batch_delay = Duration::from_millis(ms);
    }
    if let Some(n) = args.job_queue_size {
        s.job_queue_size = n;
    }
    if let Some(d) = &args.device {
        s.device = d
            .parse()
            .map_err(|e: String| anyhow::anyhow!("TORCHFN_DEVICE: {e}"))?;
    }
    // Lambda gives each environment /tmp; archives unpack there.
    s.unpack_dir = Some(std::env::temp_dir());
    // Lambda's limit for a synchronous invocation's payload; the plain-HTTP mode keeps it.
    s.max_request_size = 6 * 1024 * 1024;
    s.default_service_handler = args.handler.clone();
    s.python = args.python.clone();
    Ok(s)
}

/// Which archive to load, from the environment (and the registry when one is named).
async fn resolve(args: &Args, store: &ObjectStore) -> anyhow::Result<LoadSpec> {
    let name = args.model_name.clone();
    if let Some(uri) = args.model_uri.clone() {
        let uri = single_archive_in(uri)?;
        let source: Location = uri.parse()?;
        return Ok(LoadSpec {
            url: uri,
            source,
            name,
            loaded_at_startup: true,
            params: Default::default(),
            expect: Expect {
                size: None,
                sha256: args.model_sha256.clone(),
            },
        });
    }
    let (Some(registry), Some(name)) = (&args.registry, name) else {
        bail!(
            "no model configured: set TORCHFN_MODEL_URI (an archive), or TORCHFN_REGISTRY and \
             TORCHFN_MODEL_NAME (a registered model)"
        );
    };
    let registry = Registry::new(store.clone(), registry.parse()?);
    let version = match args.model_version.clone() {
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

/// A local folder that is not itself an unpacked archive (no `MAR-INF`) but holds exactly one
/// archive stands for that archive: KServe's storage initializer downloads an
/// InferenceService's `storageUri` file into `/mnt/models`, and the serving runtime
/// (`deploy/kserve`) names the folder. Anything else is returned as it is.
fn single_archive_in(uri: String) -> anyhow::Result<String> {
    let dir = std::path::Path::new(uri.strip_prefix("file://").unwrap_or(&uri));
    if !dir.is_dir() || dir.join("MAR-INF").exists() {
        return Ok(uri);
    }
    let mut archives: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            p.is_file()
                && [".mar", ".tar.gz", ".tgz", ".zip"]
                    .iter()
                    .any(|x| name.ends_with(x))
        })
        .collect();
    match archives.len() {
        0 => Ok(uri),
        1 => Ok(archives.remove(0).display().to_string()),
        _ => {
            archives.sort();
            bail!(
                "{} holds {} archives ({}); name one in TORCHFN_MODEL_URI",
                dir.display(),
                archives.len(),
                archives
                    .iter()
                    .map(|p| p.file_name().unwrap_or_default().to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    }
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

/// A prediction's CloudWatch Embedded Metric Format line: latency, queue time and batch
/// size, with the model and version as the only dimensions. Nothing for an answer without
/// the batcher's headers (not a prediction).
fn write_emf(served: &Served, latency_us: u128, headers: &axum::http::HeaderMap) {
    let header = |name: &str| -> Option<u64> { headers.get(name)?.to_str().ok()?.parse().ok() };
    let (Some(queue_us), Some(batch)) =
        (header("x-torchfn-queue-us"), header("x-torchfn-batch-size"))
    else {
        return;
    };
    let version = served
        .manager
        .get(&served.model, None)
        .map(|m| m.version.clone())
        .unwrap_or_default();
    emf::write(
        "torchfn",
        &[("model", &served.model), ("version", &version)],
        &[
            Metric {
                name: "Latency",
                unit: "Microseconds",
                value: u64::try_from(latency_us).unwrap_or(u64::MAX),
            },
            Metric {
                name: "QueueTime",
                unit: "Microseconds",
                value: queue_us,
            },
            Metric {
                name: "BatchSize",
                unit: "Count",
                value: batch,
            },
        ],
    );
}

/// One Lambda HTTP event through the router; the answer's body is kept as text when it is
/// UTF-8 (JSON answers) and sent base64-encoded otherwise. API Gateway's stage is taken off
/// the path first (module [`stage`]). A prediction also prints its EMF line to stdout, where
/// Lambda's log capture turns it into metrics.
async fn invoke(
    router: axum::Router,
    served: Served,
    req: lambda_http::Request,
) -> Result<lambda_http::Response<lambda_http::Body>, lambda_http::Error> {
    use tower::ServiceExt;
    let started = std::time::Instant::now();
    let req = stage::strip_stage(req);
    let resp = router.oneshot(req.map(axum::body::Body::new)).await?;
    let (parts, body) = resp.into_parts();
    write_emf(&served, started.elapsed().as_micros(), &parts.headers);
    let bytes = axum::body::to_bytes(body, usize::MAX).await?.to_vec();
    let body = match String::from_utf8(bytes) {
        Ok(text) => lambda_http::Body::Text(text),
        Err(e) => lambda_http::Body::Binary(e.into_bytes()),
    };
    Ok(lambda_http::Response::from_parts(parts, body))
}

/// Runs a model function: its settings parsed first (`--help` answers there), then `setup`,
/// on the calling thread before any other thread starts (register custom handlers there with
/// `torchfn_engine::handler::register`), then everything `torchfn-model` does: the model
/// loaded, and serving under Lambda or over plain HTTP until shut down.
///
/// ```no_run
/// fn main() -> anyhow::Result<()> {
///     torchfn_model::main_with(|| {
///         // torchfn_engine::handler::register("my_handler", |archive| { ... });
///     })
/// }
/// ```
pub fn main_with(setup: impl FnOnce()) -> anyhow::Result<()> {
    // A settings error is reported once logging is up (and, under Lambda, to the Runtime API).
    let args = torchfn_lambda::settings::parse::<Args>();
    setup();
    api::serve::runtime()
        .context("could not start the async runtime")?
        .block_on(run(args))
}

/// Everything done before the first event (Lambda's INIT phase): settings, the archive, the
/// loaded model, the registry watch.
struct Ready {
    args: Args,
    manager: Arc<Manager>,
    model_name: String,
    router: axum::Router,
}

async fn init(args: Result<Args, clap::Error>) -> anyhow::Result<Ready> {
    let args = args.context("invalid settings")?;
    tracing::info!("model function starting");
    // libtorch sets itself up while the archive arrives.
    torchfn_engine::session::warm_libtorch_in_background();
    let settings = settings(&args)?;
    let store = ObjectStore::from_env();
    let spec = resolve(&args, &store).await?;
    let metrics = Arc::new(Metrics::new().context("could not create metrics")?);
    let unpack = std::env::temp_dir();
    let manager = Arc::new(Manager::new(settings, metrics).with_context(|| {
        format!(
            "could not create the unpack folder in {}: archives unpack there, so it must be \
             writable (a container with a read-only root filesystem needs a tmpfs there, on \
             Kubernetes an emptyDir volume; or point TMPDIR elsewhere)",
            unpack.display()
        )
    })?);
    let state = AppState::new(manager.clone());

    // Load before serving (during Lambda's INIT): a model that cannot load fails the start.
    let loader = manager.clone();
    let model = tokio::task::spawn_blocking(move || loader.load(&spec))
        .await?
        .map_err(|e| anyhow::anyhow!("model not loaded: {}", e.message))?;
    tracing::info!(model = %model.name, version = %model.version, "model function ready");
    state.set_ready();
    // Following the registry's default (not pinned): notice a new default while warm.
    if let (Some(root), None) = (&args.registry, &args.model_version) {
        let every = Duration::from_secs(args.poll_seconds);
        let registry = Registry::new(store.clone(), root.parse()?);
        tokio::spawn(follow_default(
            registry,
            manager.clone(),
            model.name.clone(),
            model.version.clone(),
            every,
        ));
    }
    // Lambda sets these; the runtime client cannot start without them.
    torchfn_lambda::check_environment()?;
    Ok(Ready {
        args,
        manager,
        model_name: model.name.clone(),
        router: api::function_router(state),
    })
}

async fn run(args: Result<Args, clap::Error>) -> anyhow::Result<()> {
    torchfn_lambda::init_logging();
    let Ready {
        args,
        manager,
        model_name,
        router,
    } = match init(args).await {
        Ok(ready) => ready,
        Err(e) => {
            // Under Lambda the pending invocation then fails at once with this message.
            torchfn_lambda::report_init_error(&e).await;
            return Err(e);
        }
    };

    if torchfn_lambda::in_lambda() {
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
        // emulator stopping the function still gets a clean exit): the invocations in flight
        // answered, the model's workers stopped, the unpacked archive removed from /tmp.
        let inflight = Arc::new(shutdown::InFlight::default());
        shutdown::register_extension().await;
        let workers = manager.clone();
        let stopping = shutdown::on_signal(
            api::shutdown_signal(),
            inflight.clone(),
            Duration::from_millis(args.shutdown_budget_ms),
            shutdown::Cleanup {
                stop: Box::new(move || workers.shutdown()),
                remove: Some(manager.unpack_root().to_path_buf()),
            },
        );
        let ran = lambda_http::lambda_runtime::Runtime::new(lambda_http::Adapter::from(handler))
            .layer(shutdown::CountInvocations::layer(inflight))
            .run_concurrent()
            .await;
        // cargo-lambda closes its Runtime API as it signals the function: the SHUTDOWN phase
        // then still runs to its end (it exits the process) rather than being cut short here.
        stopping.outlast().await;
        return ran.map_err(|e| anyhow::anyhow!("Lambda runtime stopped: {e}"));
    }
    let (host, port) = (args.host.as_str(), args.port);
    let listener = tokio::net::TcpListener::bind((host, port))
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::single_archive_in;

    #[test]
    fn a_folder_holding_one_archive_stands_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().display().to_string();
        // Empty: left as it is (loading it then says what is wrong).
        assert_eq!(single_archive_in(path.clone()).unwrap(), path);
        std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
        std::fs::write(dir.path().join("classifier.mar"), "x").unwrap();
        let one = dir.path().join("classifier.mar").display().to_string();
        assert_eq!(single_archive_in(path.clone()).unwrap(), one);
        assert_eq!(single_archive_in(format!("file://{path}")).unwrap(), one);
        // An archive path, an S3 URI and an unpacked archive are what they say.
        assert_eq!(single_archive_in(one.clone()).unwrap(), one);
        assert_eq!(
            single_archive_in("s3://b/k.mar".into()).unwrap(),
            "s3://b/k.mar"
        );
        std::fs::write(dir.path().join("other.tar.gz"), "x").unwrap();
        let err = single_archive_in(path.clone()).unwrap_err().to_string();
        assert!(
            err.contains("2 archives (classifier.mar, other.tar.gz)"),
            "{err}"
        );
        std::fs::create_dir(dir.path().join("MAR-INF")).unwrap();
        assert_eq!(single_archive_in(path.clone()).unwrap(), path);
    }
}
