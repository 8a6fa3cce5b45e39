//! Runs a model version's forward passes on dedicated worker threads, batching requests
//! that wait together.
//!
//! Requests enter a bounded queue (`job_queue_size` requests; beyond it the caller gets
//! TorchServe's 503 at once). A worker takes the oldest request and, without waiting, every
//! request already queued behind it up to `batch_size` instances, so a lone request never
//! pays a delay and batches grow while the model is busy. Instances are grouped by shape;
//! each group runs in forward passes of at most `batch_size`. If a pass fails, its
//! instances are retried one by one, so only the bad instance gets the error. Callers that
//! went away are skipped before they cost a forward pass.
//!
//! A forward pass cannot be cancelled. When one runs past the model's `response_timeout`,
//! its callers have been answered at the deadline already; the next request that arrives
//! detaches that worker (it stops once its pass returns) and starts a replacement, so the
//! queue keeps moving. At most [`MAX_STUCK`] detached workers may still be running per model
//! version; past that, none is replaced until one returns.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use tokio::sync::oneshot;

use crate::error::{ErrorKind, ServeError};
use crate::handler::{Answer, Handler, Instance};
use crate::session::{set_threads, Session, SessionError};

/// How a model version batches.
#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    pub batch_size: usize,
    pub max_batch_delay: Duration,
    pub workers: usize,
    pub queue_size: usize,
    /// libtorch intra-op threads of each worker.
    pub threads_per_worker: usize,
    /// A forward pass of one instance, timed at warm-up when the model could be warmed up:
    /// the longest a cohort's wait lasts until a pass of one instance has run (see
    /// `Worker::run`).
    pub lone_pass: Option<Duration>,
    /// A pass running longer is stuck: its worker is replaced (the model's
    /// `response_timeout`).
    pub stuck_after: Duration,
}

/// Detached (stuck) workers that may still be running per model version.
pub const MAX_STUCK: usize = 2;

/// What a caller gets back for one request.
#[derive(Debug)]
pub struct Outcome {
    /// One value per instance, in order, or the request's error.
    pub outputs: Result<Vec<Answer>, ServeError>,
    pub queue_time: Duration,
    pub inference_time: Duration,
    /// Instances in the forward pass that carried this request's first instance.
    pub batch_size: usize,
    /// Where `queue_time` and `inference_time` went (for `Server-Timing`).
    pub phases: Phases,
}

/// Where one request's time went in the batcher. `queue + batch_wait` is the outcome's
/// `queue_time`; the other three are the handler's steps in the forward pass that carried the
/// request's first instance (summed over retries when a batch was split).
#[derive(Debug, Clone, Copy, Default)]
pub struct Phases {
    /// Queued until a worker took the request.
    pub queue: Duration,
    /// Taken, waiting for the rest of its batch (and for earlier groups of the batch).
    pub batch_wait: Duration,
    pub preprocess: Duration,
    pub forward: Duration,
    pub postprocess: Duration,
    /// When the worker handed the answer over (the caller measures how long it took to
    /// resume from here).
    pub replied: Option<Instant>,
}

/// Time spent in each step of the handler: preprocess, forward, postprocess.
type StepTimes = [Duration; 3];

struct Job {
    instances: Vec<Instance>,
    /// Counts the job in [`DUE`] until it is answered or dropped.
    _due: Due,
    enqueued: Instant,
    /// When a worker took it from the queue.
    taken: Option<Instant>,
    reply: oneshot::Sender<Outcome>,
}

/// The queue and worker threads of one model version.
pub struct Batcher {
    tx: Mutex<Option<Sender<Job>>>,
    rx: Receiver<Job>,
    workers: Mutex<Vec<WorkerHandle>>,
    /// Workers running now (scaling changes it).
    running: AtomicUsize,
    /// Workers asked to stop by a scale-down, still finishing their pass.
    stopping: Mutex<Vec<JoinHandle<()>>>,
    spawned: AtomicUsize,
    /// Workers detached because their pass ran past `stuck_after`, until they return.
    stuck: Mutex<Vec<JoinHandle<()>>>,
    /// When the workers were last checked for stuck passes (µs since `epoch`).
    last_check: AtomicU64,
    epoch: Instant,
    label: String,
    handler: Arc<dyn Handler>,
    session: Arc<Session>,
    busy: Arc<AtomicUsize>,
    config: BatchConfig,
    metrics: BatchMetrics,
}

