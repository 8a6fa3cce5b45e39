//! Lambda's SHUTDOWN phase.
//!
//! Lambda signals a runtime before it ends an execution environment only when an extension
//! is registered: it then sends the runtime SIGTERM and, with internal extensions only,
//! allows 500 ms before SIGKILL. Without one, the process is killed outright. So during INIT
//! the function registers a no-op internal extension ([`EXTENSION_NAME`], subscribed to no
//! events) and, on SIGTERM or SIGINT, within `TORCHFN_SHUTDOWN_BUDGET_MS` (400 ms by default,
//! inside Lambda's 500): lets the invocations in flight finish (an invocation counts until
//! its answer has been posted to the Runtime API), stops the model's workers, removes the
//! unpacked archive from `/tmp`, and exits 0. The signal is handled the same way when no
//! extension could be registered (a local emulator stopping the function).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use lambda_http::lambda_runtime::LambdaInvocation;
use lambda_http::Service;
use torchfn_engine::manager::Manager;

use crate::lambda_env;

/// The name the function's extension registers under (unique within a function).
pub const EXTENSION_NAME: &str = "torchfn-shutdown";

type BoxError = lambda_http::Error;

/// How many invocations are being answered.
#[derive(Default)]
pub struct InFlight(AtomicUsize);

impl InFlight {
    fn count(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

struct Counted(Arc<InFlight>);

impl Counted {
    fn enter(inflight: &Arc<InFlight>) -> Self {
        inflight.0.fetch_add(1, Ordering::AcqRel);
        Self(inflight.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The runtime's outermost service: counts each invocation from the moment it is received
/// until its answer (or error) has been sent to the Runtime API.
#[derive(Clone)]
pub struct CountInvocations<S> {
    inner: S,
    inflight: Arc<InFlight>,
}

impl<S> CountInvocations<S> {
    pub fn layer(inflight: Arc<InFlight>) -> impl tower::Layer<S, Service = Self> + Clone {
        tower::layer::layer_fn(move |inner| Self {
            inner,
            inflight: inflight.clone(),
        })
    }
}

impl<S> Service<LambdaInvocation> for CountInvocations<S>
where
    S: Service<LambdaInvocation, Response = (), Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = ();
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, invocation: LambdaInvocation) -> Self::Future {
        let counted = Counted::enter(&self.inflight);
        tracing::debug!(request_id = %invocation.context.request_id, "invocation received");
        let answered = self.inner.call(invocation);
        Box::pin(async move {
            let result = answered.await;
            drop(counted);
            result
        })
    }
}

/// Registers the no-op internal extension; must run before the runtime first asks for an
/// invocation. A Runtime API without the Extensions API (some local emulators) only costs the
/// warning.
pub async fn register_extension() {
    let Some(client) = lambda_env::runtime_api_client() else {
        return;
    };
    let request = lambda_runtime_api_client::build_request()
        .method("POST")
        .uri("/2020-01-01/extension/register")
        .header("Lambda-Extension-Name", EXTENSION_NAME)
        .header("content-type", "application/json")
        .body(lambda_runtime_api_client::body::Body::from(
            r#"{"events":[]}"#,
        ));
    let id = match lambda_env::send(&client, request).await {
        Ok(response) if response.status().is_success() => response
            .headers()
            .get("lambda-extension-identifier")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        Ok(response) => {
            tracing::warn!(status = %response.status(), "the Runtime API refused the shutdown extension; SHUTDOWN will not be signalled");
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not register the shutdown extension; SHUTDOWN will not be signalled");
            return;
        }
    };
    let Some(id) = id else {
        tracing::warn!("the Runtime API registered the shutdown extension without an identifier; SHUTDOWN will not be signalled");
        return;
    };
    // INIT ends once the runtime and every extension have asked for their next event. This
    // one is subscribed to none, so its request stays open for the environment's life.
    tokio::spawn(async move {
        let request = lambda_runtime_api_client::build_request()
            .method("GET")
            .uri("/2020-01-01/extension/event/next")
            .header("Lambda-Extension-Identifier", id)
            .body(lambda_runtime_api_client::body::Body::empty());
        let answered = lambda_env::send(&client, request).await.map(|r| r.status());
        tracing::debug!(answer = ?answered.map_err(|e| e.to_string()), "shutdown extension's next event");
    });
    tracing::debug!(extension = EXTENSION_NAME, "shutdown extension registered");
}

/// The shutdown budget: `TORCHFN_SHUTDOWN_BUDGET_MS`, 400 ms by default.
pub fn budget() -> anyhow::Result<Duration> {
    Ok(Duration::from_millis(
        crate::env_num("TORCHFN_SHUTDOWN_BUDGET_MS")?.unwrap_or(400),
    ))
}

/// On SIGTERM or SIGINT: the shutdown described in the module's documentation, then exit 0.
pub fn on_signal(manager: Arc<Manager>, inflight: Arc<InFlight>, budget: Duration) {
    tokio::spawn(async move {
        torchfn_http::shutdown_signal().await;
        let started = Instant::now();
        // Three quarters of the budget for answers, the rest for stopping and clean-up.
        let answers_by = budget * 3 / 4;
        while inflight.count() > 0 && started.elapsed() < answers_by {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let unanswered = inflight.count();
        let stopping = manager.clone();
        let stopped = tokio::task::spawn_blocking(move || stopping.shutdown());
        let workers_stopped =
            tokio::time::timeout(budget.saturating_sub(started.elapsed()), stopped)
                .await
                .is_ok();
        let removed = std::fs::remove_dir_all(manager.unpack_root()).is_ok();
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            unanswered,
            workers_stopped,
            removed_unpacked_models = removed,
            "SHUTDOWN complete"
        );
        use std::io::Write;
        let _ = std::io::stdout().flush();
        std::process::exit(0);
    });
}
