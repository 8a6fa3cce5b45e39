//! The models a server has loaded: versions per model, the default version, loading from
//! archives, and what describe and list report.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Map, Value};

use crate::batcher::{BatchConfig, BatchMetrics, Batcher};
use crate::error::{ErrorKind, ServeError};
use crate::handler::Handler;
use crate::metrics::{Metrics, RequestMetrics};
use crate::python::{self, Choice};
use crate::session::{choose_device, threads_per_worker, warm_up_and_pick_threads, Session};
use torchfn_archive::mar::{self, Limits, ModelArchive};
use torchfn_archive::model_config::ParallelType;
use torchfn_archive::settings::Settings;
use torchfn_python::{Pool, PoolConfig, WorkerConfig};
use torchfn_store::store::{DownloadOptions, Expect, Location, ObjectStore};

/// Where to load a model version from, and under which name.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// The archive as the user named it (`modelUrl` in list and describe).
    pub url: String,
    /// Where the archive is: a local path, or an object in S3 (downloaded before unpacking).
    pub source: Location,
    /// What a downloaded archive must match (size and SHA-256 recorded for the version).
    pub expect: Expect,
    /// Overrides the manifest's model name.
    pub name: Option<String>,
    pub loaded_at_startup: bool,
    /// Settings given with a registration (`POST /models`), over everything else.
    pub params: RegisterParams,
}

/// The settings `POST /models` may give; each overrides the model-config YAML, which
/// overrides the config.properties `models` JSON, which overrides the server's defaults.
#[derive(Debug, Clone, Default)]
pub struct RegisterParams {
    pub batch_size: Option<usize>,
    pub max_batch_delay_ms: Option<u64>,
    /// Workers to start with (0 is allowed: the model then waits to be scaled up).
    pub initial_workers: Option<usize>,
    pub response_timeout_s: Option<u64>,
    /// How long the version's workers may take to load (TorchServe applies it after the
    /// model-config YAML and the `models` JSON).
    pub startup_timeout_s: Option<u64>,
    /// A built-in handler, over the manifest's and `default_service_handler`.
    pub handler: Option<String>,
    /// A registration through the management API: without `initial_workers` (or a
    /// model-config minimum) it starts `default_workers_per_model` workers, 0 when unset, as
    /// TorchServe does; other loads start at least 1.
    pub from_rest: bool,
}

/// The settings one model version runs with, after precedence (model-config YAML over the
/// config.properties `models` JSON over server-wide defaults).
#[derive(Debug, Clone)]
pub struct ModelSettings {
    pub batch: BatchConfig,
    pub min_workers: usize,
    pub max_workers: usize,
    pub response_timeout: Duration,
    pub startup_timeout: Duration,
}

/// What runs a model version's requests.
pub enum Runner {
    /// A Rust handler on a TorchScript session, on torchfn's batcher (the fast path).
    Torch {
        handler: Arc<dyn Handler>,
        session: Arc<Session>,
        batcher: Box<Batcher>,
    },
    /// TorchServe's Python backend: the archive's own handler, in worker processes.
    Python {
        /// The handler as the worker gets it (`handler.py`, `my_handler:handle`, ...).
        handler: String,
        pool: Pool,
        device: tch::Device,
    },
}

/// A runner's workers, stopping (see [`ModelVersion`]'s `Drop`).
enum Closing {
    Torch(crate::batcher::Closing),
    Python(torchfn_python::pool::Closing),
}

impl Closing {
    fn join(self) {
        match self {
            Closing::Torch(c) => c.join(),
            Closing::Python(c) => c.join(),
        }
    }
}

/// One loaded model version.
pub struct ModelVersion {
    pub name: String,
    pub version: String,
    pub url: String,
    /// Shared only so that a retired version's clean-up thread can be the one to free it.
    pub archive: Arc<ModelArchive>,
    pub runner: Runner,
    pub settings: ModelSettings,
    /// Request metrics for URLs without a version (`default`) and with this version, made
    /// on the first such request (as TorchServe does: a version nobody asked for by name
    /// shows no series of its own).
    request_metrics: [std::sync::OnceLock<RequestMetrics>; 2],
    metrics: Arc<Metrics>,
    pub loaded_at_startup: bool,
    pub started_at: SystemTime,
    pub load_time: Duration,
    /// `minWorkers` and `maxWorkers` now (the scale API changes them).
    pub worker_range: std::sync::Mutex<(usize, usize)>,
    /// Set by [`retire`]. The last field, so the last dropped (see `Drop`).
    retirement: Retirement,
}

/// A version's retirement: who to tell when its clean-up is done, and the signal that the
/// version's own fields are gone.
#[derive(Default)]
struct Retirement {
    /// Set by [`retire`]; told once the clean-up is done.
    done: std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    /// Set when a retired version drops; dropping it (with this field, the version's last)
    /// tells the clean-up thread that only its own references remain.
    fields_gone: Option<crossbeam_channel::Sender<()>>,
}

