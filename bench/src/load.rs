//! The load generator: a closed loop over keep-alive HTTP/1.1 connections on loopback.
//!
//! `concurrency` connections each send the next request as soon as the previous one is
//! answered. After a warm-up, every answer that completes inside the measuring window counts:
//! throughput is those answers over the window, latencies are theirs. Bounded in time (a
//! connection stops sending at the end of the window) and in count (`max_requests`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpStream;

/// What to send: one POST body, again and again.
#[derive(Clone, Debug)]
pub struct Target {
    pub addr: SocketAddr,
    pub path: String,
    pub body: Bytes,
}

/// How long and how hard.
#[derive(Clone, Copy, Debug)]
pub struct Load {
    pub concurrency: usize,
    pub warmup: Duration,
    pub duration: Duration,
    /// Answers recorded at most (all connections together), so memory stays bounded.
    pub max_requests: usize,
}

/// One point of the load: a closed loop at one concurrency.
#[derive(Clone, Debug, Serialize)]
pub struct LoadResult {
    pub concurrency: usize,
    /// Answers (200) completed inside the measuring window.
    pub requests: usize,
    /// Failures during the whole run, warm-up included: non-200 answers, transport errors
    /// and timeouts.
    pub errors: usize,
    /// The first failure seen, for diagnosis.
    pub first_error: Option<String>,
    pub window_s: f64,
    pub throughput_rps: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    /// Means of torchfn's `x-torchfn-batch-size`, `-queue-us` and `-inference-us` headers
    /// over the window's answers (absent for servers that do not send them).
    pub mean_batch_size: Option<f64>,
    pub mean_queue_us: Option<f64>,
    pub mean_inference_us: Option<f64>,
    /// Whether a connection reached its share of `max_requests` and stopped early (the
    /// throughput is then an underestimate).
    pub capped: bool,
    /// CPU time per answer over the window, of the server process and of the benchmark's
    /// own process (the load generator; for the in-process HTTP floors, the server too).
    pub server_cpu_us_per_request: Option<f64>,
    pub bench_cpu_us_per_request: Option<f64>,
}

/// A request that takes longer than this counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Default)]
struct ConnStats {
    latencies_us: Vec<u32>,
    errors: usize,
    first_error: Option<String>,
    batch: HeaderSum,
    queue: HeaderSum,
    inference: HeaderSum,
    capped: bool,
}

#[derive(Default, Clone, Copy)]
struct HeaderSum {
    sum: f64,
    n: u64,
}

impl HeaderSum {
    fn add(&mut self, headers: &hyper::HeaderMap, name: &str) {
        if let Some(v) = headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<f64>().ok())
        {
            self.sum += v;
            self.n += 1;
        }
    }

    fn merge(&mut self, other: HeaderSum) {
        self.sum += other.sum;
        self.n += other.n;
    }

    fn mean(&self) -> Option<f64> {
        (self.n > 0).then(|| self.sum / self.n as f64)
    }
}

impl ConnStats {
    fn error(&mut self, what: String) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(what);
        }
    }
}

/// Runs one closed-loop point against `target`.
pub async fn run(target: &Target, load: Load) -> LoadResult {
    let start = Instant::now();
    let measure_from = start + load.warmup;
    let stop_at = measure_from + load.duration;
    let per_conn = (load.max_requests / load.concurrency.max(1)).max(1);
    let mut tasks = Vec::with_capacity(load.concurrency);
    for _ in 0..load.concurrency {
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            connection_loop(&target, measure_from, stop_at, per_conn).await
        }));
    }
    let mut all = ConnStats::default();
    for t in tasks {
        match t.await {
            Ok(s) => {
                all.latencies_us.extend_from_slice(&s.latencies_us);
                all.errors += s.errors;
                if all.first_error.is_none() {
                    all.first_error = s.first_error;
                }
                all.batch.merge(s.batch);
                all.queue.merge(s.queue);
                all.inference.merge(s.inference);
                all.capped |= s.capped;
            }
            Err(e) => all.error(format!("load task failed: {e}")),
        }
    }
    let window = load.duration.as_secs_f64();
    let mut lat = all.latencies_us;
    lat.sort_unstable();
    LoadResult {
        concurrency: load.concurrency,
        requests: lat.len(),
        errors: all.errors,
        first_error: all.first_error,
        window_s: window,
        throughput_rps: lat.len() as f64 / window,
        p50_us: percentile(&lat, 0.50),
        p90_us: percentile(&lat, 0.90),
        p99_us: percentile(&lat, 0.99),
        max_us: lat.last().map_or(0.0, |&v| v as f64),
        mean_batch_size: all.batch.mean(),
        mean_queue_us: all.queue.mean(),
        mean_inference_us: all.inference.mean(),
        capped: all.capped,
        server_cpu_us_per_request: None,
        bench_cpu_us_per_request: None,
    }
}