/// A worker thread and the channel whose closing tells it to stop.
struct WorkerHandle {
    thread: JoinHandle<()>,
    /// Dropping it stops the worker after its current pass.
    _stop: Sender<()>,
    /// When its current pass started (µs since the batcher's epoch, plus 1); 0 when idle.
    pass_started: Arc<AtomicU64>,
}

/// The metrics one model version's batcher keeps up to date.
#[derive(Clone)]
pub struct BatchMetrics {
    /// Instances per forward pass.
    pub batch_size: prometheus::Histogram,
    /// Requests waiting for a worker.
    pub queue_length: prometheus::IntGauge,
    /// Requests whose caller went away before a worker took them.
    pub abandoned: prometheus::IntCounter,
    /// Workers replaced because a forward pass ran past the response timeout.
    pub stuck_workers: prometheus::IntCounter,
}

impl Batcher {
    /// Starts `config.workers` threads named after the model (none is allowed: requests are
    /// then refused until the model is scaled up).
    pub fn start(
        label: &str,
        handler: Arc<dyn Handler>,
        session: Arc<Session>,
        config: BatchConfig,
        metrics: BatchMetrics,
    ) -> std::io::Result<Self> {
        let (tx, rx) = crossbeam_channel::bounded::<Job>(config.queue_size.max(1));
        let batcher = Self {
            tx: Mutex::new(Some(tx)),
            rx,
            workers: Mutex::new(Vec::new()),
            running: AtomicUsize::new(0),
            stopping: Mutex::new(Vec::new()),
            spawned: AtomicUsize::new(0),
            stuck: Mutex::new(Vec::new()),
            last_check: AtomicU64::new(0),
            epoch: Instant::now(),
            label: label.to_string(),
            handler,
            session,
            busy: Arc::new(AtomicUsize::new(0)),
            config,
            metrics,
        };
        batcher.scale(config.workers)?;
        Ok(batcher)
    }

    /// Runs `n` workers: starts the missing ones, or tells the extra ones to stop once their
    /// current pass is done (queued requests stay for the others). Returns the count.
    pub fn scale(&self, n: usize) -> std::io::Result<usize> {
        let mut workers = self
            .workers
            .lock()
            .map_err(|_| std::io::Error::other("worker list lock poisoned"))?;
        while workers.len() < n {
            self.spawn_worker(&mut workers)?;
        }
        let keep = n.min(workers.len());
        let extra: Vec<WorkerHandle> = workers.drain(keep..).collect();
        if !extra.is_empty() {
            let mut stopping = self.stopping.lock().unwrap_or_else(|e| e.into_inner());
            // Dropping each stop sender tells its worker to stop.
            stopping.extend(extra.into_iter().map(|w| w.thread));
            stopping.retain(|t| !t.is_finished());
        }
        self.running.store(workers.len(), Ordering::Relaxed);
        if workers.is_empty() {
            // Nobody will take what is queued: answer it now.
            while let Ok(job) = self.rx.try_recv() {
                let _ = job.reply.send(Outcome {
                    outputs: Err(no_worker(&self.label, "it was scaled to 0 workers")),
                    queue_time: job.enqueued.elapsed(),
                    inference_time: Duration::ZERO,
                    batch_size: 0,
                    phases: Phases::default(),
                });
            }
        }
        Ok(workers.len())
    }

    /// Starts one worker and adds it to `workers`.
    fn spawn_worker(&self, workers: &mut Vec<WorkerHandle>) -> std::io::Result<()> {
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let i = self.spawned.fetch_add(1, Ordering::Relaxed);
        let pass_started = Arc::new(AtomicU64::new(0));
        let worker = Worker {
            rx: self.rx.clone(),
            stop: stop_rx,
            pass_started: pass_started.clone(),
            epoch: self.epoch,
            handler: self.handler.clone(),
            session: self.session.clone(),
            batch_size: self.config.batch_size.max(1),
            max_batch_delay: self.config.max_batch_delay,
            threads: self.config.threads_per_worker.max(1),
            lone_pass: self.config.lone_pass,
            busy: self.busy.clone(),
            metrics: self.metrics.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("{}-w{i}", self.label))
            .spawn(move || worker.run())?;
        workers.push(WorkerHandle {
            thread,
            _stop: stop_tx,
            pass_started,
        });
        Ok(())
    }

