//! torchfn-soak: a bounded soak of `torchfn-local` on loopback. Mixed predictions at a fixed
//! concurrency (the seed classifier's default and pinned versions, and a second model) while a
//! management loop registers, scales, sets the default of and unregisters model versions. Every
//! request sent is accounted for: answered 200, answered with a documented error (by status),
//! or lost (no answer: a transport error or a timeout; must be 0). Prints the emulator's RSS
//! when idle before the load, once the load has warmed up (a tenth of the run, at least 5 s:
//! worker threads, allocator caches and connection buffers in place), and at the end; growth
//! from the warm point to the end must stay under 10%.
//!
//!     cargo run --release -p torchfn-bench --bin torchfn-soak -- --seconds 180
//!
//! Exits with status 1 when a request was lost, a 2xx answer was wrong, an undocumented
//! status came back, or RSS grew by 10% or more.

#[path = "load.rs"]
#[allow(dead_code)]
mod load;
#[path = "workload.rs"]
#[allow(dead_code)]
mod workload;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use serde_json::{json, Value};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "torchfn-soak",
    about = "A bounded soak of torchfn-local on loopback"
)]
struct Args {
    /// How long the load runs, in seconds.
    #[arg(long, default_value_t = 180.0)]
    seconds: f64,
    /// Connections predicting at once (closed loop).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// The torchfn-local binary (default: beside this one).
    #[arg(long)]
    torchfn_local: Option<PathBuf>,
    /// The project's venv (default: what scripts/setup prints).
    #[arg(long)]
    venv: Option<PathBuf>,
    /// Longest wait for one answer, in seconds; longer counts as lost.
    #[arg(long, default_value_t = 30.0)]
    request_timeout: f64,
}

/// Statuses the API documents for predictions while models change under it: 200; 404 for a
/// model or version unregistered a moment before; 503 for a full queue or 0 workers.
const DOCUMENTED: &[u16] = &[200, 404, 503];

