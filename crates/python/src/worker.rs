//! One Python worker process: TorchServe's `ts/model_service_worker.py`, started the way
//! TorchServe's frontend starts it (the model's folder as working directory and on
//! `PYTHONPATH`, a Unix socket named `….ts.sock.<port>`, the package's `metrics.yaml`), then
//! loaded once and asked for batches.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::metrics::{MetricLine, MetricSink};
use crate::protocol::{self, Load, Reply, Request};

/// Lines of a worker's output kept for error messages.
const KEPT_LINES: usize = 40;

/// What a worker runs with.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The Python interpreter (one with TorchServe's `ts` package and torch).
    pub python: PathBuf,
    pub model_name: String,
    /// The unpacked archive.
    pub model_dir: PathBuf,
    /// The manifest's handler, as TorchServe hands it over.
    pub handler: String,
    pub batch_size: usize,
    pub gpu: Option<i32>,
    /// `service_envelope` (empty for none).
    pub envelope: String,
    pub limit_max_image_pixels: bool,
    /// How long starting and loading may take (the model's `startupTimeout`).
    pub startup_timeout: Duration,
    /// Worker id as TorchServe numbers them (9000, 9001, …): the socket's suffix and the log's.
    pub port: u16,
    /// Variables added to the worker's environment.
    pub env: Vec<(String, String)>,
    /// The metrics configuration the worker reads (`--metrics-config`; None: TorchServe's own).
    pub metrics_config: Option<PathBuf>,
    /// Where the handler's `[METRICS]` lines go (None: they are only logged).
    pub metrics: Option<MetricSink>,
}

/// Why a worker could not start or answer.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(
        "cannot run the Python interpreter {python}: {source}. Install Python 3 with \
         `pip install torchserve torch`, or name another interpreter with --python, \
         `python_executable` in config.properties or TORCHFN_PYTHON"
    )]
    NoPython {
        python: String,
        source: std::io::Error,
    },
    #[error(
        "{python} cannot import TorchServe's Python package ({detail}). Install it into that \
         interpreter: `{python} -m pip install torchserve==0.12.0 torch`, or name another \
         interpreter with --python, `python_executable` in config.properties or TORCHFN_PYTHON"
    )]
    NoTorchServe { python: String, detail: String },
    #[error("the worker did not start within {0:?} (startup_timeout){1}")]
    StartTimeout(Duration, String),
    #[error("the worker exited while starting{0}")]
    Exited(String),
    #[error("the model failed to load ({code}: {message}){log}")]
    Load {
        code: i32,
        message: String,
        log: String,
    },
    #[error("the worker did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the worker's connection failed: {0}{1}")]
    Io(std::io::Error, String),
}

/// Where an interpreter's `ts` package is, found once per interpreter.
#[derive(Debug, Clone)]
pub struct Backend {
    pub python: PathBuf,
    /// The `ts` package folder.
    pub ts_dir: PathBuf,
    /// TorchServe's version, as the package says.
    pub version: String,
}

impl Backend {
    /// Checks that `python` runs and imports `ts`, once per interpreter for the process.
    pub fn find(python: &Path) -> Result<Backend, WorkerError> {
        static FOUND: Mutex<Vec<Backend>> = Mutex::new(Vec::new());
        if let Some(b) = FOUND
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|b| b.python == python)
        {
            return Ok(b.clone());
        }
        let shown = python.display().to_string();
        let out = Command::new(python)
            .args([
                "-c",
                "import os, ts; print(os.path.dirname(ts.__file__)); print(ts.__version__)",
            ])
            .stdin(Stdio::null())
            .output()
            .map_err(|source| WorkerError::NoPython {
                python: shown.clone(),
                source,
            })?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let mut lines = stdout.lines();
        let (Some(dir), Some(version), true) = (lines.next(), lines.next(), out.status.success())
        else {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let detail = stderr
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("it printed nothing")
                .trim()
                .to_string();
            return Err(WorkerError::NoTorchServe {
                python: shown,
                detail,
            });
        };
        let found = Backend {
            python: python.to_path_buf(),
            ts_dir: PathBuf::from(dir.trim()),
            version: version.trim().to_string(),
        };
        FOUND
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(found.clone());
        Ok(found)
    }
}

/// A started, loaded worker process. Dropping it kills the process.
pub struct Worker {
    child: Child,
    stream: UnixStream,
    output: Arc<Mutex<VecDeque<String>>>,
    _socket_dir: tempfile::TempDir,
    label: String,
}