    /// Detaches workers whose pass has run past `stuck_after` and starts replacements (at
    /// most [`MAX_STUCK`] detached workers still running). Checked at most every 100 ms, by
    /// the requests that arrive.
    fn replace_stuck(&self) {
        let now = self.epoch.elapsed().as_micros() as u64;
        let last = self.last_check.load(Ordering::Relaxed);
        if now.saturating_sub(last) < 100_000
            || self
                .last_check
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let limit = self.config.stuck_after.as_micros() as u64;
        let Ok(mut workers) = self.workers.lock() else {
            return;
        };
        let is_stuck = |w: &WorkerHandle| {
            let started = w.pass_started.load(Ordering::Relaxed);
            started != 0 && now.saturating_sub(started - 1) > limit
        };
        if !workers.iter().any(is_stuck) {
            return;
        }
        let mut stuck = self.stuck.lock().unwrap_or_else(|e| e.into_inner());
        stuck.retain(|t| !t.is_finished());
        let mut i = 0;
        while i < workers.len() {
            if !is_stuck(&workers[i]) {
                i += 1;
                continue;
            }
            if stuck.len() >= MAX_STUCK {
                tracing::error!(
                    model = %self.label,
                    stuck = stuck.len(),
                    "a forward pass is past the response timeout, and {MAX_STUCK} stuck workers \
                     are still running: not replacing it"
                );
                break;
            }
            // Dropping its stop sender stops it once its pass returns.
            let w = workers.swap_remove(i);
            stuck.push(w.thread);
            self.metrics.stuck_workers.inc();
            tracing::warn!(
                model = %self.label,
                after_s = self.config.stuck_after.as_secs_f64(),
                "a forward pass is past the response timeout; starting a replacement worker"
            );
            if let Err(e) = self.spawn_worker(&mut workers) {
                tracing::error!(model = %self.label, error = %e, "could not start a replacement worker");
            }
        }
        self.running.store(workers.len(), Ordering::Relaxed);
    }

    /// Workers running now.
    pub fn workers(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }

    pub fn config(&self) -> BatchConfig {
        self.config
    }

    /// Queues a request. A full queue is refused at once (503), as TorchServe does.
    pub fn submit(
        &self,
        model_label: &str,
        instances: Vec<Instance>,
    ) -> Result<oneshot::Receiver<Outcome>, ServeError> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            instances,
            _due: Due::new(),
            enqueued: Instant::now(),
            taken: None,
            reply,
        };
        self.replace_stuck();
        let guard = self
            .tx
            .lock()
            .map_err(|_| ServeError::internal("queue lock poisoned"))?;
        let Some(tx) = guard.as_ref() else {
            return Err(no_worker(model_label, "it is shutting down"));
        };
        if self.workers() == 0 {
            return Err(no_worker(
                model_label,
                "it has 0 workers; add some with PUT /models/{name}?min_worker=1",
            ));
        }
        match tx.try_send(job) {
            Ok(()) => {
                self.metrics.queue_length.set(self.rx.len() as i64);
                Ok(rx)
            }
            Err(TrySendError::Full(_)) => Err(no_worker(
                model_label,
                &format!(
                    "its job queue is full ({} requests waiting); retry later or raise job_queue_size",
                    self.config.queue_size
                ),
            )),
            Err(TrySendError::Disconnected(_)) => Err(no_worker(model_label, "its workers stopped")),
        }
    }

    /// Requests waiting for a worker.
    pub fn pending(&self) -> usize {
        self.rx.len()
    }

    /// Workers running a batch right now.
    pub fn busy_workers(&self) -> usize {
        self.busy.load(Ordering::Relaxed)
    }

    /// Stops taking requests, lets the workers finish what is queued, and joins them.
    pub fn shutdown(&self) {
        self.close().join();
    }

    /// Stops taking requests and hands over the workers, which finish what is queued and
    /// then stop; [`Closing::join`] waits for that. Nothing here blocks, so a version can be
    /// closed wherever its last reference goes and joined on a thread of its own.
    pub fn close(&self) -> Closing {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        // The workers drain the queue (its sender is gone), then stop; their stop senders
        // live in `Closing` until they are joined, so none stops with requests still queued.
        let workers = self
            .workers
            .lock()
            .map(|mut w| std::mem::take(&mut *w))
            .unwrap_or_default();
        self.running.store(0, Ordering::Relaxed);
        let stopping = self
            .stopping
            .lock()
            .map(|mut s| std::mem::take(&mut *s))
            .unwrap_or_default();
        Closing { workers, stopping }
    }
}