#[derive(Default, Debug)]
struct Tally {
    sent: u64,
    by_status: BTreeMap<u16, u64>,
    lost: u64,
    wrong: u64,
    first_problem: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let repo = std::env::current_dir()?
        .ancestors()
        .find(|d| d.join("scripts/setup").exists())
        .map(PathBuf::from)
        .context("run torchfn-soak inside the repository")?;
    let exe = std::env::current_exe()?;
    let bin = args
        .torchfn_local
        .clone()
        .unwrap_or_else(|| exe.with_file_name("torchfn-local"));
    let target = exe
        .parent()
        .and_then(|p| p.parent())
        .map(PathBuf::from)
        .context("no target folder")?;
    let venv = workload::venv(&repo, args.venv.clone())?;
    let fixtures = workload::fixtures(&repo, &target, &venv)?;
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures.join("reference.json"))?)?;

    // The store: the seed classifier (1.0) and its 2.0, the scripted base_handler model.
    let dir = tempfile::tempdir()?;
    let store = dir.path().join("store");
    std::fs::create_dir_all(&store)?;
    std::fs::copy(
        fixtures.join("store/classifier.mar"),
        store.join("classifier.mar"),
    )?;
    std::fs::copy(
        fixtures.join("v2/classifier.mar"),
        store.join("classifier-v2.mar"),
    )?;
    std::fs::copy(
        fixtures.join("store/scripted.mar"),
        store.join("scripted.mar"),
    )?;
    let config = dir.path().join("config.properties");
    std::fs::write(
        &config,
        "inference_address=http://127.0.0.1:0\nmanagement_address=http://127.0.0.1:0\n\
         metrics_address=http://127.0.0.1:0\nbatch_size=16\nmax_batch_delay=5\n\
         job_queue_size=1000\ndefault_service_handler=classifier\n",
    )?;
    let mut child = Command::new(&bin)
        .current_dir(dir.path())
        .args(["--model-store"])
        .arg(&store)
        .args([
            "--models",
            "classifier=classifier.mar,scripted=scripted.mar",
        ])
        .arg("--ts-config")
        .arg(&config)
        .args(["--handler", "scripted=tensor", "--device", "cpu"])
        .env("RUST_LOG", "warn")
        .env_remove("TS_CONFIG_FILE")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("could not start {}", bin.display()))?;
    let pid = child.id();
    let mut addrs = BTreeMap::new();
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    while addrs.len() < 3 {
        let line = lines
            .next()
            .context("torchfn-local stopped before binding")??;
        if let Some((what, addr)) = line.split_once(" API bind to: http://") {
            addrs.insert(what.to_string(), addr.trim().parse::<SocketAddr>()?);
        }
    }
    let (inference, management) = (addrs["Inference"], addrs["Management"]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok((s, _, _)) =
            rt.block_on(load::once(inference, Method::GET, "/ping", Bytes::new()))
        {
            if s == 200 {
                break;
            }
        }
        if Instant::now() > deadline {
            bail!("torchfn-local never became healthy");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let rss_start = rss_kib(pid);
    let mut rss_warm = None;
    let seed = json!({"features": reference["seed_features"]}).to_string();
    let want_v1 = reference["classifier_single"].clone();
    let want_v2 = reference["classifier_v2_single"].clone();
    let want_scripted = json!(reference["tensor_single"]);
    let requests: Vec<(String, Value)> = vec![
        ("/predictions/classifier".into(), Value::Null),
        ("/predictions/classifier/1.0".into(), want_v1.clone()),
        ("/predictions/classifier/2.0".into(), want_v2.clone()),
        ("/predictions/scripted".into(), want_scripted),
    ];
    let tally = Arc::new(Mutex::new(Tally::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let timeout = Duration::from_secs_f64(args.request_timeout);
    let started = Instant::now();
    println!(
        "torchfn-soak: {} connections for {:.0} s against {inference}; management calls on {management}",
        args.concurrency, args.seconds
    );
    rt.block_on(async {
        let mut tasks = Vec::new();
        for c in 0..args.concurrency {
            let (tally, stop, requests, seed) =
                (tally.clone(), stop.clone(), requests.clone(), seed.clone());
            let (want_v1, want_v2) = (want_v1.clone(), want_v2.clone());
            tasks.push(tokio::spawn(async move {
                let mut sender = None;
                let mut i = c;
                while !stop.load(Ordering::Relaxed) {
                    let (path, want) = &requests[i % requests.len()];
                    i += 1;
                    if sender.is_none() {
                        sender = load::connect(inference).await.ok();
                    }
                    let Some(s) = sender.as_mut() else {
                        tally.lock().map(|mut t| {
                            t.sent += 1;
                            t.lost += 1;
                            t.first_problem.get_or_insert("could not connect".into());
                        }).ok();
                        continue;
                    };
                    let answer = tokio::time::timeout(timeout, send(s, inference, path, &seed)).await;
                    let mut t = tally.lock().unwrap_or_else(|e| e.into_inner());
                    t.sent += 1;
                    match answer {
                        Ok(Ok((status, body))) => {
                            *t.by_status.entry(status).or_default() += 1;
                            if status == 200 {
                                let ok = if want.is_null() {
                                    // The default version moves between 1.0 and 2.0.
                                    close(&body, &want_v1) || close(&body, &want_v2)
                                } else {
                                    close(&body, want)
                                };
                                if !ok {
                                    t.wrong += 1;
                                    t.first_problem.get_or_insert(format!("{path}: wrong answer {body}"));
                                }
                            } else if !DOCUMENTED.contains(&status) {
                                t.first_problem.get_or_insert(format!("{path}: status {status}: {body}"));
                            }
                        }
                        Ok(Err(e)) => {
                            t.lost += 1;
                            t.first_problem.get_or_insert(format!("{path}: {e:#}"));
                            sender = None;
                        }
                        Err(_) => {
                            t.lost += 1;
                            t.first_problem.get_or_insert(format!("{path}: no answer within {timeout:?}"));
                            sender = None;
                        }
                    }
                }
            }));
        }
        // The management loop: versions come and go, the default moves, workers scale.
        let calls: &[(Method, &str)] = &[
            (Method::POST, "/models?url=classifier-v2.mar&model_name=classifier&initial_workers=1&synchronous=true"),
            (Method::PUT, "/models/classifier/2.0/set-default"),
            (Method::PUT, "/models/classifier?min_worker=2&synchronous=true"),
            (Method::PUT, "/models/classifier/1.0/set-default"),
            (Method::PUT, "/models/scripted?min_worker=2&synchronous=true"),
            (Method::DELETE, "/models/classifier/2.0"),
            (Method::PUT, "/models/scripted?min_worker=1&synchronous=true"),
        ];
        let mut management_calls = BTreeMap::<String, u64>::new();
        let mut k = 0usize;
        let warm_at = (args.seconds / 10.0).max(5.0).min(args.seconds / 2.0);
        while started.elapsed().as_secs_f64() < args.seconds {
            if rss_warm.is_none() && started.elapsed().as_secs_f64() >= warm_at {
                rss_warm = rss_kib(pid);
            }
            let (method, path) = &calls[k % calls.len()];
            k += 1;
            let status = match load::once(management, method.clone(), path, Bytes::new()).await {
                Ok((s, _, _)) => s.as_u16().to_string(),
                Err(e) => format!("error: {e}"),
            };
            *management_calls.entry(format!("{method} {} → {status}", path.split('?').next().unwrap_or(path))).or_default() += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            let _ = t.await;
        }
        println!("management calls:");
        for (call, n) in &management_calls {
            println!("  {n:>6}  {call}");
        }
    });
    let elapsed = started.elapsed().as_secs_f64();
    let rss_end = rss_kib(pid);
    let _ = child.kill();
    let _ = child.wait();
    let t = tally.lock().unwrap_or_else(|e| e.into_inner());
    let answered: u64 = t.by_status.values().sum();
    println!(
        "requests sent        {:>10}  ({:.0} per second)",
        t.sent,
        t.sent as f64 / elapsed
    );
    for (status, n) in &t.by_status {
        let what = match status {
            200 => "answered 200",
            404 => "answered 404 (version being unregistered)",
            503 => "answered 503 (queue full / no workers)",
            _ => "answered, undocumented status",
        };
        println!("{what:<42} {n:>10}");
    }
    println!("{:<42} {:>10}", "answered 200 with a wrong output", t.wrong);
    println!("{:<42} {:>10}", "lost (no answer)", t.lost);
    println!(
        "{:<42} {:>10}",
        "accounted (answered + lost)",
        answered + t.lost
    );
    let mib =
        |k: Option<u64>| k.map_or("?".to_string(), |k| format!("{:.1} MiB", k as f64 / 1024.0));
    let growth = match (rss_warm, rss_end) {
        (Some(a), Some(b)) => (b as f64 - a as f64) / a as f64 * 100.0,
        _ => 0.0,
    };
    println!(
        "emulator RSS: {} idle before the load, {} warmed up, {} at the end ({growth:+.1}% from warm)",
        mib(rss_start),
        mib(rss_warm),
        mib(rss_end)
    );
    if let Some(p) = &t.first_problem {
        println!("first problem: {p}");
    }
    let undocumented = t.by_status.keys().any(|s| !DOCUMENTED.contains(s));
    if t.lost > 0 || t.wrong > 0 || undocumented || growth >= 10.0 || answered + t.lost != t.sent {
        println!("FAIL");
        std::process::exit(1);
    }
    println!("PASS: nothing lost, every answer documented, RSS growth under 10%");
    Ok(())
}

async fn send(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    addr: SocketAddr,
    path: &str,
    body: &str,
) -> anyhow::Result<(u16, Value)> {
    sender.ready().await?;
    let req = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header(HOST, addr.to_string())
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await?.to_bytes();
    Ok((
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    ))
}

/// Whether two answers agree, numbers within 1e-5.
fn close(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            (x.as_f64().unwrap_or(f64::NAN) - y.as_f64().unwrap_or(f64::NAN)).abs() <= 1e-5
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| close(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| close(v, w)))
        }
        _ => a == b,
    }
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}