impl Worker {
    /// Starts the process, waits until it listens, connects and loads the model, all within
    /// `config.startup_timeout`. Blocking.
    pub fn start(backend: &Backend, config: &WorkerConfig) -> Result<Worker, WorkerError> {
        let deadline = Instant::now() + config.startup_timeout;
        let label = format!("{}-{}", config.model_name, config.port);
        // A short folder of its own: socket paths are limited to about 100 bytes.
        let socket_dir = tempfile::Builder::new()
            .prefix("torchfn-py-")
            .tempdir_in("/tmp")
            .or_else(|_| tempfile::tempdir())
            .map_err(|e| WorkerError::Io(e, String::new()))?;
        let socket = socket_dir.path().join(format!(".ts.sock.{}", config.port));
        let mut python_path = config.model_dir.as_os_str().to_os_string();
        if let Some(existing) = std::env::var_os("PYTHONPATH").filter(|p| !p.is_empty()) {
            python_path.push(":");
            python_path.push(existing);
        }
        let mut command = Command::new(&backend.python);
        command
            .arg("-u")
            .arg(backend.ts_dir.join("model_service_worker.py"))
            .args(["--sock-type", "unix", "--sock-name"])
            .arg(&socket)
            .arg("--metrics-config")
            .arg(
                config
                    .metrics_config
                    .clone()
                    .unwrap_or_else(|| backend.ts_dir.join("configs/metrics.yaml")),
            )
            .current_dir(&config.model_dir)
            .env("PYTHONPATH", python_path)
            .envs(config.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().map_err(|source| WorkerError::NoPython {
            python: backend.python.display().to_string(),
            source,
        })?;
        let output = Arc::new(Mutex::new(VecDeque::new()));
        // Told when the worker listens, or when its output ends (it exited).
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<bool>();
        let mut relays = Vec::new();
        if let Some(out) = child.stdout.take() {
            relays.extend(relay(
                out,
                &label,
                output.clone(),
                Some(ready_tx.clone()),
                config.metrics.clone(),
            ));
        }
        if let Some(err) = child.stderr.take() {
            relays.extend(relay(err, &label, output.clone(), None, None));
        }
        drop(ready_tx);
        let mut guard = Starting {
            child: Some(child),
            relays,
        };
        let left = deadline.saturating_duration_since(Instant::now());
        match ready_rx.recv_timeout(left) {
            Ok(true) => {}
            Ok(false) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                guard.finish(false);
                return Err(WorkerError::Exited(log_tail(&output)));
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                guard.finish(true);
                return Err(WorkerError::StartTimeout(
                    config.startup_timeout,
                    log_tail(&output),
                ));
            }
        }
        let mut stream = match UnixStream::connect(&socket) {
            Ok(s) => s,
            Err(e) => {
                guard.finish(true);
                return Err(WorkerError::Io(e, log_tail(&output)));
            }
        };
        let handler = config.handler.clone();
        let model_path = config.model_dir.to_string_lossy();
        let load = protocol::encode_load(&Load {
            model_name: &config.model_name,
            model_path: &model_path,
            batch_size: i32::try_from(config.batch_size).unwrap_or(i32::MAX),
            handler: &handler,
            gpu: config.gpu,
            envelope: &config.envelope,
            limit_max_image_pixels: config.limit_max_image_pixels,
        });
        let left = deadline.saturating_duration_since(Instant::now());
        let reply = stream
            .write_all(&load)
            .and_then(|()| read_within(&mut stream, left));
        match reply {
            Ok(r) if r.code == 200 => {}
            Ok(r) => {
                guard.finish(true);
                return Err(WorkerError::Load {
                    code: r.code,
                    message: r.message,
                    log: log_tail(&output),
                });
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                guard.finish(true);
                return Err(WorkerError::StartTimeout(
                    config.startup_timeout,
                    log_tail(&output),
                ));
            }
            Err(_) => {
                // The worker closed the connection: it failed to load and is exiting, its
                // traceback already written. Let it finish and read all of it.
                guard.finish(false);
                return Err(WorkerError::Load {
                    code: 500,
                    message: "the worker exited while loading the model".into(),
                    log: log_tail(&output),
                });
            }
        }
        let Some(child) = guard.child.take() else {
            return Err(WorkerError::Exited(log_tail(&output)));
        };
        tracing::info!(worker = %label, pid = child.id(), "Python worker loaded the model");
        Ok(Worker {
            child,
            stream,
            output,
            _socket_dir: socket_dir,
            label,
        })
    }

    /// Sends a batch and waits for the worker's reply, at most `timeout`. After an error the
    /// worker is in an unknown state: drop it (which kills it) and start another.
    pub fn predict(&mut self, batch: &[Request], timeout: Duration) -> Result<Reply, WorkerError> {
        let message = protocol::encode_infer(batch);
        let started = Instant::now();
        self.stream
            .set_write_timeout(Some(timeout.max(Duration::from_millis(1))))
            .map_err(|e| WorkerError::Io(e, String::new()))?;
        self.stream
            .write_all(&message)
            .map_err(|e| self.failure(e, timeout))?;
        let left = timeout.saturating_sub(started.elapsed());
        read_within(&mut self.stream, left).map_err(|e| self.failure(e, timeout))
    }