/// A closed batcher's workers, still finishing what was queued.
pub struct Closing {
    workers: Vec<WorkerHandle>,
    stopping: Vec<JoinHandle<()>>,
}

impl Closing {
    /// Waits for the workers to finish what was queued and stop. Blocking.
    pub fn join(self) {
        for w in self.workers {
            let _ = w.thread.join();
        }
        for h in self.stopping {
            let _ = h.join();
        }
    }
}

impl Drop for Batcher {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Requests queued or in a forward pass, in every batcher of the process (see
/// [`wait_for_lone_answer`]).
static DUE: AtomicUsize = AtomicUsize::new(0);
/// Forward passes whose answers have been handed over, in every batcher of the process.
static PASSES_ANSWERED: AtomicU64 = AtomicU64::new(0);
/// Forward passes running now whose model's previous pass took longer than the spin time.
static LONG_PASSES: AtomicUsize = AtomicUsize::new(0);

/// Requests queued or in a forward pass, in every batcher of the process.
pub fn requests_due() -> usize {
    DUE.load(Ordering::Acquire)
}

/// What [`wait_for_lone_answer`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoneWait {
    /// Did not wait, or stopped: not exactly one request in flight (or another one came),
    /// its model's previous pass was long, polling is off, or another thread is waiting.
    Skipped,
    /// The request's answer was handed over while it polled.
    Answered,
    /// The spin time ran out first.
    TimedOut,
}

/// For an async thread about to sleep (tokio's `on_thread_park`): when the process has exactly
/// one request in flight and its model's previous pass was short (at most the spin time),
/// polls until a pass's answers are handed over, for at most the spin time, yielding the core
/// between polls. The answer's task is then already queued when the thread would have gone
/// to sleep, so it is sent without a sleeping thread's wake-up (about 30 µs on a 2-CPU VM,
/// half of a small model's whole answer at concurrency 1). With more than one request in
/// flight the thread sleeps as before: other connections wake it, and a polling thread would
/// take CPU from them (measured: concurrency 64 served 6% less when it polled there).
pub fn wait_for_lone_answer() -> LoneWait {
    static WAITING: AtomicBool = AtomicBool::new(false);
    let spin = spin_time();
    let lone = || DUE.load(Ordering::Acquire) == 1 && LONG_PASSES.load(Ordering::Acquire) == 0;
    if spin.is_zero() || !lone() || WAITING.swap(true, Ordering::Acquire) {
        return LoneWait::Skipped;
    }
    let answered = PASSES_ANSWERED.load(Ordering::Acquire);
    let start = Instant::now();
    let waited = loop {
        if PASSES_ANSWERED.load(Ordering::Acquire) != answered || DUE.load(Ordering::Acquire) == 0 {
            break LoneWait::Answered;
        }
        if !lone() {
            break LoneWait::Skipped;
        }
        if start.elapsed() >= spin {
            break LoneWait::TimedOut;
        }
        std::thread::yield_now();
    };
    WAITING.store(false, Ordering::Release);
    waited
}

/// One request counted in [`DUE`] while it lives.
struct Due;

impl Due {
    fn new() -> Self {
        DUE.fetch_add(1, Ordering::Release);
        Self
    }
}

impl Drop for Due {
    fn drop(&mut self) {
        DUE.fetch_sub(1, Ordering::Release);
    }
}

/// How long a model worker keeps polling its queue after a pass before it sleeps (while its
/// requests come one at a time, [`LoneRun`]), and an async thread polls for a lone request's
/// answer ([`wait_for_lone_answer`]), unless `TORCHFN_WORKER_SPIN_US` says otherwise (0 turns
/// both off).
///
/// A sleeping thread's wake-up costs about 30 µs on a 2-CPU VM, once for the worker and once
/// for the request's task; a client's next request typically comes 60–150 µs after an
/// answer. Polling for 300 µs takes the worker's wake-up out of the path (`scripts/bench`,
/// seed model at concurrency 1: p50 190 → 93 µs), and the async thread's wait the other
/// (p50 86–95 → 36–37 µs). Between polls the core goes to any other runnable thread, and an
/// idle worker (no pass in the last 300 µs) sleeps, so the cost is at most 300 µs of CPU per
/// pass at low traffic and nothing when the server is idle.
pub const DEFAULT_SPIN: Duration = Duration::from_micros(300);

fn spin_time() -> Duration {
    static SPIN: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *SPIN.get_or_init(|| match std::env::var("TORCHFN_WORKER_SPIN_US") {
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(us) => Duration::from_micros(us),
            Err(_) => {
                tracing::warn!(TORCHFN_WORKER_SPIN_US = %v, "not a whole number of µs; ignored");
                DEFAULT_SPIN
            }
        },
        Err(_) => DEFAULT_SPIN,
    })
}

