//! torchfn's model archives and configuration, without libtorch, the AWS SDK or tokio: the
//! only place in the project that knows the MAR layout.
//!
//! Layered so that nothing points back up: `error` ← `manifest`, `model_config` ← `mar`;
//! `properties` ← `settings`.

pub mod error;
pub mod handlers;
pub mod inspect;
pub mod manifest;
pub mod mar;
pub mod metrics_config;
pub mod model_config;
pub mod properties;
pub mod settings;
