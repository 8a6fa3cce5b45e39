//! The engine's error: what went wrong (a kind, named after TorchServe's exception classes)
//! and a message meant for the client. It knows nothing of HTTP: `torchfn-http` holds the one
//! table from kind to status and TorchServe's error body.

use torchfn_archive::mar::MarError;

/// What went wrong, as TorchServe's exception class names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    BadRequest,
    InvalidModel,
    DownloadArchive,
    ModelNotFound,
    ModelVersionNotFound,
    ResourceNotFound,
    MethodNotAllowed,
    Conflict,
    /// TorchServe's `InvalidModelVersionException` (403), e.g. removing a default version.
    Forbidden,
    /// A missing, wrong or expired token (TorchServe answers 400).
    InvalidKey,
    RequestTimeout,
    PayloadTooLarge,
    ServiceUnavailable,
    /// The model failed on a batch: TorchServe answers 503 with `InternalServerException`.
    PredictionFailed,
    Internal,
    /// A status a Python handler chose (TorchServe's `PredictionException(message, code)`),
    /// answered with `InternalServerException`.
    Status(u16),
}

/// An error a client sees: a kind and a message meant for the client. Internal details are
/// logged where the error is made, not put in the message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ServeError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ServeError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadRequest, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }
    pub fn model_not_found(name: &str) -> Self {
        Self::new(ErrorKind::ModelNotFound, format!("Model not found: {name}"))
    }
    pub fn version_not_found(name: &str, version: &str) -> Self {
        Self::new(
            ErrorKind::ModelVersionNotFound,
            format!("Model version: {version} does not exist for model: {name}"),
        )
    }
    pub fn resource_not_found() -> Self {
        Self::new(
            ErrorKind::ResourceNotFound,
            "Requested resource is not found, please refer to API document.",
        )
    }
    pub fn method_not_allowed() -> Self {
        Self::new(
            ErrorKind::MethodNotAllowed,
            "Requested method is not allowed, please refer to API document.",
        )
    }
}

impl From<MarError> for ServeError {
    fn from(e: MarError) -> Self {
        let kind = if e.is_not_found() {
            ErrorKind::ModelNotFound
        } else {
            ErrorKind::InvalidModel
        };
        ServeError::new(kind, e.to_string())
    }
}
