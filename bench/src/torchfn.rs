//! `torchfn-local` as the benchmark runs it: one model, a config.properties of its own on
//! loopback port 0, JSON logs read for the start-up phases, peak RSS from `/proc`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hyper::{Method, StatusCode};
use serde::Serialize;
use serde_json::Value;

use crate::load;
use crate::process::{Line, Spawned};
use crate::workload::Workload;

/// How the server batches (config.properties keys of the same names).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Batching {
    pub batch_size: usize,
    pub max_batch_delay_ms: u64,
}

/// A running `torchfn-local`.
pub struct Torchfn {
    process: Spawned,
    pub inference: SocketAddr,
    pub startup: Startup,
    _dir: tempfile::TempDir,
}

/// When the start-up milestones were seen, in ms after the process was spawned.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Startup {
    /// `Inference API bind to:` printed: process start, dynamic loading of libtorch,
    /// configuration, listeners bound.
    pub bind_ms: f64,
    /// The `model loaded` log event: archive read and unpacked, TorchScript loaded,
    /// workers started.
    pub model_loaded_ms: f64,
    /// `/ping` Healthy (the start-up log event, or /ping answering 200).
    pub healthy_ms: f64,
    /// Numeric `*_ms` fields of the `model loaded` event (load_ms, and unpack_ms,
    /// session_ms, warmup_ms where the server reports them).
    pub model_loaded_fields: BTreeMap<String, f64>,
    /// `load_ms` of the `TorchScript module loaded` event.
    pub torchscript_load_ms: Option<f64>,
}

