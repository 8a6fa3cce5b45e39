//! `torchfn-local`: TorchServe's three REST APIs on one machine, for development.
//!
//! Run (after `scripts/setup`):
//!     cargo run --release -p torchfn-local -- --model-store model_store \
//!         --models classifier=classifier.mar --ts-config config.properties
//! It prints `Inference API bind to: http://127.0.0.1:8080` (and the management and metrics
//! addresses), loads the models, and answers `curl localhost:8080/ping` with Healthy.
//! Ctrl-C or SIGTERM stops it after in-flight requests finish.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

mod convert;

use anyhow::{bail, Context};
use clap::Parser;
use tokio::net::TcpListener;
use torchfn_archive::properties;
use torchfn_archive::settings::{DevicePreference, Settings};
use torchfn_engine::manager::Manager;
use torchfn_engine::metrics::Metrics;
use torchfn_http::{self as api, AppState};

// Request handling allocates many small, short-lived buffers across threads; mimalloc does
// that with less contention than glibc's malloc (the benchmark's profile showed malloc/free
// at ~20% of the HTTP threads' time). With the workspace's `override` feature it is the
// process's malloc as well, so libtorch's tensors are allocated by it too.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Flags mirror `torchserve --start`; every flag can also be set in the environment.
#[derive(Parser, Debug)]
#[command(
    name = "torchfn-local",
    version,
    about = "torchfn's local emulator of TorchServe's REST APIs"
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,

    /// Folder holding model archives, or `s3://bucket/prefix` (config.properties:
    /// model_store). S3 settings come from the standard AWS environment.
    #[arg(long, env = "TORCHFN_MODEL_STORE")]
    model_store: Option<PathBuf>,

    /// Models to load at start: `name=file.mar`, `file.mar` or `all`; repeat or separate
    /// with commas (config.properties: load_models).
    #[arg(long, num_args = 1.., value_delimiter = ',', env = "TORCHFN_MODELS")]
    models: Vec<String>,

    /// TorchServe config.properties. TS_CONFIG_FILE, when set, wins, as in TorchServe.
    #[arg(long = "ts-config")]
    ts_config: Option<PathBuf>,

    #[arg(
        long = "handler",
        help = handler_help(),
        value_name = "MODEL=HANDLER",
        env = "TORCHFN_HANDLERS",
        value_delimiter = ','
    )]
    handlers: Vec<String>,

    /// The Python interpreter for archives served by the Python backend (their own handler
    /// files, eager-mode models): one with TorchServe's `torchserve` package and torch.
    /// Default: the project venv this binary was built with, else `python3`
    /// (config.properties: torchfn_python).
    #[arg(long, env = "TORCHFN_PYTHON", value_name = "PATH")]
    python: Option<PathBuf>,

    /// Where models run: auto (CUDA when libtorch sees a GPU), cpu, cuda or cuda:N.
    #[arg(long, env = "TORCHFN_DEVICE")]
    device: Option<DevicePreference>,

    /// Register, unregister and scale without a token even when the management API is bound
    /// to a non-loopback address (TorchServe's flag; config.properties:
    /// disable_token_authorization).
    #[arg(long = "disable-token-auth")]
    disable_token_auth: bool,

    /// TorchServe's flag: serve register and unregister (on unless config.properties says
    /// enable_model_api=false).
    #[arg(long = "enable-model-api")]
    enable_model_api: bool,

    /// Follow an object-store registry (`s3://bucket/prefix` or a folder): the versions the
    /// registrar records there are loaded, made default and unloaded without a restart
    /// (config.properties: torchfn_registry, torchfn_registry_poll_seconds).
    #[arg(long, env = "TORCHFN_REGISTRY")]
    registry: Option<String>,

    /// Log as JSON lines (level from RUST_LOG, default info).
    #[arg(long, env = "TORCHFN_LOG_JSON")]
    log_json: bool,

    /// Accepted for `torchserve` command-line compatibility; torchfn-local always runs in
    /// the foreground.
    #[arg(long, hide = true)]
    start: bool,
    #[arg(long, hide = true)]
    foreground: bool,
    #[arg(long = "ncs", alias = "no-config-snapshots", hide = true)]
    ncs: bool,
}

/// `--handler`'s help, listing every built-in handler (torchfn_archive::handlers).
fn handler_help() -> String {
    format!(
        "Serve a model with a Rust built-in handler instead of the Python backend: \
         `--handler classifier=classifier`; without `MODEL=`, the built-in for every archive \
         whose manifest names a Python handler file (config.properties: \
         default_service_handler). Repeatable. Built-ins: {}",
        torchfn_archive::handlers::names_line()
    )
}