impl Drop for ModelVersion {
    /// A retired version is cleaned up where nothing waits on it: wherever its last
    /// reference goes (an async worker answering the last request, say), its workers are
    /// only told to stop, and a thread of its own joins them and frees the session, the
    /// handler and the unpacked archive. A version that was not retired (the manager shutting
    /// down, a failed load) is dropped in place, as any value.
    fn drop(&mut self) {
        let done = self
            .retirement
            .done
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(done) = done else {
            return;
        };
        let (closing, kept_session, kept_handler) = match &self.runner {
            Runner::Torch {
                handler,
                session,
                batcher,
            } => (
                Closing::Torch(batcher.close()),
                Some(session.clone()),
                Some(handler.clone()),
            ),
            Runner::Python { pool, .. } => (Closing::Python(pool.close()), None, None),
        };
        // These clones outlive the version's own fields (which drop after this function),
        // so the clean-up thread is where the model's memory and files are freed.
        let kept = (kept_session, kept_handler, self.archive.clone());
        let (gone_tx, gone_rx) = crossbeam_channel::bounded::<()>(0);
        self.retirement.fields_gone = Some(gone_tx);
        let (name, version) = (self.name.clone(), self.version.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("{name}-retire"))
            .spawn(move || {
                closing.join();
                // Disconnected once the version's last field has dropped.
                let _ = gone_rx.recv();
                drop(kept);
                tracing::info!(model = %name, version = %version, "model version retired");
                let _ = done.send(());
            });
        if let Err(e) = spawned {
            tracing::error!(model = %self.name, version = %self.version, error = %e,
                "cannot start the thread that retires a model version; it is freed here");
        }
    }
}

/// Tells when a retired version has been cleaned up (see [`retire`]). Dropping it changes
/// nothing.
#[derive(Debug)]
pub struct Retired(tokio::sync::oneshot::Receiver<()>);

impl Retired {
    /// Waits until the version's workers have stopped and its session, handler and unpacked
    /// archive are freed.
    pub async fn finished(self) {
        let _ = self.0.await;
    }
}

impl ModelVersion {
    /// The request metrics of a request whose URL named this version (`version_given`) or
    /// none (`default`).
    pub fn request_metrics(&self, version_given: bool) -> &RequestMetrics {
        self.request_metrics[usize::from(version_given)].get_or_init(|| {
            let label = if version_given {
                self.version.as_str()
            } else {
                "default"
            };
            self.metrics.for_requests(&self.name, &self.version, label)
        })
    }

    /// The handler's name, as describe reports it.
    pub fn handler_name(&self) -> &str {
        match &self.runner {
            Runner::Torch { handler, .. } => handler.name(),
            Runner::Python { handler, .. } => handler,
        }
    }

    /// The Rust handler, when a built-in serves this version.
    pub fn handler(&self) -> Option<&Arc<dyn Handler>> {
        match &self.runner {
            Runner::Torch { handler, .. } => Some(handler),
            Runner::Python { .. } => None,
        }
    }

    /// The batcher, when a built-in serves this version.
    pub fn batcher(&self) -> Option<&Batcher> {
        match &self.runner {
            Runner::Torch { batcher, .. } => Some(batcher.as_ref()),
            Runner::Python { .. } => None,
        }
    }

    /// The Python workers, when the Python backend serves this version.
    pub fn pool(&self) -> Option<&Pool> {
        match &self.runner {
            Runner::Python { pool, .. } => Some(pool),
            Runner::Torch { .. } => None,
        }
    }

    /// Where the model runs.
    pub fn device(&self) -> tch::Device {
        match &self.runner {
            Runner::Torch { session, .. } => session.device(),
            Runner::Python { device, .. } => *device,
        }
    }

    /// Workers running (for Python, threads with a process or starting one).
    pub fn workers(&self) -> usize {
        match &self.runner {
            Runner::Torch { batcher, .. } => batcher.workers(),
            Runner::Python { pool, .. } => pool.workers(),
        }
    }

    /// Workers ready to serve: Rust workers once started; Python workers once their process
    /// has loaded the model.
    pub fn live_workers(&self) -> usize {
        match &self.runner {
            Runner::Torch { batcher, .. } => batcher.workers(),
            Runner::Python { pool, .. } => pool.live_workers(),
        }
    }

    /// Whether the version has the workers its minimum asks for (a Python worker that is
    /// restarting counts during its recovery window, as in TorchServe's health rule).
    pub fn is_healthy(&self) -> bool {
        let (min, _) = self.worker_range();
        let healthy = match &self.runner {
            Runner::Torch { batcher, .. } => batcher.workers(),
            Runner::Python { pool, .. } => pool.healthy_workers(),
        };
        healthy >= min
    }

    /// Requests waiting for a worker.
    pub fn pending(&self) -> usize {
        match &self.runner {
            Runner::Torch { batcher, .. } => batcher.pending(),
            Runner::Python { pool, .. } => pool.pending(),
        }
    }

    /// Runs `n` workers; Python workers started here must load the model before this returns
    /// (blocking). None of them starting is the error; when only some start, fewer than `n`
    /// run and the count returned says so.
    pub fn scale_to(&self, n: usize) -> Result<usize, String> {
        match &self.runner {
            Runner::Torch { batcher, .. } => batcher.scale(n).map_err(|e| e.to_string()),
            Runner::Python { pool, .. } => pool.scale_and_wait(n).map_err(|e| e.to_string()),
        }
    }