/// Settings to try on the servers under test: `TORCHFN_BENCH_SERVER_ENV` as `K=V,K=V`
/// (e.g. `TOKIO_WORKER_THREADS=2`).
pub fn server_env() -> Vec<(String, String)> {
    std::env::var("TORCHFN_BENCH_SERVER_ENV")
        .unwrap_or_default()
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// Lines worth timing: the bind lines on stdout and the start-up log events on stderr.
fn interesting(line: &str) -> bool {
    line.contains("API bind to:")
        || line.contains("model loaded")
        || line.contains("TorchScript module loaded")
        || line.contains("/ping reports Healthy")
        || line.contains("\"ERROR\"")
}

impl Torchfn {
    /// Starts `bin` serving `workload` and waits until `/ping` is Healthy.
    pub fn start(
        bin: &Path,
        store: &Path,
        workload: &Workload,
        batching: Batching,
        device: &str,
        rt: &tokio::runtime::Runtime,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("torchfn-bench-")
            .tempdir()?;
        let config = dir.path().join("config.properties");
        std::fs::write(
            &config,
            format!(
                "# Written by torchfn-bench.\n\
                 inference_address=http://127.0.0.1:0\n\
                 management_address=http://127.0.0.1:0\n\
                 metrics_address=http://127.0.0.1:0\n\
                 default_workers_per_model=1\n\
                 job_queue_size=100\n\
                 batch_size={}\n\
                 max_batch_delay={}\n",
                batching.batch_size, batching.max_batch_delay_ms
            ),
        )?;
        let mut cmd = Command::new(bin);
        cmd.current_dir(dir.path())
            .arg("--model-store")
            .arg(store)
            .arg("--models")
            .arg(format!("{}={}", workload.model, workload.mar))
            .arg("--ts-config")
            .arg(&config)
            .arg("--device")
            .arg(device)
            .arg("--log-json")
            .env("RUST_LOG", "info")
            .env_remove("TS_CONFIG_FILE");
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("TORCHFN_") {
                cmd.env_remove(k);
            }
        }
        for (k, v) in server_env() {
            cmd.env(k, v);
        }
        if let Some(h) = workload.torchfn_handler {
            cmd.arg("--handler").arg(format!("{}={h}", workload.model));
        }
        let mut process = Spawned::spawn(cmd, interesting, false)
            .with_context(|| format!("could not start {}", bin.display()))?;
        let startup = wait_healthy(&mut process, rt).with_context(|| {
            format!(
                "torchfn-local did not become healthy serving {}; its last output:\n{}",
                workload.mar,
                process.tail()
            )
        })?;
        let inference = startup.1;
        Ok(Self {
            process,
            inference,
            startup: startup.0,
            _dir: dir,
        })
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Time from spawn to now, in ms.
    pub fn since_spawn_ms(&self, at: Instant) -> f64 {
        ms(at - self.process.started)
    }

    pub fn peak_rss_kib(&self) -> Option<u64> {
        crate::machine::peak_rss_kib(self.pid())
    }

    pub fn tail(&self) -> String {
        self.process.tail()
    }

    pub fn stop(mut self) {
        self.process.stop(Duration::from_secs(10));
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn wait_healthy(
    process: &mut Spawned,
    rt: &tokio::runtime::Runtime,
) -> anyhow::Result<(Startup, SocketAddr)> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut s = Startup::default();
    let mut addr: Option<SocketAddr> = None;
    let mut loaded = false;
    let mut last_ping = Instant::now();
    let mut errors = Vec::new();
    // When /ping answered before the "model loaded" event was read: the time it answered.
    // The server logs that event before /ping turns healthy, so it is already in the pipe;
    // the lines are read until it comes (or none comes for a second: the event changed).
    let mut pinged_healthy: Option<(f64, SocketAddr)> = None;
    loop {
        if Instant::now() > deadline {
            bail!("not healthy after 120 s");
        }
        if let Some(status) = process.exited() {
            bail!("exited with {status} before it was healthy");
        }
        let wait = if pinged_healthy.is_some() {
            Duration::from_secs(1)
        } else if loaded {
            Duration::from_millis(1)
        } else {
            Duration::from_millis(10)
        };
        if let Some(Line { at, stdout, text }) = process.next_line(wait) {
            let t = ms(at - process.started);
            if stdout {
                if let Some(rest) = text.strip_prefix("Inference API bind to: http://") {
                    addr = Some(rest.trim().parse().with_context(|| {
                        format!("could not read the inference address from `{text}`")
                    })?);
                    s.bind_ms = t;
                }
                continue;
            }
            let Ok(event) = serde_json::from_str::<Value>(&text) else {
                continue;
            };
            let fields = event.get("fields").unwrap_or(&event);
            let message = fields
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or_default();
            match message {
                "model loaded" => {
                    s.model_loaded_ms = t;
                    loaded = true;
                    if let Some(map) = fields.as_object() {
                        for (k, v) in map {
                            if let (true, Some(v)) = (k.ends_with("_ms"), v.as_f64()) {
                                s.model_loaded_fields.insert(k.clone(), v);
                            }
                        }
                    }
                    if let Some((healthy_ms, a)) = pinged_healthy {
                        s.healthy_ms = healthy_ms;
                        return Ok((s, a));
                    }
                }
                "TorchScript module loaded" => {
                    s.torchscript_load_ms = fields.get("load_ms").and_then(Value::as_f64);
                }
                m if m.contains("/ping reports Healthy") => {
                    s.healthy_ms = t;
                    if !loaded {
                        bail!("healthy without a model loaded: {}", errors.join("; "));
                    }
                    let addr = addr.context("healthy before printing its inference address")?;
                    return Ok((s, addr));
                }
                _ if event.get("level").and_then(Value::as_str) == Some("ERROR") => {
                    errors.push(message.to_string());
                }
                _ => {}
            }
            continue;
        }
        if let Some((healthy_ms, a)) = pinged_healthy {
            // No line for a second after /ping answered: no "model loaded" event is coming.
            s.healthy_ms = healthy_ms;
            s.model_loaded_ms = healthy_ms;
            return Ok((s, a));
        }
        // Should the start-up event change, /ping still tells: probe it (rarely while
        // the model loads, so the probes cost the load nothing).
        let every = if loaded { 2 } else { 50 };
        if let Some(a) = addr {
            if last_ping.elapsed() >= Duration::from_millis(every) {
                last_ping = Instant::now();
                let ping = rt.block_on(load::once(
                    a,
                    Method::GET,
                    "/ping",
                    hyper::body::Bytes::new(),
                ));
                if let Ok((StatusCode::OK, _, _)) = ping {
                    s.healthy_ms = ms(Instant::now() - process.started);
                    if loaded {
                        return Ok((s, a));
                    }
                    pinged_healthy = Some((s.healthy_ms, a));
                }
            }
        }
    }
}

/// One cold start: spawn → bind → model loaded → healthy → first prediction answered.
#[derive(Clone, Debug, Serialize)]
pub struct ColdStart {
    /// Process start, libtorch's shared libraries loaded, listeners bound.
    pub spawn_to_bind_ms: f64,
    /// Archive read and unpacked, TorchScript module loaded, workers started.
    pub bind_to_model_loaded_ms: f64,
    pub model_loaded_to_healthy_ms: f64,
    /// A fresh connection, the first request, and the model's first forward.
    pub healthy_to_first_answer_ms: f64,
    pub total_ms: f64,
    pub model_loaded_fields: BTreeMap<String, f64>,
    pub torchscript_load_ms: Option<f64>,
    /// `x-torchfn-inference-us` of the first answer: the first forward pass.
    pub first_inference_us: Option<f64>,
    pub first_queue_us: Option<f64>,
}

/// Starts a server, sends one prediction as soon as it is healthy, and stops it.
pub fn cold_start(
    bin: &Path,
    store: &Path,
    workload: &Workload,
    batching: Batching,
    device: &str,
    rt: &tokio::runtime::Runtime,
) -> anyhow::Result<ColdStart> {
    let server = Torchfn::start(bin, store, workload, batching, device, rt)?;
    let answer = rt.block_on(load::once(
        server.inference,
        Method::POST,
        &workload.path(),
        workload.body.clone(),
    ));
    let done = Instant::now();
    let (status, headers, body) = answer.context("the first prediction failed")?;
    if status != StatusCode::OK {
        bail!(
            "the first prediction answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<f64>().ok())
    };
    let total = server.since_spawn_ms(done);
    let s = server.startup.clone();
    server.stop();
    Ok(ColdStart {
        spawn_to_bind_ms: s.bind_ms,
        bind_to_model_loaded_ms: s.model_loaded_ms - s.bind_ms,
        model_loaded_to_healthy_ms: s.healthy_ms - s.model_loaded_ms,
        healthy_to_first_answer_ms: total - s.healthy_ms,
        total_ms: total,
        model_loaded_fields: s.model_loaded_fields,
        torchscript_load_ms: s.torchscript_load_ms,
        first_inference_us: header("x-torchfn-inference-us"),
        first_queue_us: header("x-torchfn-queue-us"),
    })
}
