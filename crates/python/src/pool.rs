//! A model version's Python workers: a bounded queue, one thread per worker process, batches
//! formed as TorchServe forms them (the first request, then more until `batch_size` or until
//! `max_batch_delay` has passed since the first), a worker that fails or runs past the
//! response timeout killed and started again with back-off, and scaling.

use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use tokio::sync::oneshot;

use crate::protocol::{Request, Response};
use crate::worker::{Backend, Worker, WorkerConfig, WorkerError};

/// How a pool runs.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// What every worker runs with (`port` is ignored: each worker gets the next free id).
    pub worker: WorkerConfig,
    pub workers: usize,
    pub max_batch_delay: Duration,
    pub queue_size: usize,
    /// A batch not answered within it: its requests fail and its worker is restarted.
    pub response_timeout: Duration,
    /// How long a failing worker counts as recovering (the model's `maxRetryTimeoutInSec`);
    /// past it the worker counts as down (see [`Pool::healthy_workers`]).
    pub max_retry_timeout: Duration,
}

/// A request's failure, with the status TorchServe answers it with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub status: u16,
    pub message: String,
}

impl Failure {
    fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    fn worker_died() -> Self {
        Self::new(500, "Worker died.")
    }
}

/// What a caller gets back for one request.
#[derive(Debug)]
pub struct Outcome {
    pub result: Result<Response, Failure>,
    pub queue_time: Duration,
    pub inference_time: Duration,
    /// Requests in the batch that carried this one.
    pub batch_size: usize,
}

struct Job {
    request: Request,
    enqueued: Instant,
    reply: oneshot::Sender<Outcome>,
}

/// Back-off before restarting a worker that failed, by consecutive failures (TorchServe's
/// sequence, in seconds, capped at its last value).
const BACKOFF_S: [u64; 9] = [0, 1, 1, 2, 3, 5, 8, 13, 21];

struct Shared {
    backend: Backend,
    config: PoolConfig,
    rx: Receiver<Job>,
    busy: AtomicUsize,
    /// Workers whose process is loaded and waiting or working.
    live: AtomicUsize,
    /// Workers that have been failing to start for longer than `max_retry_timeout`.
    down: AtomicUsize,
}

struct Thread {
    handle: JoinHandle<()>,
    /// Dropping it stops the worker after its current batch.
    _stop: Sender<()>,
}

/// The Python workers of one model version.
pub struct Pool {
    tx: Mutex<Option<Sender<Job>>>,
    shared: Arc<Shared>,
    threads: Mutex<Vec<Thread>>,
    stopping: Mutex<Vec<JoinHandle<()>>>,
    label: String,
}

impl Pool {
    /// Starts `config.workers` workers and waits until each has loaded the model (in
    /// parallel, each within the startup timeout). The pool fails when none of them starts
    /// (TorchServe fails such a registration); when only some start it runs with those, and
    /// [`Pool::workers`] says how many. Blocking.
    pub fn start(backend: Backend, config: PoolConfig) -> Result<Pool, WorkerError> {
        let (tx, rx) = crossbeam_channel::bounded::<Job>(config.queue_size.max(1));
        let label = config.worker.model_name.clone();
        let shared = Arc::new(Shared {
            backend,
            config,
            rx,
            busy: AtomicUsize::new(0),
            live: AtomicUsize::new(0),
            down: AtomicUsize::new(0),
        });
        let pool = Pool {
            tx: Mutex::new(Some(tx)),
            shared,
            threads: Mutex::new(Vec::new()),
            stopping: Mutex::new(Vec::new()),
            label,
        };
        let n = pool.shared.config.workers;
        pool.grow(n)?;
        Ok(pool)
    }

