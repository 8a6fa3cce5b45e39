//! torchfn's object store (`file://` paths and `s3://` objects), the model-version registry
//! kept in it, and the registrar's logic that turns archive uploads into registry records.
//! The AWS SDK, no libtorch.

pub mod registrar;
pub mod registry;
pub mod store;