/// Whether a model worker polls its queue after a pass ([`DEFAULT_SPIN`]) or sleeps: it polls
/// once [`LoneRun::TO_POLL`] passes in a row have found their request alone (no other one
/// taken with it or waiting).
///
/// Alone, a client's next request comes 60–150 µs after its answer and polling takes the
/// worker's wake-up out of its path. Once requests overlap, the next one is being read by the
/// async side while the pass runs; polling for it then only takes CPU from that side and from
/// the clients (a profile of the seed model at concurrency 16 had 40% of the model worker's
/// time in `sched_yield`), and a sleeping worker costs one wake-up a pass, shared by its batch.
#[derive(Debug, Default)]
struct LoneRun(u32);

impl LoneRun {
    /// Two in a row, because at concurrency 16 about a fifth of the passes still find one
    /// request alone.
    const TO_POLL: u32 = 2;

    /// Counts a pass that found its request alone, or starts over.
    fn saw(&mut self, alone: bool) {
        self.0 = if alone { self.0.saturating_add(1) } else { 0 };
    }

    fn polls(&self) -> bool {
        self.0 >= Self::TO_POLL
    }
}

/// Takes jobs from `rx` into `jobs` until they hold `target` instances or `deadline` passes;
/// `items` is what they hold now. A wait shorter than `spin` polls the queue, giving the core
/// to any other runnable thread between polls: a timed sleep oversleeps by the kernel's timer
/// slack (50 µs by default), longer than such a wait. `torchfn-bench --against` on the 2-CPU
/// VM, the seed model at concurrency 16: this wait (bounded by a one-instance pass, polled
/// when short) served 10–18% more than the one before it (bounded by the previous pass, a
/// timed sleep); not polled, it lost 8% to no wait at all, polled 1.5%; the wide model at
/// concurrency 16 served 8–15% less with no wait.
fn take_until(
    rx: &Receiver<Job>,
    jobs: &mut Vec<Job>,
    mut items: usize,
    target: usize,
    deadline: Instant,
    spin: Duration,
) -> usize {
    while items < target {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            break;
        };
        let next = if left <= spin {
            match rx.try_recv() {
                Ok(job) => Some(job),
                Err(crossbeam_channel::TryRecvError::Empty) => {
                    std::thread::yield_now();
                    continue;
                }
                Err(crossbeam_channel::TryRecvError::Disconnected) => None,
            }
        } else {
            rx.recv_timeout(left).ok()
        };
        let Some(mut job) = next else {
            break;
        };
        job.taken = Some(Instant::now());
        items += job.instances.len();
        jobs.push(job);
    }
    items
}

fn no_worker(model_label: &str, why: &str) -> ServeError {
    ServeError::new(
        ErrorKind::ServiceUnavailable,
        format!("Model \"{model_label}\" has no worker to serve inference request: {why}."),
    )
}

struct Worker {
    rx: Receiver<Job>,
    /// Disconnected when a scale-down stops this worker.
    stop: Receiver<()>,
    /// When the current pass started (µs since `epoch`, plus 1); 0 when idle.
    pass_started: Arc<AtomicU64>,
    epoch: Instant,
    handler: Arc<dyn Handler>,
    session: Arc<Session>,
    batch_size: usize,
    max_batch_delay: Duration,
    threads: usize,
    /// A pass of one instance: the warm-up's, then the fastest one-instance pass here.
    lone_pass: Option<Duration>,
    busy: Arc<AtomicUsize>,
    metrics: BatchMetrics,
}

