//! The HTTP/1.1 listener every front end uses: a router served on a TCP listener with bounds
//! on what a client can hold open. A client must send its request headers within
//! [`Limits::header_timeout`] (slow-loris connections are closed; idle keep-alive connections
//! too); a request may carry at most 100 headers in at most 64 KiB (more is 431, from hyper);
//! bodies are read with a time limit by `read_body`. On shutdown the listener closes at once
//! and connections finish the requests they carry, up to [`Limits::drain`].

use std::future::Future;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

/// Time bounds of the listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest wait for a request's headers (`TORCHFN_HEADER_TIMEOUT_S`, default 10 s).
    pub header_timeout: Duration,
    /// Longest wait for a request's whole body once its headers are in
    /// (`TORCHFN_BODY_TIMEOUT_S`, default 30 s); slower clients get 408.
    pub body_timeout: Duration,
    /// Longest wait for in-flight requests once shutdown starts (`TORCHFN_DRAIN_TIMEOUT_S`,
    /// default 30 s).
    pub drain: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            drain: Duration::from_secs(30),
        }
    }
}

impl Limits {
    /// The defaults with `TORCHFN_HEADER_TIMEOUT_S`, `TORCHFN_BODY_TIMEOUT_S` and
    /// `TORCHFN_DRAIN_TIMEOUT_S` applied, read once per process.
    pub fn from_env() -> Self {
        static LIMITS: std::sync::OnceLock<Limits> = std::sync::OnceLock::new();
        *LIMITS.get_or_init(Self::read_env)
    }

    fn read_env() -> Self {
        let secs = |name: &str| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|s| s.is_finite() && *s > 0.0)
                .map(Duration::from_secs_f64)
        };
        let d = Self::default();
        Self {
            header_timeout: secs("TORCHFN_HEADER_TIMEOUT_S").unwrap_or(d.header_timeout),
            body_timeout: secs("TORCHFN_BODY_TIMEOUT_S").unwrap_or(d.body_timeout),
            drain: secs("TORCHFN_DRAIN_TIMEOUT_S").unwrap_or(d.drain),
        }
    }
}

/// The async runtime the front ends serve HTTP on: a multi-threaded tokio runtime with one
/// worker per core less one (at least one), or `TOKIO_WORKER_THREADS` when set.
///
/// The core left over is for the model workers, which run forward passes on their own
/// threads: under load at least one of them is busy, and an async worker on the same core
/// would be preempted by it and park and unpark around it. `scripts/bench` on the 2-CPU VM,
/// seed model, batching on, concurrency 16: 37.9k → 44.5k answers/s with one async worker
/// instead of two (concurrency 1 and 64 no slower, the wide model unchanged).
///
/// A worker about to sleep while the process's only request in flight is in a short forward
/// pass polls for its answer first (`torchfn_engine::batcher::wait_for_lone_answer`), so the
/// answer does not wait for a sleeping thread's wake-up.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    builder.on_thread_park(|| {
        torchfn_engine::batcher::wait_for_lone_answer();
    });
    // tokio reads TOKIO_WORKER_THREADS itself when no count is given.
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        builder.worker_threads(async_workers());
    }
    builder.build()
}

/// Async workers for this machine: its cores less one, at least one.
pub fn async_workers() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    cores.saturating_sub(1).max(1)
}

/// The async workers [`runtime`] starts: `TOKIO_WORKER_THREADS` when set (tokio reads it),
/// else [`async_workers`].
pub fn runtime_workers() -> usize {
    std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(async_workers)
}

/// Largest request head (request line and headers) read.
const MAX_HEAD_BYTES: usize = 64 << 10;

/// Serves `router` on `listener` until `shutdown` completes, then lets open connections
/// finish their requests (at most `limits.drain`).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            // At most 100 headers is hyper's own limit (more is 431). Setting it, even to
            // 100, makes hyper build its header arrays element by element and move them for
            // every request, where its default is made in place.
            .max_buf_size(MAX_HEAD_BYTES);
        let conn = builder.serve_connection(
            TokioIo::new(stream),
            TowerToHyperService::new(router.clone()),
        );
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            drain_s = limits.drain.as_secs_f64(),
            "connections still open after the drain time; closing them"
        );
    }
    Ok(())
}
