//! torchfn's runtime library.
//!
//! Layered by weight: archive, manifest, model-config and `config.properties` code builds
//! without libtorch (the S3 registrar function must not link it); everything that runs a
//! model — sessions, handlers, the batcher, the model manager, metrics and the REST API —
//! sits behind the `torch` feature.

pub mod manifest;
pub mod mar;
pub mod model_config;
pub mod properties;
#[cfg(feature = "s3")]
pub mod registrar;
#[cfg(feature = "s3")]
pub mod registry;
pub mod settings;
#[cfg(feature = "s3")]
pub mod store;

#[cfg(feature = "torch")]
pub mod api;
#[cfg(feature = "torch")]
pub mod batcher;
#[cfg(feature = "torch")]
pub mod error;
#[cfg(feature = "torch")]
pub mod follow;
#[cfg(feature = "torch")]
pub mod handler;
#[cfg(feature = "torch")]
pub mod manager;
#[cfg(feature = "torch")]
pub mod metrics;
#[cfg(feature = "torch")]
pub mod session;
#[cfg(feature = "torch")]
pub mod torchvision;
