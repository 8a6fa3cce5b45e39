//! TorchServe 0.12 on the same archives and the same load, for the ratios: installed into
//! the project's venv from PyPI on demand, run in a temp folder of its own (it writes
//! `logs/` where it starts) with its own config.properties on free loopback ports, and
//! stopped with its whole process group (CLI, java frontend, Python workers).

use std::net::{SocketAddr, TcpListener};
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
use crate::workload::Workload;

pub const VERSION: &str = "0.12.0";

/// The venv's `torchserve` when TorchServe 0.12 and Java are there; installs TorchServe
/// with pip first when `install` is set. `Ok(Err(reason))` when it cannot run.
pub fn locate(venv: &Path, install: bool) -> anyhow::Result<Result<PathBuf, String>> {
    let java = Command::new("java").arg("-version").output();
    if !java.is_ok_and(|o| o.status.success()) {
        return Ok(Err("no java on PATH (TorchServe needs Java 17)".into()));
    }
    let bin = venv.join("bin/torchserve");
    if crate::pip::installed_version(venv, "torchserve").as_deref() != Some(VERSION) {
        if !install {
            return Ok(Err(format!(
                "torchserve {VERSION} is not installed in {}",
                venv.display()
            )));
        }
        crate::pip::ensure(venv, "torchserve", VERSION).map_err(anyhow::Error::msg)?;
    }
    Ok(Ok(bin))
}

/// TorchServe's model store: the fixture's classifier.mar as it is (its handler.py runs in
/// TorchServe), and a wide.mar archived with `bench/torchserve/wide_handler.py`, since
/// TorchServe's base_handler cannot read JSON.
pub fn store(repo: &Path, fixtures: &Path, venv: &Path) -> anyhow::Result<PathBuf> {
    let dir = fixtures.join("torchserve-store");
    if dir.join("wide.mar").exists() && dir.join("classifier.mar").exists() {
        return Ok(dir);
    }
    let tmp = fixtures.join(format!("torchserve-store.tmp.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    std::fs::copy(
        fixtures.join("store/classifier.mar"),
        tmp.join("classifier.mar"),
    )?;
    let out = Command::new(venv.join("bin/torch-model-archiver"))
        .args([
            "--model-name",
            "wide",
            "--version",
            "1.0",
            "--serialized-file",
        ])
        .arg(fixtures.join("models/wide_scripted.pt"))
        .arg("--handler")
        .arg(repo.join("bench/torchserve/wide_handler.py"))
        .arg("--export-path")
        .arg(&tmp)
        .arg("--force")
        .output()
        .context("could not run torch-model-archiver")?;
    if !out.status.success() {
        bail!(
            "torch-model-archiver failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir)?;
    Ok(dir)
}

/// A running TorchServe with one model.
pub struct TorchServe {
    process: Spawned,
    pub inference: SocketAddr,
    pub management: SocketAddr,
    pub startup: Startup,
    _dir: tempfile::TempDir,
}

/// TorchServe's start-up, in ms after the CLI was spawned.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Startup {
    /// `Inference API bind to:` logged by the java frontend.
    pub bind_ms: Option<f64>,
    /// The Python worker reported the model loaded (`WORKER_MODEL_LOADED`).
    pub worker_loaded_ms: Option<f64>,
    /// The first prediction answered 200 (probed every 20 ms from the start).
    pub first_answer_ms: f64,
}

fn interesting(line: &str) -> bool {
    line.contains("Inference API bind to:") || line.contains("-> WORKER_MODEL_LOADED")
}

/// Free loopback ports, held together while picked so that they differ.
pub(crate) fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<Vec<_>, _>>()?)
}