    /// Stops taking requests, answers what is queued and stops the workers. Blocking.
    pub fn shutdown(&self) {
        match &self.runner {
            Runner::Torch { batcher, .. } => batcher.shutdown(),
            Runner::Python { pool, .. } => pool.shutdown(),
        }
    }

    /// `(minWorkers, maxWorkers)`.
    pub fn worker_range(&self) -> (usize, usize) {
        *self.worker_range.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// TorchServe's describe entry, fields in TorchServe's order.
    pub fn describe(&self) -> Value {
        let cfg = self.archive.config();
        let s = &self.settings;
        let device = self.device();
        let on_gpu = device.is_cuda();
        let mut m = Map::new();
        m.insert("modelName".into(), json!(self.name));
        m.insert("modelVersion".into(), json!(self.version));
        m.insert("modelUrl".into(), json!(self.url));
        m.insert(
            "runtime".into(),
            json!(self.archive.manifest().runtime.as_str()),
        );
        let (min_workers, max_workers) = self.worker_range();
        m.insert("minWorkers".into(), json!(min_workers));
        m.insert("maxWorkers".into(), json!(max_workers));
        m.insert("batchSize".into(), json!(s.batch.batch_size));
        m.insert(
            "maxBatchDelay".into(),
            json!(s.batch.max_batch_delay.as_millis() as u64),
        );
        m.insert(
            "responseTimeout".into(),
            json!(s.response_timeout.as_secs()),
        );
        m.insert("startupTimeout".into(), json!(s.startup_timeout.as_secs()));
        m.insert(
            "maxRetryTimeoutInSec".into(),
            json!(cfg.and_then(|c| c.max_retry_timeout_in_sec).unwrap_or(300)),
        );
        m.insert(
            "clientTimeoutInMills".into(),
            json!(cfg.and_then(|c| c.client_timeout_in_mills).unwrap_or(0)),
        );
        m.insert(
            "parallelType".into(),
            json!(match cfg.and_then(|c| c.parallel_type) {
                None => "",
                Some(ParallelType::Pp) => "pp",
                Some(ParallelType::Tp) => "tp",
                Some(ParallelType::PpTp) => "pptp",
                Some(ParallelType::Custom) => "custom",
            }),
        );
        m.insert(
            "parallelLevel".into(),
            json!(cfg.and_then(|c| c.parallel_level).unwrap_or(0)),
        );
        m.insert(
            "deviceType".into(),
            json!(if on_gpu { "gpu" } else { "cpu" }),
        );
        if let tch::Device::Cuda(i) = device {
            m.insert("deviceIds".into(), json!([i]));
        }
        m.insert("continuousBatching".into(), json!(false));
        m.insert("useJobTicket".into(), json!(false));
        m.insert("useVenv".into(), json!(false));
        m.insert("stateful".into(), json!(false));
        m.insert("sequenceMaxIdleMSec".into(), json!(0));
        m.insert("sequenceTimeoutMSec".into(), json!(0));
        m.insert("maxNumSequence".into(), json!(0));
        m.insert("maxSequenceJobQueueSize".into(), json!(0));
        m.insert("loadedAtStartup".into(), json!(self.loaded_at_startup));
        let rss = resident_memory_bytes();
        let start = format_time(self.started_at);
        let workers: Vec<Value> = (0..self.workers())
            .map(|i| {
                json!({
                    "id": format!("{}", 9000 + i),
                    "startTime": start,
                    "status": "READY",
                    "memoryUsage": rss,
                    "pid": std::process::id(),
                    "gpu": on_gpu,
                    "gpuUsage": if on_gpu { format!("{device:?}") } else { "N/A".to_string() },
                })
            })
            .collect();
        m.insert("workers".into(), Value::Array(workers));
        let pending = self.pending();
        m.insert(
            "jobQueueStatus".into(),
            json!({
                "remainingCapacity": s.batch.queue_size.saturating_sub(pending),
                "pendingRequests": pending,
            }),
        );
        // torchfn's own fields, after TorchServe's.
        m.insert("handler".into(), json!(self.handler_name()));
        m.insert(
            "loadTimeMs".into(),
            json!((self.load_time.as_secs_f64() * 1e3).round()),
        );
        Value::Object(m)
    }
}

struct Family {
    versions: BTreeMap<String, Arc<ModelVersion>>,
    default: String,
}

/// All loaded models.
pub struct Manager {
    settings: Settings,
    metrics: Arc<Metrics>,
    models: RwLock<BTreeMap<String, Family>>,
    unpack_root: tempfile::TempDir,
    limits: Limits,
    objects: ObjectStore,
}

impl Manager {
    pub fn new(settings: Settings, metrics: Arc<Metrics>) -> std::io::Result<Self> {
        let parent = settings
            .unpack_dir
            .clone()
            .unwrap_or_else(std::env::temp_dir);
        std::fs::create_dir_all(&parent)?;
        let unpack_root = tempfile::Builder::new()
            .prefix("torchfn-models-")
            .tempdir_in(parent)?;
        let model_metrics = match &settings.metrics_config {
            None => torchfn_archive::metrics_config::default_model_metrics(),
            Some(path) => std::fs::read_to_string(path)
                .map_err(|e| e.to_string())
                .and_then(|text| torchfn_archive::metrics_config::parse_model_metrics(&text))
                .map_err(|e| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("metrics_config {}: {e}", path.display()),
                    )
                })?,
        };
        metrics
            .declare_model_metrics(&model_metrics, settings.model_metrics_auto_detect)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
        Ok(Self {
            limits: settings.archive_limits,
            settings,
            metrics,
            models: RwLock::new(BTreeMap::new()),
            unpack_root,
            objects: ObjectStore::from_env(),
        })
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The folder every archive of this manager unpacks under (removed when the manager is
    /// dropped; a process that exits without dropping it removes it itself).
    pub fn unpack_root(&self) -> &Path {
        self.unpack_root.path()
    }

    /// [`Manager::startup_specs`] for async callers: it runs on a blocking thread.
    pub async fn startup_specs_async(self: &Arc<Self>) -> Result<Vec<LoadSpec>, ServeError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.startup_specs())
            .await
            .map_err(|e| {
                ServeError::internal(format!("listing the start-up models stopped: {e}"))
            })?
    }

    /// The archives named by `load_models` / `--models`, resolved against the model store
    /// (a folder or an `s3://bucket/prefix`). Blocking (it lists the store): call it from a
    /// blocking thread or outside a tokio runtime; async callers use
    /// [`Manager::startup_specs_async`].
    pub fn startup_specs(&self) -> Result<Vec<LoadSpec>, ServeError> {
        let mut specs = Vec::new();
        for entry in &self.settings.load_models {
            if entry == "all" {
                let store = self.store()?;
                let found: Vec<Location> = match &store {
                    Location::File(dir) => {
                        let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
                            .map_err(|e| {
                                ServeError::internal(format!(
                                    "cannot list model store {}: {e}",
                                    dir.display()
                                ))
                            })?
                            .filter_map(Result::ok)
                            .map(|e| e.path())
                            .filter(|p| p.is_dir() || is_archive_name(&p.to_string_lossy()))
                            .filter(|p| !file_name(&p.to_string_lossy()).starts_with('.'))
                            .collect();
                        found.sort();
                        found.into_iter().map(Location::File).collect()
                    }
                    Location::S3 { .. } => {
                        let (objects, prefix) = (self.objects.clone(), store.clone());
                        let listed = wait_for(async move { objects.list(&prefix).await })?
                            .map_err(|e| {
                                ServeError::internal(format!(
                                    "cannot list model store {store}: {e}"
                                ))
                            })?;
                        let mut found: Vec<Location> = listed
                            .into_iter()
                            .map(|(l, _)| l)
                            .filter(|l| {
                                let text = l.to_string();
                                is_archive_name(&text) && !file_name(&text).starts_with('.')
                            })
                            .collect();
                        found.sort_by_key(ToString::to_string);
                        found
                    }
                };
                for source in found {
                    specs.push(LoadSpec {
                        url: file_name(&source.to_string()).to_string(),
                        source,
                        expect: Expect::default(),
                        name: None,
                        loaded_at_startup: true,
                        params: Default::default(),
                    });
                }
                continue;
            }
            let (name, file) = match entry.split_once('=') {
                Some((n, f)) => (Some(n.trim().to_string()), f.trim()),
                None => (None, entry.as_str()),
            };
            let source = if file.starts_with("s3://") || file.starts_with("file://") {
                file.parse::<Location>()
                    .map_err(|e| ServeError::new(ErrorKind::ModelNotFound, e.to_string()))?
            } else if Path::new(file).is_absolute() {
                Location::File(PathBuf::from(file))
            } else {
                self.store()?.join(file)
            };
            specs.push(LoadSpec {
                url: file.to_string(),
                source,
                expect: Expect::default(),
                name,
                loaded_at_startup: true,
                params: Default::default(),
            });
        }
        Ok(specs)
    }

    fn store(&self) -> Result<Location, ServeError> {
        let store = self.settings.model_store.as_deref().ok_or_else(|| {
            ServeError::new(
                ErrorKind::ModelNotFound,
                "Model store has not been configured: pass --model-store DIR or set model_store",
            )
        })?;
        store
            .to_string_lossy()
            .parse::<Location>()
            .map_err(|e| ServeError::new(ErrorKind::ModelNotFound, e.to_string()))
    }

    /// Opens the archive: a local one in place; an S3 object is downloaded into the unpack
    /// folder and unpacked while it downloads (the parts land in any order; the unpacker's
    /// reads wait for theirs). A download that fails its size or checksum check fails the
    /// load, and what was unpacked from it is removed.
    fn open_archive(&self, spec: &LoadSpec) -> Result<mar::ModelArchive, ServeError> {
        let remote = match &spec.source {
            Location::File(path) => {
                if !path.exists() {
                    return Err(ServeError::new(
                        ErrorKind::ModelNotFound,
                        format!("Model not found at: {}", spec.url),
                    ));
                }
                return Ok(mar::open_with(
                    path,
                    self.unpack_root.path(),
                    &self.limits,
                    true,
                )?);
            }
            remote => remote,
        };
        let dest = tempfile::Builder::new()
            .prefix(".download-")
            .tempfile_in(self.unpack_root.path())
            .map_err(|e| ServeError::internal(format!("cannot create a download file: {e}")))?
            .into_temp_path();
        let (root, limits) = (self.unpack_root.path().to_path_buf(), self.limits);
        let label = PathBuf::from(remote.to_string());
        let (objects, from, to, expect) = (
            self.objects.clone(),
            remote.clone(),
            dest.to_path_buf(),
            spec.expect.clone(),
        );
        let downloaded = wait_for(async move {
            objects
                .download_consuming(
                    &from,
                    &to,
                    expect,
                    DownloadOptions::default(),
                    move |reopen| mar::open_archive_with(&label, &*reopen, &root, &limits, true),
                )
                .await
        })?;
        // The unpacked folder is what serves; the downloaded archive is not needed.
        drop(dest);
        let (report, archive) = downloaded.map_err(|e| {
            tracing::error!(source = %remote, error = %e, "archive download failed");
            if e.is_not_found() {
                ServeError::new(
                    ErrorKind::ModelNotFound,
                    format!("Model not found at: {remote}"),
                )
            } else {
                ServeError::new(
                    ErrorKind::DownloadArchive,
                    format!("Failed to download archive from: {remote}: {e}"),
                )
            }
        })?;
        tracing::info!(
            source = %remote,
            bytes = report.bytes,
            sha256 = %report.sha256,
            ms = report.elapsed.as_secs_f64() * 1e3,
            "archive downloaded"
        );
        Ok(archive?)
    }

    /// Loads one model version: unpacks the archive, loads the TorchScript module and
    /// starts its workers. Blocking: call it from a blocking thread (`spawn_blocking`) or
    /// outside a tokio runtime. An archive in S3 downloads as a task on the runtime (or on a
    /// small runtime of its own when there is none) while this thread waits for it.
    pub fn load(&self, spec: &LoadSpec) -> Result<Arc<ModelVersion>, ServeError> {
        let started = Instant::now();
        let archive = self.open_archive(spec)?;
        let unpacked = started.elapsed();
        let manifest = archive.manifest();
        let name = spec
            .name
            .clone()
            .unwrap_or_else(|| manifest.model_name().to_string());
        let version = manifest.model_version().to_string();
        if self.get(&name, Some(&version)).is_ok() {
            return Err(ServeError::new(
                ErrorKind::Conflict,
                format!("Model version {version} is already registered for model {name}"),
            ));
        }
        // A registration's own handler, then what is configured for the name it is served
        // under, then for the name its manifest gives (the same archive registered under
        // another name keeps its handler).
        let configured = spec
            .params
            .handler
            .as_deref()
            .or(self.settings.handler_for(&name, &version))
            .or(self.settings.handler_for(manifest.model_name(), &version));
        let choice = python::choose(
            &archive,
            &name,
            configured,
            self.settings.default_service_handler.as_deref(),
        )?;
        let mut settings = self.model_settings(&name, &version, &archive, &spec.params);
        let cfg = archive.config();
        let device = choose_device(self.settings.device, cfg.and_then(|c| c.device_type));
        let (runner, warm_up, session_loaded) = match choice {
            Choice::Builtin(handler) => {
                let Some(serialized) = manifest.model.serialized_file.clone() else {
                    return Err(ServeError::new(
                        ErrorKind::InvalidModel,
                        format!("model {name}: the manifest names no serializedFile"),
                    ));
                };
                // The model file streamed out of the archive into memory (not written to
                // the unpack folder and read back), or from the folder.
                let (model_path, held) = archive
                    .model_source(&serialized)
                    .map_err(ServeError::from)?;
                tracing::info!(
                    model = %name,
                    file = %serialized,
                    in_memory = held.is_some(),
                    bytes = held.as_ref().map(|h| h.len()),
                    after_ms = started.elapsed().as_secs_f64() * 1e3,
                    "model file ready"
                );
                let loaded = Session::load_with(&model_path, device, self.settings.precision);
                // libtorch has read it: free the memory.
                drop(held);
                let session = loaded.map_err(|e| {
                    tracing::error!(model = %name, error = %e, "TorchScript load failed");
                    ServeError::new(
                        ErrorKind::InvalidModel,
                        format!(
                            "model {name}: {serialized} could not be loaded as TorchScript \
                                 ({}). torchfn's built-in handlers serve models saved with \
                                 torch.jit.script or torch.jit.trace; without a handler mapping \
                                 the archive's own handler runs in the Python backend",
                            e.summary()
                        ),
                    )
                })?;
                let session_loaded = started.elapsed();
                // Warm up on this (blocking) thread, then time a batch at one intra-op
                // thread and at the fair share, and keep the faster.
                let (threads, warm_up) = warm_up_and_pick_threads(
                    &session,
                    settings.batch.workers,
                    settings.batch.batch_size,
                    self.model_threads(),
                );
                settings.batch.threads_per_worker = threads;
                settings.batch.lone_pass = warm_up;
                let session = Arc::new(session);
                if device.is_cuda() {
                    self.metrics.enable_gpu_metrics();
                }
                let labels = [name.as_str(), version.as_str()];
                let batch_metrics = BatchMetrics {
                    batch_size: self.metrics.batch_size.with_label_values(&labels),
                    queue_length: self.metrics.queue_length.with_label_values(&labels),
                    abandoned: self.metrics.abandoned_requests.with_label_values(&labels),
                    stuck_workers: self.metrics.stuck_workers.with_label_values(&labels),
                };
                let batcher = Batcher::start(
                    &name,
                    handler.clone(),
                    session.clone(),
                    settings.batch,
                    batch_metrics,
                )
                .map_err(|e| {
                    ServeError::internal(format!(
                        "Failed to start workers for model {name} version: {version}: {e}"
                    ))
                })?;
                (
                    Runner::Torch {
                        handler,
                        session,
                        batcher: Box::new(batcher),
                    },
                    warm_up,
                    session_loaded,
                )
            }
            Choice::Python(handler) => {
                // The Python workers read the model file from the folder.
                archive.materialize().map_err(ServeError::from)?;
                let pool =
                    self.start_python(&archive, &name, &version, &handler, &settings, device)?;
                (
                    Runner::Python {
                        handler,
                        pool,
                        device,
                    },
                    None,
                    started.elapsed(),
                )
            }
        };
        let worker_range = (settings.min_workers, settings.max_workers);
        let model = Arc::new(ModelVersion {
            name: name.clone(),
            version: version.clone(),
            url: spec.url.clone(),
            archive: Arc::new(archive),
            runner,
            settings,
            request_metrics: Default::default(),
            metrics: self.metrics.clone(),
            loaded_at_startup: spec.loaded_at_startup,
            started_at: SystemTime::now(),
            load_time: started.elapsed(),
            worker_range: std::sync::Mutex::new(worker_range),
            retirement: Retirement::default(),
        });
        self.metrics
            .model_workers
            .with_label_values(&[name.as_str(), version.as_str()])
            .set(model.workers() as i64);
        let mut models = self
            .models
            .write()
            .map_err(|_| ServeError::internal("model table lock poisoned"))?;
        let family = models.entry(name.clone()).or_insert_with(|| Family {
            versions: BTreeMap::new(),
            default: version.clone(),
        });
        if family.versions.contains_key(&version) {
            return Err(ServeError::new(
                ErrorKind::Conflict,
                format!("Model version {version} is already registered for model {name}"),
            ));
        }
        family.versions.insert(version.clone(), model.clone());
        if self
            .settings
            .overrides(&name, &version)
            .and_then(|o| o.default_version)
            == Some(true)
        {
            family.default = version.clone();
        }
        tracing::info!(
            model = %name,
            version = %version,
            handler = model.handler_name(),
            ?device,
            workers = model.settings.batch.workers,
            batch_size = model.settings.batch.batch_size,
            threads_per_worker = model.settings.batch.threads_per_worker,
            warmup_us = warm_up.map(|t| t.as_micros() as u64),
            unpack_ms = unpacked.as_secs_f64() * 1e3,
            session_ms = (session_loaded - unpacked).as_secs_f64() * 1e3,
            load_ms = model.load_time.as_secs_f64() * 1e3,
            "model loaded"
        );
        Ok(model)
    }

    /// Starts a version's Python workers (after its requirements, when
    /// `install_py_dep_per_model` is on) and waits until each has loaded the model. Blocking.
    fn start_python(
        &self,
        archive: &ModelArchive,
        name: &str,
        version: &str,
        handler: &str,
        settings: &ModelSettings,
        device: tch::Device,
    ) -> Result<Pool, ServeError> {
        let interpreter = python::interpreter(&self.settings);
        let backend = torchfn_python::Backend::find(&interpreter).map_err(|e| {
            ServeError::new(
                ErrorKind::Internal,
                format!("Failed to start workers for model {name} version: {version}: {e}"),
            )
        })?;
        if self.settings.install_py_dep_per_model {
            if let Some(file) = &archive.manifest().model.requirements_file {
                python::install_requirements(&interpreter, archive.dir(), file)?;
            }
        }
        let mut env = Vec::new();
        if !self.settings.decode_input_request {
            env.push(("TS_DECODE_INPUT_REQUEST".to_string(), "false".to_string()));
        }
        let envelope = archive
            .manifest()
            .model
            .envelope
            .clone()
            .or_else(|| self.settings.service_envelope.clone())
            .unwrap_or_default();
        let config = PoolConfig {
            worker: WorkerConfig {
                python: interpreter,
                model_name: name.to_string(),
                model_dir: archive.dir().to_path_buf(),
                handler: handler.to_string(),
                batch_size: settings.batch.batch_size,
                gpu: match device {
                    tch::Device::Cuda(i) => i32::try_from(i).ok(),
                    _ => None,
                },
                envelope,
                limit_max_image_pixels: self.settings.limit_max_image_pixels,
                startup_timeout: settings.startup_timeout,
                port: 9000,
                env,
                metrics_config: self.settings.metrics_config.clone(),
                metrics: Some({
                    let metrics = self.metrics.clone();
                    torchfn_python::MetricSink::new(move |line| metrics.record_model_metric(&line))
                }),
            },
            workers: settings.batch.workers,
            max_batch_delay: settings.batch.max_batch_delay,
            queue_size: settings.batch.queue_size,
            response_timeout: settings.response_timeout,
            max_retry_timeout: Duration::from_secs(
                archive
                    .config()
                    .and_then(|c| c.max_retry_timeout_in_sec)
                    .unwrap_or(300),
            ),
        };
        tracing::info!(model = name, version, handler, python = %backend.python.display(),
            torchserve = %backend.version, workers = settings.batch.workers,
            "starting Python workers");
        Pool::start(backend, config).map_err(|e| {
            tracing::error!(model = name, version, error = %e, "Python workers failed to start");
            ServeError::new(
                ErrorKind::Internal,
                format!("Failed to start workers for model {name} version: {version}: {e}"),
            )
        })
    }

    fn model_settings(
        &self,
        name: &str,
        version: &str,
        archive: &ModelArchive,
        rest: &RegisterParams,
    ) -> ModelSettings {
        let s = &self.settings;
        let json = s.overrides(name, version);
        let yaml = archive.config();
        let pick = |y: Option<usize>, j: Option<usize>, d: usize| y.or(j).unwrap_or(d);
        let batch_size = rest
            .batch_size
            .unwrap_or_else(|| {
                pick(
                    yaml.and_then(|c| c.batch_size).map(|v| v as usize),
                    json.and_then(|j| j.batch_size),
                    s.batch_size,
                )
            })
            .max(1);
        let delay_ms = rest.max_batch_delay_ms.unwrap_or_else(|| {
            yaml.and_then(|c| c.max_batch_delay)
                .or(json.and_then(|j| j.max_batch_delay))
                .unwrap_or(s.max_batch_delay.as_millis() as u64)
        });
        let min_workers = rest.initial_workers.unwrap_or_else(|| {
            let configured = yaml
                .and_then(|c| c.min_workers)
                .map(|v| v as usize)
                .or(json.and_then(|j| j.min_workers));
            match (configured, rest.from_rest) {
                (Some(n), _) => n.max(1),
                // TorchServe's REST registration: default_workers_per_model, else 0.
                (None, true) => s.default_workers_per_model.unwrap_or(0),
                (None, false) => s.default_workers_per_model.unwrap_or(1).max(1),
            }
        });
        let max_workers = pick(
            yaml.and_then(|c| c.max_workers).map(|v| v as usize),
            json.and_then(|j| j.max_workers),
            min_workers,
        )
        .max(min_workers);
        let response_timeout = rest
            .response_timeout_s
            .or(yaml.and_then(|c| c.response_timeout))
            .or(json.and_then(|j| j.response_timeout))
            .map_or(s.response_timeout, Duration::from_secs);
        let startup_timeout = yaml
            .and_then(|c| c.startup_timeout)
            .or(json.and_then(|j| j.startup_timeout))
            .or(rest.startup_timeout_s)
            .unwrap_or(s.default_startup_timeout);
        let queue_size = yaml
            .and_then(|c| c.job_queue_size)
            .map(|v| v as usize)
            .unwrap_or(s.job_queue_size)
            .max(1);
        ModelSettings {
            batch: BatchConfig {
                batch_size,
                max_batch_delay: Duration::from_millis(delay_ms),
                workers: min_workers,
                queue_size,
                threads_per_worker: threads_per_worker(min_workers.max(1)),
                lone_pass: None,
                stuck_after: response_timeout,
            },
            min_workers,
            max_workers,
            response_timeout,
            startup_timeout: Duration::from_secs(startup_timeout),
        }
    }

    /// Runs `f` on a model's family under the read lock; 404 when there is no such model.
    fn with_family<T>(
        &self,
        name: &str,
        f: impl FnOnce(&Family) -> Result<T, ServeError>,
    ) -> Result<T, ServeError> {
        let models = self
            .models
            .read()
            .map_err(|_| ServeError::internal("model table lock poisoned"))?;
        f(models
            .get(name)
            .ok_or_else(|| ServeError::model_not_found(name))?)
    }

    /// A model's default version, or the named one.
    pub fn get(&self, name: &str, version: Option<&str>) -> Result<Arc<ModelVersion>, ServeError> {
        self.with_family(name, |family| {
            let v = version.unwrap_or(&family.default);
            family
                .versions
                .get(v)
                .cloned()
                .ok_or_else(|| ServeError::version_not_found(name, v))
        })
    }

    /// Every version of a model.
    pub fn all_versions(&self, name: &str) -> Result<Vec<Arc<ModelVersion>>, ServeError> {
        self.with_family(name, |family| {
            Ok(family.versions.values().cloned().collect())
        })
    }

    /// Runs `f` on a model's family under the write lock; 404 when there is no such model.
    /// `f` returns whether the family should be dropped (its last version went).
    fn with_family_mut<T>(
        &self,
        name: &str,
        f: impl FnOnce(&mut Family) -> Result<(T, bool), ServeError>,
    ) -> Result<T, ServeError> {
        let mut models = self
            .models
            .write()
            .map_err(|_| ServeError::internal("model table lock poisoned"))?;
        let family = models
            .get_mut(name)
            .ok_or_else(|| ServeError::model_not_found(name))?;
        let (out, drop_family) = f(family)?;
        if drop_family {
            models.remove(name);
        }
        Ok(out)
    }

    /// Makes `version` the model's default: new requests without a version go to it.
    pub fn set_default(&self, name: &str, version: &str) -> Result<(), ServeError> {
        self.with_family_mut(name, |family| {
            if !family.versions.contains_key(version) {
                return Err(ServeError::new(
                    ErrorKind::ModelVersionNotFound,
                    format!("Model version {version} does not exist for model {name}"),
                ));
            }
            family.default = version.to_string();
            Ok(((), false))
        })
    }

    /// Removes a version that is not the default. Requests already holding it finish; its
    /// workers stop when the last of them drops it (see `retire`).
    pub fn unload(&self, name: &str, version: &str) -> Result<Arc<ModelVersion>, ServeError> {
        let model = self.with_family_mut(name, |family| {
            if family.default == version && family.versions.len() > 1 {
                return Err(ServeError::new(
                    ErrorKind::Forbidden,
                    format!("Cannot remove default version for model {name}"),
                ));
            }
            let model = family
                .versions
                .remove(version)
                .ok_or_else(|| ServeError::version_not_found(name, version))?;
            Ok((model, family.versions.is_empty()))
        })?;
        self.metrics
            .model_workers
            .with_label_values(&[name, version])
            .set(0);
        Ok(model)
    }

    /// Scales a version (the default when `version` is `None`) to `min` workers, as
    /// TorchServe does (it starts workers up to `min_worker` and stops any above
    /// `max_worker`; it does not autoscale between them). Returns the version scaled.
    pub fn scale(
        &self,
        name: &str,
        version: Option<&str>,
        min: usize,
        max: usize,
    ) -> Result<Arc<ModelVersion>, ServeError> {
        let model = self.get(name, version)?;
        let running = model.scale_to(min).map_err(|e| {
            tracing::error!(model = name, version = %model.version, error = %e, "scaling failed");
            ServeError::internal(format!(
                "Failed to start workers for model {name} version: {}: {e}",
                model.version
            ))
        })?;
        *model.worker_range.lock().unwrap_or_else(|e| e.into_inner()) = (min, max);
        self.metrics
            .model_workers
            .with_label_values(&[name, model.version.as_str()])
            .set(running as i64);
        tracing::info!(model = name, version = %model.version, workers = running, "scaled");
        Ok(model)
    }

    /// Model worker threads running now, all models and versions together (Rust workers;
    /// Python workers are processes, counted too as they take a core each).
    pub fn model_threads(&self) -> usize {
        let Ok(models) = self.models.read() else {
            return 0;
        };
        models
            .values()
            .flat_map(|f| f.versions.values())
            .map(|v| v.workers())
            .sum()
    }

    /// Default versions of all models, by name.
    pub fn defaults(&self) -> Vec<Arc<ModelVersion>> {
        let Ok(models) = self.models.read() else {
            return Vec::new();
        };
        models
            .values()
            .filter_map(|f| f.versions.get(&f.default).cloned())
            .collect()
    }

    /// Stops every model's workers after they finish what is queued.
    pub fn shutdown(&self) {
        let families = match self.models.write() {
            Ok(mut m) => std::mem::take(&mut *m),
            Err(_) => return,
        };
        for family in families.into_values() {
            for model in family.versions.into_values() {
                model.shutdown();
            }
        }
    }
}

