//! torchfn's engine: everything that runs a model. The libtorch session (the one seam to
//! libtorch), the built-in handlers, the batcher, the model manager, the registry follower
//! and the metrics; and the Python backend's place among them (`python`, over `torchfn-python`). Errors are `error::ServeError`, which knows nothing of HTTP.

pub mod batcher;
pub mod error;
pub mod follow;
pub mod handler;
pub mod libtorch;
pub mod manager;
pub mod metrics;
pub mod python;
pub mod session;
pub mod torchvision;
