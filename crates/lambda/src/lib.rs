//! What torchfn's Lambda functions share, whatever they serve: the log set-up Lambda's
//! advanced logging controls expect ([`logging`]), settings read from flags or the
//! environment with blank variables counting as unset ([`settings`]), the Lambda environment
//! and its Runtime API ([`runtime`]: is this Lambda, are Lambda's variables all set, the
//! init-error report), the SHUTDOWN-phase extension and invocation count ([`shutdown`]), and
//! CloudWatch Embedded Metric Format lines ([`emf`]).
//!
//! It links no libtorch (no `torchfn-engine`, `tch` or `torch-sys`): the registrar function
//! uses it.

pub mod emf;
pub mod logging;
pub mod runtime;
pub mod settings;
pub mod shutdown;

pub use logging::init_logging;
pub use runtime::{check_environment, in_lambda, report_init_error};