/// [`run`], with the CPU time `server` (a process id) and this process use during the
/// measuring window: sampled by a thread at the window's start and end.
pub fn run_with_cpu(
    rt: &tokio::runtime::Runtime,
    target: &Target,
    load: Load,
    server: Option<u32>,
) -> LoadResult {
    let me = std::process::id();
    let sampler = std::thread::spawn(move || {
        std::thread::sleep(load.warmup);
        let start = (server.and_then(cpu_time), cpu_time(me));
        std::thread::sleep(load.duration);
        let end = (server.and_then(cpu_time), cpu_time(me));
        (start, end)
    });
    let mut r = rt.block_on(run(target, load));
    if let Ok(((s0, b0), (s1, b1))) = sampler.join() {
        let per = |a: Option<Duration>, b: Option<Duration>| {
            let used = b?.checked_sub(a?)?;
            (r.requests > 0).then(|| used.as_secs_f64() * 1e6 / r.requests as f64)
        };
        r.server_cpu_us_per_request = per(s0, s1);
        r.bench_cpu_us_per_request = per(b0, b1);
    }
    r
}

/// Nearest-rank percentile of sorted values (0 when empty).
pub fn percentile<T: Copy + Into<f64>>(sorted: &[T], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].into()
}

async fn connection_loop(
    target: &Target,
    measure_from: Instant,
    stop_at: Instant,
    max: usize,
) -> ConnStats {
    let mut stats = ConnStats::default();
    let host = target.addr.to_string();
    'connect: while Instant::now() < stop_at {
        let mut sender = match connect(target.addr).await {
            Ok(s) => s,
            Err(e) => {
                stats.error(format!("connect: {e:#}"));
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        loop {
            let sent = Instant::now();
            if sent >= stop_at {
                break 'connect;
            }
            if stats.latencies_us.len() >= max {
                stats.capped = true;
                break 'connect;
            }
            let answer = tokio::time::timeout(
                REQUEST_TIMEOUT,
                send(&mut sender, &host, &target.path, target.body.clone()),
            )
            .await;
            let done = Instant::now();
            let (status, headers) = match answer {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    stats.error(format!("request: {e:#}"));
                    continue 'connect;
                }
                Err(_) => {
                    stats.error(format!("no answer within {REQUEST_TIMEOUT:?}"));
                    continue 'connect;
                }
            };
            if status != StatusCode::OK {
                stats.error(format!("status {status}"));
                continue;
            }
            if done >= measure_from && done <= stop_at {
                let us = (done - sent).as_micros().min(u32::MAX as u128) as u32;
                stats.latencies_us.push(us);
                stats.batch.add(&headers, "x-torchfn-batch-size");
                stats.queue.add(&headers, "x-torchfn-queue-us");
                stats.inference.add(&headers, "x-torchfn-inference-us");
            }
        }
    }
    stats
}

/// Opens one keep-alive HTTP/1.1 connection (Nagle off, as servers and real clients set).
pub async fn connect(addr: SocketAddr) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("could not connect to {addr}"))?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// Sends one POST and reads the whole answer; returns its status and headers.
async fn send(
    sender: &mut SendRequest<Full<Bytes>>,
    host: &str,
    path: &str,
    body: Bytes,
) -> anyhow::Result<(StatusCode, hyper::HeaderMap)> {
    sender.ready().await?;
    let req = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header(HOST, host)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(body))?;
    let resp = sender.send_request(req).await?;
    let (parts, body) = resp.into_parts();
    body.collect().await?;
    Ok((parts.status, parts.headers))
}

/// One request on a fresh connection: status, headers and body. For probes and the
/// cold-start measurement, not for load. Gives up after `REQUEST_TIMEOUT`.
pub async fn once(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Bytes,
) -> anyhow::Result<(StatusCode, hyper::HeaderMap, Bytes)> {
    once_as(addr, method, path, body, "application/json").await
}

/// [`once`] with a body of another media type (an image, say).
pub async fn once_as(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Bytes,
    content_type: &str,
) -> anyhow::Result<(StatusCode, hyper::HeaderMap, Bytes)> {
    let exchange = async {
        let mut sender = connect(addr).await?;
        sender.ready().await?;
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, addr.to_string())
            .header(CONTENT_TYPE, content_type)
            .body(Full::new(body))?;
        let resp = sender.send_request(req).await?;
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await?.to_bytes();
        anyhow::Ok((parts.status, parts.headers, bytes))
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .with_context(|| format!("no answer from {addr}{path} within {REQUEST_TIMEOUT:?}"))?
}

/// CPU time a process has used, all its threads, user and system (`/proc/PID/stat`; the
/// kernel reports it in USER_HZ ticks, 100 per second on Linux).
pub fn cpu_time(pid: u32) -> Option<std::time::Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) start after the last ')'.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the command.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(std::time::Duration::from_millis(ticks * 10))
}
