//! torchfn's Python backend, for archives whose handler has no Rust built-in: a pool of
//! worker processes per model version, each running TorchServe's own backend
//! (`ts/model_service_worker.py` from the `torchserve` package), spoken to over its binary
//! socket protocol. The handler, its `initialize`, its custom metrics and the model-config
//! YAML reach Python exactly as under TorchServe; batching, queueing, time-outs, restarts and
//! scaling are torchfn's.
//!
//! - [`protocol`]: the frontend–worker messages.
//! - [`worker`]: one process, started, loaded and asked for batches.
//! - [`metrics`]: the handler's metric updates on a worker's output.
//! - [`pool`]: a model version's workers, its queue and its batches.

pub mod metrics;
pub mod pool;
pub mod protocol;
pub mod worker;

pub use metrics::{MetricLine, MetricSink};
pub use pool::{Failure, Outcome, Pool, PoolConfig};
pub use protocol::{Input, Request, Response};
pub use worker::{Backend, Worker, WorkerConfig, WorkerError};
