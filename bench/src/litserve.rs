//! LitServe on the same TorchScript files and the same load, the second peer beside
//! TorchServe: installed into the project's venv from PyPI on demand, run as
//! `bench/litserve/server.py` (one LitAPI, one inference worker, one API server) on a
//! loopback port picked here, ready once `GET /health` answers 200, and stopped with its
//! whole process group (launcher, uvicorn API server, inference worker, multiprocessing
//! helpers).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hyper::body::Bytes;
use hyper::{Method, StatusCode};
use serde::Serialize;
use serde_json::Value;

use crate::load;
use crate::process::{Line, Spawned};
use crate::torchfn::Batching;
use crate::torchserve::{free_ports, ProcessRss};
use crate::workload::Workload;

/// The newest LitServe that installs with pip beside torch 2.13 on Python 3.11.
pub const VERSION: &str = "0.2.19";

/// How long a server may take from spawn to `/health` answering 200.
const READY_TIMEOUT: Duration = Duration::from_secs(180);

/// The venv's Python when LitServe `VERSION` is installed there, installing it with pip
/// first when it is missing; `Err(reason)` when it cannot run (LitServe is then reported as
/// skipped, and the run goes on).
pub fn locate(venv: &Path) -> Result<PathBuf, String> {
    crate::pip::ensure(venv, "litserve", VERSION)?;
    Ok(venv.join("bin/python"))
}

/// The answer shape server.py gives a workload, the one torchfn's built-in gives it: the
/// seed classifier's `classifier` (with the fixture's labels), the wide MLP's `tensor`.
fn kind(workload: &Workload) -> &'static str {
    if workload.torchfn_handler == Some("classifier") {
        "classifier"
    } else {
        "tensor"
    }
}

/// What each LitServe server of a run starts from.
pub struct Launch<'a> {
    /// The venv's Python, with LitServe installed.
    pub python: &'a Path,
    /// The repository, for `bench/litserve/server.py`.
    pub repo: &'a Path,
    /// The fixtures: the TorchScript files and the classifier's labels.
    pub fixtures: &'a Path,
    /// `cpu` or `cuda:N`.
    pub device: &'a str,
}

/// A running LitServe with one model.
pub struct LitServe {
    process: Spawned,
    pub inference: SocketAddr,
    pub startup: Startup,
    _dir: tempfile::TempDir,
}

/// LitServe's start-up, in ms after the launcher was spawned.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Startup {
    pub model: String,
    pub batching: String,
    /// server.py's `model loaded` line, printed by the inference worker's setup.
    pub model_loaded_ms: Option<f64>,
    /// `GET /health` answered 200 (every worker set up, the API server listening).
    pub ready_ms: f64,
    /// torch's intra-op threads in the inference worker (its default), as it printed them.
    pub torch_threads: Option<u32>,
}

const LOADED: &str = "litserve-bench: model loaded";

fn interesting(line: &str) -> bool {
    line.contains(LOADED)
}

impl LitServe {
    /// Starts `bench/litserve/server.py` serving `workload` on the route torchfn serves it
    /// on, with LitServe's `max_batch_size` / `batch_timeout` from `batching`, and waits
    /// until it is ready.
    pub fn start(
        launch: &Launch,
        workload: &Workload,
        batching: Batching,
        rt: &tokio::runtime::Runtime,
    ) -> anyhow::Result<Self> {
        let Launch {
            python,
            repo,
            fixtures,
            device,
        } = *launch;
        let dir = tempfile::Builder::new()
            .prefix("litserve-bench-")
            .tempdir()?;
        let port = free_ports(1)?[0];
        let mut cmd = Command::new(python);
        cmd.current_dir(dir.path())
            .arg(repo.join("bench/litserve/server.py"))
            .arg("--model")
            .arg(fixtures.join("models").join(workload.torchscript))
            .args(["--kind", kind(workload)])
            .arg("--port")
            .arg(port.to_string())
            .arg("--path")
            .arg(workload.path())
            .arg("--max-batch-size")
            .arg(batching.batch_size.to_string())
            .arg("--batch-timeout-ms")
            .arg(batching.max_batch_delay_ms.to_string())
            .arg("--device")
            .arg(device)
            .env("PYTHONUNBUFFERED", "1")
            // An API key would make every request answer 401; certificates would make it
            // serve HTTPS.
            .env_remove("LIT_SERVER_API_KEY")
            .env_remove("LIGHTNING_CERT_PEM")
            .env_remove("LIGHTNING_KEY_FILE");
        if kind(workload) == "classifier" {
            cmd.arg("--labels")
                .arg(fixtures.join("src/index_to_name.json"));
        }
        let mut process = Spawned::spawn(cmd, interesting, true)?;
        let inference: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut startup = wait_ready(&mut process, inference, rt).with_context(|| {
            format!(
                "LitServe did not become ready serving {}; its last output:\n{}",
                workload.torchscript,
                process.tail()
            )
        })?;
        startup.model = workload.label.into();
        startup.batching = crate::report::batching_name(batching).into();
        Ok(Self {
            process,
            inference,
            startup,
            _dir: dir,
        })
    }

    /// One prediction of `workload`'s body, its JSON answer.
    pub fn answer(
        &self,
        workload: &Workload,
        rt: &tokio::runtime::Runtime,
    ) -> anyhow::Result<Value> {
        crate::answer::fetch(self.inference, workload, rt).context("LitServe's answer")
    }

    /// Peak RSS of every process of the server: VmHWM of the launcher and each of its
    /// descendants (API server, inference worker, multiprocessing's manager and resource
    /// tracker). Pages the forked API server shares with the launcher count in both.
    pub fn peak_rss(&self) -> Vec<ProcessRss> {
        let root = self.process.pid();
        std::iter::once(root)
            .chain(crate::machine::descendants(root))
            .filter_map(|pid| {
                Some(ProcessRss {
                    pid,
                    command: crate::machine::comm(pid),
                    peak_rss_kib: crate::machine::peak_rss_kib(pid)?,
                })
            })
            .collect()
    }

    pub fn tail(&self) -> String {
        self.process.tail()
    }

    pub fn stop(mut self) {
        self.process.stop(Duration::from_secs(10));
    }
}

/// Waits for `/health` to answer 200. Woken by the server's output (the worker's `model
/// loaded` line), else every 50 ms until that line, then every 5 ms; gives up after
/// `READY_TIMEOUT` or when the launcher exits.
fn wait_ready(
    process: &mut Spawned,
    addr: SocketAddr,
    rt: &tokio::runtime::Runtime,
) -> anyhow::Result<Startup> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut s = Startup::default();
    loop {
        if Instant::now() > deadline {
            bail!("/health did not answer 200 within {READY_TIMEOUT:?}");
        }
        if let Some(status) = process.exited() {
            bail!("exited with {status} before it was ready");
        }
        let wait = Duration::from_millis(if s.model_loaded_ms.is_some() { 5 } else { 50 });
        if let Some(Line { at, text, .. }) = process.next_line(wait) {
            s.model_loaded_ms
                .get_or_insert((at - process.started).as_secs_f64() * 1e3);
            s.torch_threads = text
                .rsplit_once("intra-op threads ")
                .and_then(|(_, n)| n.trim().parse().ok());
        }
        let health = rt.block_on(load::once(addr, Method::GET, "/health", Bytes::new()));
        if let Ok((StatusCode::OK, _, _)) = health {
            s.ready_ms = (Instant::now() - process.started).as_secs_f64() * 1e3;
            return Ok(s);
        }
    }
}