impl TorchServe {
    /// Starts TorchServe serving `workload` with one worker and the given batching (the
    /// `models` JSON of config.properties), and waits for its first 200.
    pub fn start(
        bin: &Path,
        store: &Path,
        workload: &Workload,
        batching: Batching,
        rt: &tokio::runtime::Runtime,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("torchserve-bench-")
            .tempdir()?;
        let ports = free_ports(5)?;
        let models = serde_json::json!({
            workload.model: {"1.0": {
                "defaultVersion": true,
                "marName": workload.mar,
                "minWorkers": 1,
                "maxWorkers": 1,
                "batchSize": batching.batch_size,
                "maxBatchDelay": batching.max_batch_delay_ms,
                "responseTimeout": 120,
            }}
        });
        let config = dir.path().join("config.properties");
        std::fs::write(
            &config,
            format!(
                "# Written by torchfn-bench.\n\
                 inference_address=http://127.0.0.1:{}\n\
                 management_address=http://127.0.0.1:{}\n\
                 metrics_address=http://127.0.0.1:{}\n\
                 grpc_inference_port={}\n\
                 grpc_management_port={}\n\
                 default_workers_per_model=1\n\
                 job_queue_size=100\n\
                 disable_system_metrics=true\n\
                 models={models}\n",
                ports[0], ports[1], ports[2], ports[3], ports[4]
            ),
        )?;
        let venv_bin = bin.parent().context("torchserve has no folder")?;
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut paths = vec![venv_bin.to_path_buf()];
        paths.extend(std::env::split_paths(&path));
        let mut cmd = Command::new(bin);
        cmd.current_dir(dir.path())
            .args(["--start", "--foreground", "--ncs", "--disable-token-auth"])
            .arg("--model-store")
            .arg(store)
            .arg("--models")
            .arg(format!("{}={}", workload.model, workload.mar))
            .arg("--ts-config")
            .arg(&config)
            .env("PATH", std::env::join_paths(paths)?)
            .env_remove("TS_CONFIG_FILE");
        let mut process = Spawned::spawn(cmd, interesting, true)?;
        let inference: SocketAddr = ([127, 0, 0, 1], ports[0]).into();
        let management: SocketAddr = ([127, 0, 0, 1], ports[1]).into();
        let startup =
            wait_first_answer(&mut process, inference, workload, rt).with_context(|| {
                format!(
                    "TorchServe did not answer a prediction of {}; its last output:\n{}",
                    workload.mar,
                    process.tail()
                )
            })?;
        Ok(Self {
            process,
            inference,
            management,
            startup,
            _dir: dir,
        })
    }

    /// The batch size TorchServe reports for the model (describe API), to check that the
    /// `models` JSON took effect.
    pub fn described_batch_size(&self, model: &str, rt: &tokio::runtime::Runtime) -> Option<u64> {
        let (status, _, body) = rt
            .block_on(load::once(
                self.management,
                Method::GET,
                &format!("/models/{model}"),
                Bytes::new(),
            ))
            .ok()?;
        if status != StatusCode::OK {
            return None;
        }
        let v: Value = serde_json::from_slice(&body).ok()?;
        v.get(0)?.get("batchSize")?.as_u64()
    }

    /// Peak RSS of the frontend and its workers: VmHWM summed over every process under
    /// the `torchserve` CLI (which only launches java and waits), per process.
    pub fn peak_rss(&self) -> Vec<ProcessRss> {
        crate::machine::descendants(self.process.pid())
            .into_iter()
            .filter_map(|pid| {
                Some(ProcessRss {
                    pid,
                    command: crate::machine::comm(pid),
                    peak_rss_kib: crate::machine::peak_rss_kib(pid)?,
                })
            })
            .collect()
    }

    pub fn stop(mut self) {
        self.process.stop(Duration::from_secs(10));
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ProcessRss {
    pub pid: u32,
    pub command: String,
    pub peak_rss_kib: u64,
}

fn wait_first_answer(
    process: &mut Spawned,
    inference: SocketAddr,
    workload: &Workload,
    rt: &tokio::runtime::Runtime,
) -> anyhow::Result<Startup> {
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut s = Startup::default();
    let path = workload.path();
    loop {
        if Instant::now() > deadline {
            bail!("no answer after 180 s");
        }
        if let Some(status) = process.exited() {
            bail!("exited with {status}");
        }
        while let Some(Line { at, text, .. }) = process.next_line(Duration::ZERO) {
            let t = (at - process.started).as_secs_f64() * 1e3;
            if text.contains("Inference API bind to:") {
                s.bind_ms.get_or_insert(t);
            } else if text.contains("WORKER_MODEL_LOADED") {
                s.worker_loaded_ms.get_or_insert(t);
            }
        }
        let answer = rt.block_on(load::once(
            inference,
            Method::POST,
            &path,
            workload.body.clone(),
        ));
        if let Ok((StatusCode::OK, _, _)) = answer {
            s.first_answer_ms = (Instant::now() - process.started).as_secs_f64() * 1e3;
            // The log lines of the milestones may still be in the pipe.
            let settle = Instant::now() + Duration::from_millis(200);
            while Instant::now() < settle {
                if let Some(Line { at, text, .. }) = process.next_line(Duration::from_millis(20)) {
                    let t = (at - process.started).as_secs_f64() * 1e3;
                    if text.contains("Inference API bind to:") {
                        s.bind_ms.get_or_insert(t);
                    } else if text.contains("WORKER_MODEL_LOADED") {
                        s.worker_loaded_ms.get_or_insert(t);
                    }
                }
            }
            return Ok(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// TorchServe's cold start: CLI spawned → first prediction answered.
pub fn cold_start(
    bin: &Path,
    store: &Path,
    workload: &Workload,
    batching: Batching,
    rt: &tokio::runtime::Runtime,
) -> anyhow::Result<Startup> {
    let server = TorchServe::start(bin, store, workload, batching, rt)?;
    let s = server.startup.clone();
    server.stop();
    Ok(s)
}
