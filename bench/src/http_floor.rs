//! The HTTP floors: servers that answer every prediction with a fixed small JSON after
//! reading and parsing the body.
//!
//! - [`Stack::Torchfn`], the like-for-like floor: torchfn's own listener (`serve::serve`, with
//!   its connection limits), the same middleware as the real ports (`with_common`) and the
//!   same body reading — everything torchfn does over HTTP, minus the model.
//! - [`Stack::BareAxum`], a second reference: `axum::serve` with the route alone, no torchfn
//!   middleware.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::Context;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use torchfn_archive::settings::Settings;
use torchfn_engine::manager::Manager;
use torchfn_engine::metrics::Metrics;
use torchfn_http::error::HttpError;
use torchfn_http::serve::Limits;
use torchfn_http::{json_response, read_body, with_common, AppState};

/// A no-op server on 127.0.0.1, port chosen by the OS, on a tokio runtime of its own, so that
/// it does not share the load generator's threads. The runtime is `torchfn-local`'s own
/// (`torchfn_http::serve::runtime`: one async worker per core less one, or
/// `TOKIO_WORKER_THREADS`), so the floor differs from `torchfn-local` only in its model. It
/// is also the stack at its fastest here: on the 2-CPU VM, seed body, concurrency 16, this
/// floor served 82k answers/s on one async worker against 60–63k on two (one per core, the
/// floor's runtime before), in two runs each of `TOKIO_WORKER_THREADS=1|2 torchfn-bench
/// --models seed --concurrency 16`.
pub struct NoopServer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// Which HTTP stack the no-op server runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stack {
    Torchfn,
    BareAxum,
}

impl Stack {
    /// The row's server name in the results.
    pub fn name(self) -> &'static str {
        match self {
            Stack::Torchfn => "http-floor",
            Stack::BareAxum => "axum-floor",
        }
    }
}

impl NoopServer {
    pub fn start(stack: Stack) -> anyhow::Result<Self> {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel::<anyhow::Result<SocketAddr>>();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("noop-server".into())
            .spawn(move || {
                let result = torchfn_http::serve::runtime()
                    .context("could not start the no-op server's runtime")
                    .and_then(|rt| rt.block_on(serve(stack, addr_tx.clone(), stop_rx)));
                if let Err(e) = result {
                    let _ = addr_tx.send(Err(e));
                }
            })?;
        let addr = addr_rx
            .recv()
            .context("the no-op server stopped before binding")??;
        Ok(Self {
            addr,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }
}

impl Drop for NoopServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(
    stack: Stack,
    addr_tx: std::sync::mpsc::Sender<anyhow::Result<SocketAddr>>,
    stop: oneshot::Receiver<()>,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new().context("could not create metrics")?);
    let manager = Arc::new(
        Manager::new(Settings::default(), metrics).context("could not create a model manager")?,
    );
    let state = AppState::new(manager);
    state.set_ready();
    let routes = Router::new().route("/predictions/{*path}", any(noop));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("could not bind the no-op server")?;
    let _ = addr_tx.send(Ok(listener.local_addr()?));
    let stopped = async move {
        let _ = stop.await;
    };
    match stack {
        Stack::Torchfn => {
            torchfn_http::serve::serve(
                listener,
                with_common(routes, state),
                Limits::from_env(),
                stopped,
            )
            .await?;
        }
        Stack::BareAxum => {
            axum::serve(listener, routes.with_state(state))
                .with_graceful_shutdown(stopped)
                .await?;
        }
    }
    Ok(())
}

/// Reads and parses the body as a prediction would, then answers without a model.
async fn noop(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let limit = state.manager.settings().max_request_size;
    let bytes = match read_body(body, &headers, limit).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(_) => json_response(StatusCode::OK, &json!({"status": "ok"})),
        Err(e) => HttpError::bad_request(format!("malformed JSON: {e}")).into_response(),
    }
}