    /// Starts `n` more workers and waits until each has loaded the model, in parallel, each
    /// within the startup timeout. Those that start are added; when none of the `n` does, the
    /// first error is returned. Returns how many were added. Blocking.
    fn grow(&self, n: usize) -> Result<usize, WorkerError> {
        let started: Vec<Result<Worker, WorkerError>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..n)
                .map(|_| {
                    let shared = &self.shared;
                    s.spawn(move || Worker::start(&shared.backend, &shared.worker_config()))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(WorkerError::Exited("; the starting thread panicked".into()))
                    })
                })
                .collect()
        });
        let mut workers = Vec::with_capacity(n);
        let mut first_error = None;
        for w in started {
            match w {
                Ok(w) => workers.push(w),
                Err(e) => {
                    tracing::warn!(model = %self.label, error = %e, "a worker did not start");
                    first_error.get_or_insert(e);
                }
            }
        }
        if let (true, Some(e)) = (workers.is_empty(), first_error) {
            return Err(e);
        }
        let added = workers.len();
        let mut threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        for w in workers {
            self.shared.live.fetch_add(1, Ordering::Relaxed);
            self.spawn(&mut threads, Some(w))
                .map_err(|e| WorkerError::Io(e, String::new()))?;
        }
        Ok(added)
    }

    /// Runs `n` workers as TorchServe's synchronous scaling does: missing ones are started
    /// here and must load the model (none starting is the caller's "Failed to start
    /// workers"; some starting leaves the pool with fewer than `n`, TorchServe's partial
    /// scaling); extra ones stop once their current batch is answered. Returns how many run.
    /// Blocking.
    pub fn scale_and_wait(&self, n: usize) -> Result<usize, WorkerError> {
        let current = self.workers();
        if n > current {
            self.grow(n - current)?;
            return Ok(self.workers());
        }
        self.scale(n).map_err(|e| WorkerError::Io(e, String::new()))
    }

    fn spawn(&self, threads: &mut Vec<Thread>, worker: Option<Worker>) -> std::io::Result<()> {
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let shared = self.shared.clone();
        let name = format!("{}-py{}", self.label, threads.len());
        let handle = std::thread::Builder::new()
            .name(name)
            .spawn(move || run(shared, worker, stop_rx))?;
        threads.push(Thread {
            handle,
            _stop: stop_tx,
        });
        Ok(())
    }

    /// Runs `n` workers: starts the missing ones (their processes start on their own
    /// threads), or stops the extra ones once their current batch is answered. Returns `n`.
    pub fn scale(&self, n: usize) -> std::io::Result<usize> {
        let mut threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        while threads.len() < n {
            self.spawn(&mut threads, None)?;
        }
        let keep = n.min(threads.len());
        let extra: Vec<Thread> = threads.drain(keep..).collect();
        if !extra.is_empty() {
            let mut stopping = self.stopping.lock().unwrap_or_else(|e| e.into_inner());
            stopping.extend(extra.into_iter().map(|t| t.handle));
            stopping.retain(|h| !h.is_finished());
        }
        if threads.is_empty() {
            // Nobody will take what is queued: answer it now.
            while let Ok(job) = self.shared.rx.try_recv() {
                let _ = job.reply.send(Outcome {
                    result: Err(no_worker(&self.label, "it was scaled to 0 workers")),
                    queue_time: job.enqueued.elapsed(),
                    inference_time: Duration::ZERO,
                    batch_size: 0,
                });
            }
        }
        Ok(threads.len())
    }

    /// Worker threads running (each with a process, or starting one).
    pub fn workers(&self) -> usize {
        self.threads.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Workers whose process has loaded the model and is serving.
    pub fn live_workers(&self) -> usize {
        self.shared.live.load(Ordering::Relaxed)
    }

    /// Workers serving or still inside their recovery window after a failure (TorchServe's
    /// health rule: a restarting worker counts until `maxRetryTimeoutInSec` has passed).
    pub fn healthy_workers(&self) -> usize {
        self.workers()
            .saturating_sub(self.shared.down.load(Ordering::Relaxed))
    }

    /// Requests waiting for a worker.
    pub fn pending(&self) -> usize {
        self.shared.rx.len()
    }

    /// Queues a request; a full queue or a pool without workers is refused at once (503).
    pub fn submit(&self, request: Request) -> Result<oneshot::Receiver<Outcome>, Failure> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            request,
            enqueued: Instant::now(),
            reply,
        };
        let guard = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        let Some(tx) = guard.as_ref() else {
            return Err(no_worker(&self.label, "it is shutting down"));
        };
        if self.workers() == 0 {
            return Err(no_worker(
                &self.label,
                "it has 0 workers; add some with PUT /models/{name}?min_worker=1",
            ));
        }
        match tx.try_send(job) {
            Ok(()) => Ok(rx),
            Err(TrySendError::Full(_)) => Err(no_worker(
                &self.label,
                &format!(
                    "its job queue is full ({} requests waiting); retry later or raise job_queue_size",
                    self.shared.config.queue_size
                ),
            )),
            Err(TrySendError::Disconnected(_)) => Err(no_worker(&self.label, "its workers stopped")),
        }
    }

    /// Stops taking requests; the workers answer what is queued, then stop. Blocking.
    pub fn shutdown(&self) {
        self.close().join();
    }

    /// Stops taking requests and hands over the threads (see [`Closing::join`]). Non-blocking.
    pub fn close(&self) -> Closing {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        let stopping =
            std::mem::take(&mut *self.stopping.lock().unwrap_or_else(|e| e.into_inner()));
        Closing { threads, stopping }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A closed pool's threads, answering what was queued.
pub struct Closing {
    threads: Vec<Thread>,
    stopping: Vec<JoinHandle<()>>,
}

impl Closing {
    /// Waits for the workers to answer what was queued and stop. Blocking.
    pub fn join(self) {
        for t in self.threads {
            let _ = t.handle.join();
        }
        for h in self.stopping {
            let _ = h.join();
        }
    }
}

fn no_worker(label: &str, why: &str) -> Failure {
    Failure::new(
        503,
        format!("Model \"{label}\" has no worker to serve inference request: {why}."),
    )
}

impl Shared {
    fn worker_config(&self) -> WorkerConfig {
        // Worker ids as TorchServe gives them: 9000, 9001, … across the process.
        static NEXT_PORT: AtomicU16 = AtomicU16::new(9000);
        let mut c = self.config.worker.clone();
        c.port = NEXT_PORT.fetch_add(1, Ordering::Relaxed);
        c
    }
}

/// One worker thread: owns a process (starting one when it has none), takes batches, and
/// restarts the process with back-off when it fails.
fn run(shared: Arc<Shared>, mut worker: Option<Worker>, stop: Receiver<()>) {
    let mut failures = 0usize;
    // When this worker stopped serving, and whether it counts as down yet.
    let mut down_since: Option<Instant> = None;
    let mut counted_down = false;
    loop {
        if worker.is_none() {
            let since = *down_since.get_or_insert_with(Instant::now);
            if !counted_down && since.elapsed() > shared.config.max_retry_timeout {
                counted_down = true;
                shared.down.fetch_add(1, Ordering::Relaxed);
            }
            let wait = Duration::from_secs(BACKOFF_S[failures.min(BACKOFF_S.len() - 1)]);
            // Back-off, cut short by a stop.
            if !wait.is_zero() && stop.recv_timeout(wait) != Err(RecvTimeoutError::Timeout) {
                break;
            }
            match Worker::start(&shared.backend, &shared.worker_config()) {
                Ok(w) => {
                    worker = Some(w);
                    shared.live.fetch_add(1, Ordering::Relaxed);
                    down_since = None;
                    if std::mem::take(&mut counted_down) {
                        shared.down.fetch_sub(1, Ordering::Relaxed);
                    }
                }
                Err(e) => {
                    failures += 1;
                    tracing::error!(model = %shared.config.worker.model_name, error = %e,
                        retry_in_s = BACKOFF_S[failures.min(BACKOFF_S.len() - 1)],
                        "a Python worker could not start");
                    continue;
                }
            }
        }
        let first = crossbeam_channel::select! {
            recv(shared.rx) -> job => match job {
                Ok(job) => job,
                Err(_) => break,
            },
            recv(stop) -> _ => break,
        };
        let mut jobs = vec![first];
        let deadline = Instant::now() + shared.config.max_batch_delay;
        while jobs.len() < shared.config.worker.batch_size.max(1) {
            let left = deadline.saturating_duration_since(Instant::now());
            let next = if left.is_zero() {
                shared.rx.try_recv().ok()
            } else {
                shared.rx.recv_timeout(left).ok()
            };
            match next {
                Some(job) => jobs.push(job),
                None => break,
            }
        }
        // A caller that went away costs no work.
        jobs.retain(|j| !j.reply.is_closed());
        if jobs.is_empty() {
            continue;
        }
        let Some(w) = worker.as_mut() else { continue };
        shared.busy.fetch_add(1, Ordering::Relaxed);
        let ok = answer(&shared, w, jobs);
        shared.busy.fetch_sub(1, Ordering::Relaxed);
        if ok {
            failures = 0;
        } else {
            // Dropping the worker kills its process; the next turn starts another.
            worker = None;
            shared.live.fetch_sub(1, Ordering::Relaxed);
            failures += 1;
        }
    }
    if worker.take().is_some() {
        shared.live.fetch_sub(1, Ordering::Relaxed);
    }
    if counted_down {
        shared.down.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Runs one batch and answers its callers. False when the worker failed (it must go).
fn answer(shared: &Shared, worker: &mut Worker, jobs: Vec<Job>) -> bool {
    let started = Instant::now();
    let n = jobs.len();
    let mut replies = Vec::with_capacity(n);
    let mut requests = Vec::with_capacity(n);
    for job in jobs {
        replies.push((job.reply, started - job.enqueued));
        requests.push(job.request);
    }
    let outcome = worker.predict(&requests, shared.config.response_timeout);
    let inference_time = started.elapsed();
    let (results, healthy): (Vec<Result<Response, Failure>>, bool) = match outcome {
        Ok(reply) if reply.code == 200 => {
            let mut by_id = reply.responses;
            let results = requests
                .iter()
                .map(
                    |r| match by_id.iter().position(|resp| resp.request_id == r.id) {
                        Some(i) => Ok(by_id.swap_remove(i)),
                        None => Err(Failure::new(503, "number of batch response mismatched")),
                    },
                )
                .collect();
            (results, true)
        }
        Ok(reply) => {
            let status = u16::try_from(reply.code)
                .ok()
                .filter(|c| (100..=999).contains(c))
                .unwrap_or(500);
            // TorchServe answers 413 from a worker as 507.
            let status = if status == 413 { 507 } else { status };
            (
                (0..n)
                    .map(|_| Err(Failure::new(status, reply.message.clone())))
                    .collect(),
                true,
            )
        }
        Err(e) => {
            tracing::error!(model = %shared.config.worker.model_name, pid = worker.pid(),
                error = %e, "a Python worker failed; restarting it");
            ((0..n).map(|_| Err(Failure::worker_died())).collect(), false)
        }
    };
    for ((reply, queue_time), result) in replies.into_iter().zip(results) {
        let _ = reply.send(Outcome {
            result,
            queue_time,
            inference_time,
            batch_size: n,
        });
    }
    healthy
}