/// Tools besides the server.
#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Convert an eager-mode archive (--model-file with a state_dict) into a TorchScript
    /// archive torchfn serves: `torchfn-local convert model.mar --out model_store`.
    Convert(convert::ConvertArgs),
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Settings from config.properties, then command-line flags over them.
fn settings(args: &Args) -> anyhow::Result<Settings> {
    let mut s = Settings::default();
    let config = std::env::var_os("TS_CONFIG_FILE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| args.ts_config.clone())
        .or_else(|| {
            let p = PathBuf::from("config.properties");
            p.exists().then_some(p)
        });
    if let Some(path) = &config {
        let mut props = properties::read(path)?;
        // With enable_envvars_config=true in the file, TS_* variables override its keys.
        let (from_env, unknown) = Settings::env_overrides(&mut props, std::env::vars());
        if !from_env.is_empty() {
            tracing::info!(keys = ?from_env, "config.properties keys set from TS_* environment variables");
        }
        if !unknown.is_empty() {
            tracing::warn!(variables = ?unknown, "TS_* environment variables that name no configuration key; they are ignored");
        }
        s.apply_properties(&props)
            .with_context(|| format!("could not use {}", path.display()))?;
        tracing::info!(config = %path.display(), "configuration read");
    }
    if let Some(store) = &args.model_store {
        s.model_store = Some(store.clone());
    }
    if !args.models.is_empty() {
        s.load_models = args.models.clone();
    }
    if let Some(p) = &args.python {
        s.python = Some(p.clone());
    }
    if let Some(d) = args.device {
        s.device = d;
    }
    if let Some(r) = &args.registry {
        s.registry = Some(r.clone());
    }
    if args.disable_token_auth {
        s.disable_token_authorization = true;
    }
    if args.enable_model_api {
        s.enable_model_api = Some(true);
    }
    let mut handlers = BTreeMap::new();
    for h in &args.handlers {
        match h.split_once('=') {
            Some((model, handler)) => {
                handlers.insert(model.trim().to_string(), handler.trim().to_string());
            }
            None if !h.trim().is_empty() => s.default_service_handler = Some(h.trim().to_string()),
            None => bail!("--handler takes MODEL=HANDLER or HANDLER, got an empty value"),
        }
    }
    s.handlers.extend(handlers);
    if !s.unknown_keys.is_empty() {
        tracing::warn!(keys = ?s.unknown_keys, "config.properties keys torchfn does not know; they are ignored");
    }
    if !s.inert_keys.is_empty() {
        tracing::info!(keys = ?s.inert_keys, "TorchServe keys accepted that have no effect in torchfn");
    }
    if let Some(store) = &s.model_store {
        if !store.to_string_lossy().starts_with("s3://") && !store.is_dir() {
            bail!("model store {} is not a folder", store.display());
        }
    }
    Ok(s)
}

async fn bind(what: &str, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("could not bind the {what} API to {addr}"))?;
    let local = listener.local_addr()?;
    // Tests and scripts read these lines to find ports chosen by the OS.
    println!("{what} API bind to: http://{local}");
    Ok(listener)
}

fn main() -> anyhow::Result<()> {
    api::serve::runtime()
        .context("could not start the async runtime")?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(Command::Convert(c)) = &args.command {
        return convert::run(c);
    }
    init_logging(args.log_json);
    // libtorch sets itself up while the start-up archives unpack.
    torchfn_engine::session::warm_libtorch_in_background();
    let settings = settings(&args)?;
    let metrics = Arc::new(Metrics::new().context("could not create metrics")?);
    let manager = Arc::new(
        Manager::new(settings.clone(), metrics).context("could not create the unpack folder")?,
    );
    let specs = manager
        .startup_specs()
        .map_err(|e| anyhow::anyhow!("{}", e.message))?;
    let access = api::security::Access::decide(&settings);
    if let Some(path) = access
        .write_key_file(&std::env::current_dir().unwrap_or_else(|_| PathBuf::from(".")))
        .context("could not write key_file.json")?
    {
        tracing::warn!(
            key_file = %path.display(),
            management = %settings.management_address,
            "the management API is reachable from the network: registering, unregistering and \
             scaling need `Authorization: Bearer <management key>` from the key file \
             (--disable-token-auth turns this off)"
        );
    }
    let state = AppState::new(manager.clone()).with_access(access);

    let inference = bind("Inference", settings.inference_address).await?;
    let management = bind("Management", settings.management_address).await?;
    let metrics_l = bind("Metrics", settings.metrics_address).await?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let serve = |listener: TcpListener, router: axum::Router| {
        let mut rx = stop_rx.clone();
        tokio::spawn(async move {
            api::serve::serve(
                listener,
                router,
                api::serve::Limits::from_env(),
                async move {
                    let _ = rx.wait_for(|stop| *stop).await;
                },
            )
            .await
        })
    };
    let servers = [
        serve(inference, api::inference_router(state.clone())),
        serve(management, api::management_router(state.clone())),
        serve(metrics_l, api::metrics_router(state.clone())),
    ];

    // Load the start-up models off the async threads; /ping turns Healthy when done.
    let loader = {
        let manager = manager.clone();
        let state = state.clone();
        tokio::task::spawn_blocking(move || {
            for spec in specs {
                match manager.load(&spec) {
                    Ok(_) => {}
                    Err(e) => {
                        state.record_startup_failure();
                        tracing::error!(archive = %spec.url, "model not loaded: {}", e.message)
                    }
                }
            }
            state.set_ready();
            if state.is_healthy() {
                tracing::info!("start-up models loaded; /ping reports Healthy");
            } else {
                tracing::warn!(
                    "start-up models loaded, some failed: /ping reports Unhealthy (500) so \
                     that readiness probes keep traffic away"
                );
            }
        })
    };
    let follower = match &settings.registry {
        Some(root) => {
            let root: torchfn_store::store::Location = root
                .parse()
                .with_context(|| format!("torchfn_registry {root} is not a location"))?;
            let registry = torchfn_store::registry::Registry::new(
                torchfn_store::store::ObjectStore::from_env(),
                root,
            );
            tracing::info!(registry = %registry.root(), every_s = settings.registry_poll.as_secs(), "following the registry");
            Some(tokio::spawn(torchfn_engine::follow::follow(
                registry,
                manager.clone(),
                settings.registry_poll,
            )))
        }
        None => None,
    };

    api::shutdown_signal().await;
    if let Some(f) = follower {
        f.abort();
    }
    let _ = stop_tx.send(true);
    for s in servers {
        if let Ok(Err(e)) = s.await {
            tracing::warn!(error = %e, "listener stopped with an error");
        }
    }
    let _ = loader.await;
    tokio::task::spawn_blocking(move || manager.shutdown()).await?;
    tracing::info!("stopped");
    Ok(())
}