impl Worker {
    fn run(mut self) {
        set_threads(self.threads);
        // The previous pass: how many instances it ran and how long it took.
        let mut last = (0usize, Duration::ZERO);
        let spin = spin_time();
        let mut last_done: Option<Instant> = None;
        let mut lone = LoneRun::default();
        loop {
            let poll_until = last_done.filter(|_| lone.polls()).map(|t| t + spin);
            let Some(mut first) = self.next_job(poll_until) else {
                break;
            };
            first.taken = Some(Instant::now());
            let oldest = first.enqueued;
            let mut items = first.instances.len();
            let mut jobs = vec![first];
            while items < self.batch_size {
                match self.rx.try_recv() {
                    Ok(mut job) => {
                        job.taken = Some(Instant::now());
                        items += job.instances.len();
                        jobs.push(job);
                    }
                    Err(_) => break,
                }
            }
            lone.saw(jobs.len() == 1 && self.rx.is_empty());
            // A cohort is arriving (more than one request waited) but fewer instances than
            // the previous pass ran: wait a little for the rest of it, never past the oldest
            // request's max_batch_delay. The wait can save no more than one pass's fixed
            // cost, which a pass of one instance shows, so it lasts at most that (before one
            // is known, at most the previous pass). A lone request (nothing else waiting)
            // runs at once.
            let target = last.0.min(self.batch_size);
            if jobs.len() > 1 && items < target && !self.max_batch_delay.is_zero() {
                let wait = self.lone_pass.map_or(last.1, |lone| lone.min(last.1));
                let deadline = (oldest + self.max_batch_delay).min(Instant::now() + wait);
                take_until(&self.rx, &mut jobs, items, target, deadline, spin);
            }
            self.metrics.queue_length.set(self.rx.len() as i64);
            // A caller that disconnected costs no forward pass.
            let before = jobs.len();
            jobs.retain(|j| !j.reply.is_closed());
            if jobs.len() < before {
                let gone = before - jobs.len();
                self.metrics.abandoned.inc_by(gone as u64);
                tracing::debug!(requests = gone, "skipped requests whose callers went away");
            }
            if jobs.is_empty() {
                continue;
            }
            let items: usize = jobs.iter().map(|j| j.instances.len()).sum();
            let long = last.1 > spin;
            if long {
                LONG_PASSES.fetch_add(1, Ordering::Release);
            }
            self.busy.fetch_add(1, Ordering::Relaxed);
            let started = Instant::now();
            self.pass_started.store(
                self.epoch.elapsed().as_micros() as u64 + 1,
                Ordering::Relaxed,
            );
            let answered = self.run_batch(jobs);
            if long {
                LONG_PASSES.fetch_sub(1, Ordering::Release);
            }
            self.pass_started.store(0, Ordering::Relaxed);
            last = (items, started.elapsed());
            // Only a pass that answered counts: one that failed early says nothing of a pass's cost.
            if items == 1 && answered {
                self.lone_pass = Some(self.lone_pass.map_or(last.1, |l| l.min(last.1)));
            }
            last_done = Some(Instant::now());
            self.busy.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The next request, or `None` when the worker must stop. Until `spin_until` the queue is
    /// polled (giving the core to any other runnable thread between polls), so a request that
    /// follows soon after the previous pass is taken without a sleeping thread's wake-up;
    /// after it, the worker sleeps until a request or the stop signal comes.
    fn next_job(&self, spin_until: Option<Instant>) -> Option<Job> {
        if let Some(until) = spin_until {
            while Instant::now() < until {
                match self.rx.try_recv() {
                    Ok(job) => return Some(job),
                    Err(crossbeam_channel::TryRecvError::Disconnected) => return None,
                    Err(crossbeam_channel::TryRecvError::Empty) => {}
                }
                if let Err(crossbeam_channel::TryRecvError::Disconnected) = self.stop.try_recv() {
                    return None;
                }
                std::thread::yield_now();
            }
        }
        crossbeam_channel::select! {
            recv(self.rx) -> job => job.ok(),
            recv(self.stop) -> _ => None,
        }
    }

    /// Runs one pass over `jobs` and answers each; whether every instance got a value.
    fn run_batch(&self, jobs: Vec<Job>) -> bool {
        let started = Instant::now();
        let queue_times: Vec<Duration> = jobs.iter().map(|j| started - j.enqueued).collect();
        let outcome = catch_unwind(AssertUnwindSafe(|| self.compute(&jobs)));
        let inference_time = started.elapsed();
        let (results, sizes, steps) = match outcome {
            Ok(r) => r,
            Err(_) => {
                tracing::error!("a handler panicked; the batch's requests get 503");
                let err = ServeError::new(ErrorKind::PredictionFailed, "Prediction failed");
                let results = jobs
                    .iter()
                    .map(|j| j.instances.iter().map(|_| Err(err.clone())).collect())
                    .collect();
                (
                    results,
                    vec![0; jobs.len()],
                    vec![StepTimes::default(); jobs.len()],
                )
            }
        };
        let answered = results.iter().flatten().all(Result::is_ok);
        for ((((job, result), queue_time), batch_size), steps) in jobs
            .into_iter()
            .zip(results)
            .zip(queue_times)
            .zip(sizes)
            .zip(steps)
        {
            let many = job.instances.len() > 1;
            let outputs = result
                .into_iter()
                .enumerate()
                .map(|(i, r)| {
                    r.map_err(|mut e| {
                        if many {
                            e.message = format!("instance {i}: {}", e.message);
                        }
                        e
                    })
                })
                .collect::<Result<Vec<_>, _>>();
            let taken = job.taken.unwrap_or(started);
            let phases = Phases {
                queue: taken.saturating_duration_since(job.enqueued),
                batch_wait: started.saturating_duration_since(taken),
                preprocess: steps[0],
                forward: steps[1],
                postprocess: steps[2],
                replied: Some(Instant::now()),
            };
            let _ = job.reply.send(Outcome {
                outputs,
                queue_time,
                inference_time,
                batch_size,
                phases,
            });
        }
        PASSES_ANSWERED.fetch_add(1, Ordering::Release);
        answered
    }

    /// Per job, per instance results, and per job the size of its first forward pass and
    /// the time that pass's steps took.
    #[allow(clippy::type_complexity)]
    fn compute(
        &self,
        jobs: &[Job],
    ) -> (
        Vec<Vec<Result<Answer, ServeError>>>,
        Vec<usize>,
        Vec<StepTimes>,
    ) {
        // Group (job, instance) pairs that can share a forward pass (same kind of input,
        // same shape), keeping arrival order.
        let mut groups: Vec<(&Instance, Vec<(usize, usize)>)> = Vec::new();
        for (j, job) in jobs.iter().enumerate() {
            for (i, inst) in job.instances.iter().enumerate() {
                match groups
                    .iter_mut()
                    .find(|(first, _)| first.batches_with(inst))
                {
                    Some((_, members)) => members.push((j, i)),
                    None => groups.push((inst, vec![(j, i)])),
                }
            }
        }
        let mut results: Vec<Vec<Option<Result<Answer, ServeError>>>> = jobs
            .iter()
            .map(|j| (0..j.instances.len()).map(|_| None).collect())
            .collect();
        let mut sizes = vec![0usize; jobs.len()];
        let mut steps = vec![StepTimes::default(); jobs.len()];
        for (_, members) in &groups {
            for chunk in members.chunks(self.batch_size) {
                self.metrics.batch_size.observe(chunk.len() as f64);
                let items: Vec<&Instance> =
                    chunk.iter().map(|&(j, i)| &jobs[j].instances[i]).collect();
                let mut took = StepTimes::default();
                let values = self.forward_or_split(&items, &mut took);
                for &(j, i) in chunk {
                    if i == 0 {
                        sizes[j] = chunk.len();
                        steps[j] = took;
                    }
                }
                for (&(j, i), v) in chunk.iter().zip(values) {
                    results[j][i] = Some(v);
                }
            }
        }
        let results = results
            .into_iter()
            .map(|r| {
                r.into_iter()
                    .map(|v| v.unwrap_or_else(|| Err(ServeError::internal("instance was not run"))))
                    .collect()
            })
            .collect();
        (results, sizes, steps)
    }

    /// The handler's three steps on `items`, adding the time of each to `took`.
    fn forward(
        &self,
        items: &[&Instance],
        took: &mut StepTimes,
    ) -> Result<Vec<Answer>, SessionError> {
        let t0 = Instant::now();
        let inputs = self.handler.preprocess(items, self.session.device());
        let t1 = Instant::now();
        took[0] += t1 - t0;
        let output = self.handler.inference(&self.session, &inputs?);
        let t2 = Instant::now();
        took[1] += t2 - t1;
        let values = self.handler.answers(output?, items.len());
        took[2] += t2.elapsed();
        values
    }

    fn forward_or_split(
        &self,
        items: &[&Instance],
        took: &mut StepTimes,
    ) -> Vec<Result<Answer, ServeError>> {
        match self.forward(items, took) {
            Ok(values) => values.into_iter().map(Ok).collect(),
            Err(e) if items.len() > 1 => {
                tracing::warn!(error = %e.summary(), rows = items.len(), "batch failed; retrying its instances one by one");
                items
                    .iter()
                    .map(
                        |item| match self.forward(std::slice::from_ref(item), took) {
                            Ok(mut v) if v.len() == 1 => Ok(v.remove(0)),
                            Ok(_) => Err(self
                                .classify(&SessionError::BatchMismatch { sent: 1, got: 0 }, item)),
                            Err(e) => Err(self.classify(&e, item)),
                        },
                    )
                    .collect()
            }
            Err(e) => items
                .first()
                .map(|item| Err(self.classify(&e, item)))
                .into_iter()
                .collect(),
        }
    }

    /// A failed instance's error: 400 when the model's first layer shows the instance has
    /// the wrong size, else TorchServe's 503 "Prediction failed". Details go to the log.
    fn classify(&self, e: &SessionError, item: &Instance) -> ServeError {
        if let SessionError::Input(why) = e {
            return ServeError::bad_request(why.clone());
        }
        if let Some(why) = item
            .as_f32()
            .and_then(|_| self.session.rejects_shape(&item.shape))
        {
            tracing::info!(error = %e.summary(), "instance rejected by the model");
            return ServeError::bad_request(format!("the model cannot take this input: {why}"));
        }
        tracing::error!(error = %e, "prediction failed");
        match e {
            SessionError::OutputForm(why) => ServeError::new(
                ErrorKind::PredictionFailed,
                format!("Invalid model predict output: {why}"),
            ),
            SessionError::BatchMismatch { .. } => ServeError::new(
                ErrorKind::PredictionFailed,
                "number of batch response mismatched",
            ),
            _ => ServeError::new(ErrorKind::PredictionFailed, "Prediction failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn job(instances: usize) -> Job {
        let (reply, _) = oneshot::channel();
        Job {
            instances: (0..instances)
                .map(|_| Instance::f32(vec![0.0], vec![1]))
                .collect(),
            _due: Due::new(),
            enqueued: Instant::now(),
            taken: None,
            reply,
        }
    }

    /// The worker polls after passes only while they find their request alone: from the
    /// second such pass in a row, and no longer once a pass finds company.
    #[test]
    fn a_worker_polls_only_while_requests_come_alone() {
        let mut lone = LoneRun::default();
        assert!(!lone.polls(), "a fresh worker sleeps");
        lone.saw(true);
        assert!(!lone.polls(), "one lone pass is not yet a run");
        lone.saw(true);
        assert!(lone.polls());
        lone.saw(true);
        assert!(lone.polls());
        lone.saw(false);
        assert!(!lone.polls(), "a crowded pass ends the run");
        lone.saw(true);
        assert!(!lone.polls());
        lone.saw(true);
        assert!(lone.polls());
    }

    /// A cohort's wait takes what is queued up to its target, takes nothing once its
    /// deadline has passed, and, polling (shorter than the spin time) or sleeping, takes a
    /// request that comes while it waits.
    #[test]
    fn a_cohorts_wait_stops_at_its_target_or_its_deadline() {
        let spin = Duration::from_micros(300);
        let far = Instant::now() + Duration::from_secs(60);
        let (tx, rx) = crossbeam_channel::unbounded();
        for _ in 0..3 {
            tx.send(job(1)).unwrap();
        }
        let mut jobs = Vec::new();
        assert_eq!(take_until(&rx, &mut jobs, 0, 2, far, spin), 2);
        assert_eq!(jobs.len(), 2);
        assert!(jobs.iter().all(|j| j.taken.is_some()));
        assert_eq!(rx.len(), 1, "the rest stays queued");

        let past = Instant::now()
            .checked_sub(Duration::from_millis(1))
            .unwrap();
        let mut late = Vec::new();
        assert_eq!(take_until(&rx, &mut late, 0, 5, past, spin), 0);
        assert!(late.is_empty());
        let _ = rx.try_recv().unwrap();

        // Polled (the wait is shorter than the spin time given) and slept (longer).
        for spin in [Duration::from_secs(120), Duration::ZERO] {
            let sender = {
                let tx = tx.clone();
                std::thread::spawn(move || tx.send(job(2)).unwrap())
            };
            let mut jobs = vec![job(1)];
            assert_eq!(take_until(&rx, &mut jobs, 1, 3, far, spin), 3);
            assert_eq!(jobs.len(), 2);
            sender.join().unwrap();
        }
    }
}
