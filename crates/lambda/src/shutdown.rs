//! Lambda's SHUTDOWN phase.
//!
//! Lambda signals a runtime before it ends an execution environment only when an extension
//! is registered: it then sends the runtime SIGTERM and, with internal extensions only,
//! allows 500 ms before SIGKILL. Without one, the process is killed outright. So during INIT
//! a function registers a no-op internal extension ([`register_extension`], subscribed to no
//! events) and, on the signal ([`on_signal`]), within its budget: lets the invocations in
//! flight finish (an invocation counts, through [`CountInvocations`], until its answer has
//! been posted to the Runtime API), runs the function's own stop (its workers), removes what
//! it unpacked, and exits 0. The signal is handled the same way when no extension could be
//! registered (a local emulator stopping the function).

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use lambda_runtime::{LambdaInvocation, Service};
use tokio::sync::Notify;

use crate::runtime;

/// The name the shutdown extension registers under (unique within a function).
pub const EXTENSION_NAME: &str = "torchfn-shutdown";

type BoxError = lambda_runtime::Error;

/// How many invocations are being answered.
#[derive(Default)]
pub struct InFlight {
    count: AtomicUsize,
    /// Told each time the count falls to zero.
    idle: Notify,
}

impl InFlight {
    /// The invocations being answered now.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Counts one invocation until the guard is dropped.
    pub fn enter(self: &Arc<Self>) -> Counted {
        self.count.fetch_add(1, Ordering::AcqRel);
        Counted(self.clone())
    }

    /// Waits until no invocation is being answered, or `limit` has passed; the invocations
    /// still unanswered.
    pub async fn settle(&self, limit: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            // Registered before the count is read: a fall to zero in between still wakes it.
            idle.as_mut().enable();
            let count = self.count();
            if count == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return self.count();
            }
        }
    }
}

/// One invocation being answered (see [`InFlight::enter`]).
pub struct Counted(Arc<InFlight>);

impl Drop for Counted {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
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
    /// The layer to hand `lambda_runtime::Runtime::layer`.
    pub fn layer(
        inflight: Arc<InFlight>,
    ) -> impl lambda_runtime::tower::Layer<S, Service = Self> + Clone {
        lambda_runtime::tower::layer::layer_fn(move |inner| Self {
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
        let counted = self.inflight.enter();
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
/// invocation. Outside Lambda it does nothing; a Runtime API without the Extensions API (some
/// local emulators) only costs the warning.
pub async fn register_extension() {
    let Some(client) = runtime::runtime_api_client() else {
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
    let id = match runtime::send(&client, request).await {
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
        let answered = runtime::send(&client, request).await.map(|r| r.status());
        tracing::debug!(answer = ?answered.map_err(|e| e.to_string()), "shutdown extension's next event");
    });
    tracing::debug!(extension = EXTENSION_NAME, "shutdown extension registered");
}

/// What a function does in its SHUTDOWN phase, after the invocations in flight.
pub struct Cleanup {
    /// Stops the function's workers (blocking; run off the async threads).
    pub stop: Box<dyn FnOnce() + Send>,
    /// A folder to remove last (what the function unpacked into `/tmp`).
    pub remove: Option<PathBuf>,
}

/// How long a function whose Runtime API went away waits for the signal before it ends with
/// the runtime's error: the signal and the closed connection arrive together, in either order.
pub const SIGNAL_GRACE: Duration = Duration::from_millis(500);

/// Whether the SHUTDOWN phase has begun, from [`on_signal`].
pub struct Stopping {
    signalled: tokio::sync::watch::Receiver<bool>,
}

impl Stopping {
    /// For a function whose runtime loop has ended (its Runtime API went away): when that is
    /// the environment stopping (the signal came, or comes within [`SIGNAL_GRACE`]: a local
    /// emulator signals the function, then closes its Runtime API), waits for the SHUTDOWN
    /// phase, which exits the process; otherwise returns, and the function ends with the
    /// runtime's error.
    pub async fn outlast(mut self) {
        let signalled = matches!(
            tokio::time::timeout(SIGNAL_GRACE, self.signalled.wait_for(|&s| s)).await,
            Ok(Ok(_))
        );
        if signalled {
            tracing::info!("the Runtime API went away during SHUTDOWN; finishing it");
            std::future::pending::<()>().await;
        }
    }
}

/// When `signal` completes (SIGTERM or SIGINT): within `budget`, three quarters of it for the
/// invocations in flight to be answered, the rest for `cleanup`; then the process exits 0.
/// The runtime loop may end meanwhile (an emulator stops its Runtime API as it signals the
/// function): see [`Stopping::outlast`].
pub fn on_signal(
    signal: impl Future<Output = ()> + Send + 'static,
    inflight: Arc<InFlight>,
    budget: Duration,
    cleanup: Cleanup,
) -> Stopping {
    let (signalled, stopping) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        signal.await;
        signalled.send_replace(true);
        let started = Instant::now();
        let unanswered = inflight.settle(budget * 3 / 4).await;
        let stopped = tokio::task::spawn_blocking(cleanup.stop);
        let workers_stopped =
            tokio::time::timeout(budget.saturating_sub(started.elapsed()), stopped)
                .await
                .is_ok();
        let removed = match cleanup.remove {
            Some(folder) => tokio::task::spawn_blocking(move || std::fs::remove_dir_all(folder))
                .await
                .is_ok_and(|removed| removed.is_ok()),
            None => true,
        };
        tracing::info!(
            elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            unanswered,
            workers_stopped,
            removed_unpacked_models = removed,
            "SHUTDOWN complete"
        );
        use std::io::Write;
        let _ = std::io::stdout().flush();
        std::process::exit(0);
    });
    Stopping {
        signalled: stopping,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn settle_returns_when_the_last_invocation_is_answered() {
        let inflight = Arc::new(InFlight::default());
        assert_eq!(inflight.settle(Duration::ZERO).await, 0);
        let first = inflight.enter();
        let second = inflight.enter();
        assert_eq!(inflight.count(), 2);
        let (entered_tx, entered_rx) = tokio::sync::oneshot::channel::<()>();
        let answering = tokio::spawn(async move {
            entered_rx.await.unwrap();
            drop(first);
            drop(second);
        });
        let settled = {
            let inflight = inflight.clone();
            tokio::spawn(async move { inflight.settle(Duration::from_secs(60)).await })
        };
        entered_tx.send(()).unwrap();
        answering.await.unwrap();
        assert_eq!(settled.await.unwrap(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_runtime_loop_ended_by_the_signal_waits_for_the_shutdown() {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let stopping = Stopping { signalled: rx };
        let waiting = tokio::spawn(stopping.outlast());
        tx.send_replace(true);
        // Signalled: it waits for the SHUTDOWN phase (which exits the process) however long.
        tokio::time::sleep(SIGNAL_GRACE * 100).await;
        assert!(!waiting.is_finished());
        waiting.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_runtime_loop_ended_without_the_signal_returns_after_the_grace() {
        let (_tx, rx) = tokio::sync::watch::channel(false);
        let started = tokio::time::Instant::now();
        Stopping { signalled: rx }.outlast().await;
        assert_eq!(started.elapsed(), SIGNAL_GRACE);
    }

    #[tokio::test(start_paused = true)]
    async fn settle_gives_up_at_its_limit() {
        let inflight = Arc::new(InFlight::default());
        let _held = inflight.enter();
        assert_eq!(inflight.settle(Duration::from_millis(300)).await, 1);
    }
}