/// Whether a file name is a model archive TorchServe would load from a store.
fn is_archive_name(name: &str) -> bool {
    [".mar", ".tar.gz", ".tgz", ".model"]
        .iter()
        .any(|ext| name.ends_with(ext))
}

/// The last path segment of a path or URL.
fn file_name(path: &str) -> &str {
    path.trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or(path)
}

/// Runs a future for a blocking thread and waits for its output: as a task on the current
/// tokio runtime when there is one (the calling thread only waits on a channel; it never
/// drives the runtime), else on a small runtime of its own. Never call it from an async
/// worker thread: the wait would block it.
fn wait_for<F>(fut: F) -> Result<F::Output, ServeError>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            handle.spawn(async move {
                let _ = tx.send(fut.await);
            });
            rx.recv()
                .map_err(|_| ServeError::internal("the runtime stopped before the store answered"))
        }
        Err(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map(|rt| rt.block_on(fut))
            .map_err(|e| ServeError::internal(format!("cannot start a tokio runtime: {e}"))),
    }
}

/// This process's resident memory (VmRSS), in bytes; 0 where /proc is absent.
pub fn resident_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// `yyyy-MM-ddTHH:mm:ss.SSSZ` in UTC.
pub fn format_time(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, mo, da) = civil_from_days(days);
    format!(
        "{y:04}-{mo:02}-{da:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Retires a version taken out of the manager ([`Manager::unload`]): requests already holding
/// it finish; when the last of them lets go, its workers finish what is queued and stop, and
/// its session and unpacked archive are freed, on a thread of its own. Nothing waits or polls
/// until then: the clean-up starts from the version's `Drop`. The returned [`Retired`] tells
/// when it is done; callers may drop it.
pub fn retire(model: Arc<ModelVersion>) -> Retired {
    let (tx, rx) = tokio::sync::oneshot::channel();
    *model
        .retirement
        .done
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = Some(tx);
    drop(model);
    Retired(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_times() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_075_508_123);
        assert_eq!(format_time(t), "2025-11-25T12:58:28.123Z");
        assert_eq!(
            format_time(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000Z"
        );
    }
}