    fn failure(&mut self, e: std::io::Error, timeout: Duration) -> WorkerError {
        match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                WorkerError::Timeout(timeout)
            }
            _ => {
                // Give the process a moment to finish writing why it died.
                let _ = self.child.wait();
                WorkerError::Io(e, log_tail(&self.output))
            }
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        tracing::debug!(worker = %self.label, "Python worker stopped");
    }
}

/// A child that is not yet a [`Worker`], and the threads reading its output. Dropped
/// unfinished, it kills the child.
struct Starting {
    child: Option<Child>,
    relays: Vec<JoinHandle<()>>,
}

impl Starting {
    /// Ends the child (killing it, or letting it exit by itself when it is already on its
    /// way out) and waits until its output is read to the end.
    fn finish(&mut self, kill: bool) {
        if let Some(mut c) = self.child.take() {
            if kill {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
        for r in self.relays.drain(..) {
            let _ = r.join();
        }
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn read_within(stream: &mut UnixStream, timeout: Duration) -> std::io::Result<Reply> {
    if timeout.is_zero() {
        return Err(std::io::ErrorKind::TimedOut.into());
    }
    stream.set_read_timeout(Some(timeout))?;
    let deadline = Instant::now() + timeout;
    let mut reader = Deadline { stream, deadline };
    protocol::read_reply(&mut BufReader::with_capacity(64 * 1024, &mut reader))
}

/// Reads that give up at a deadline across many `read` calls (a socket timeout alone is per
/// call, and a slow trickle would never end).
struct Deadline<'a> {
    stream: &'a mut UnixStream,
    deadline: Instant,
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

/// Logs a worker's output line by line and keeps the last lines; `ready` is told `true` when
/// the worker says it listens and `false` when the output ends first; metric updates go to
/// `metrics`.
fn relay(
    stream: impl Read + Send + 'static,
    label: &str,
    kept: Arc<Mutex<VecDeque<String>>>,
    ready: Option<std::sync::mpsc::Sender<bool>>,
    metrics: Option<MetricSink>,
) -> Option<JoinHandle<()>> {
    let label = label.to_string();
    let spawned = std::thread::Builder::new()
        .name(format!("{label}-log"))
        .spawn(move || {
            let mut ready = ready;
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                if line.contains("Torch worker started.") {
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(true);
                    }
                }
                if let Some(update) = metrics.as_ref().and_then(|_| MetricLine::parse(&line)) {
                    tracing::debug!(target: "torchfn::python", worker = %label, "{line}");
                    if let Some(sink) = &metrics {
                        sink.send(update);
                    }
                    continue;
                }
                if line.starts_with("Backend received inference at:") {
                    tracing::debug!(target: "torchfn::python", worker = %label, "{line}");
                } else {
                    tracing::info!(target: "torchfn::python", worker = %label, "{line}");
                }
                let mut kept = kept.lock().unwrap_or_else(|e| e.into_inner());
                if kept.len() == KEPT_LINES {
                    kept.pop_front();
                }
                kept.push_back(line);
            }
            if let Some(tx) = ready {
                let _ = tx.send(false);
            }
        });
    match spawned {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::error!(error = %e, "cannot start the thread that reads a Python worker's output");
            None
        }
    }
}

/// What the worker's output says went wrong: the exception lines of its tracebacks (the
/// first is the cause when one exception led to another), else its last lines.
fn log_tail(kept: &Arc<Mutex<VecDeque<String>>>) -> String {
    let kept = kept.lock().unwrap_or_else(|e| e.into_inner());
    let is_exception = |l: &str| {
        let l = l.trim_start();
        !l.starts_with("File ")
            && l.split_once(": ").is_some_and(|(head, _)| {
                !head.contains(' ') && (head.ends_with("Error") || head.ends_with("Exception"))
            })
    };
    let mut lines: Vec<&str> = Vec::new();
    for l in kept.iter().map(String::as_str).filter(|l| is_exception(l)) {
        if !lines.contains(&l) {
            lines.push(l);
        }
    }
    if lines.is_empty() {
        lines = kept.iter().rev().take(8).map(String::as_str).collect();
        lines.reverse();
    }
    if lines.is_empty() {
        return String::new();
    }
    let mut out = String::from("; the worker said:");
    for l in lines {
        out.push_str("\n  ");
        out.push_str(l.trim());
    }
    out
}
