//! The one table from error kind to HTTP status and TorchServe error body
//! (`{"code", "type", "message"}`, pretty-printed as TorchServe's Gson does).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::mar::MarError;

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
}

impl ErrorKind {
    /// HTTP status and TorchServe `type` of each kind.
    pub fn status_and_type(self) -> (StatusCode, &'static str) {
        use ErrorKind::*;
        match self {
            BadRequest => (StatusCode::BAD_REQUEST, "BadRequestException"),
            InvalidModel => (StatusCode::BAD_REQUEST, "InvalidModelException"),
            DownloadArchive => (StatusCode::BAD_REQUEST, "DownloadArchiveException"),
            ModelNotFound => (StatusCode::NOT_FOUND, "ModelNotFoundException"),
            ModelVersionNotFound => (StatusCode::NOT_FOUND, "ModelVersionNotFoundException"),
            ResourceNotFound => (StatusCode::NOT_FOUND, "ResourceNotFoundException"),
            MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowedException"),
            Conflict => (StatusCode::CONFLICT, "ConflictStatusException"),
            Forbidden => (StatusCode::FORBIDDEN, "InvalidModelVersionException"),
            InvalidKey => (StatusCode::BAD_REQUEST, "InvalidKeyException"),
            RequestTimeout => (StatusCode::REQUEST_TIMEOUT, "RequestTimeoutException"),
            PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "PayloadTooLargeException"),
            ServiceUnavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailableException",
            ),
            PredictionFailed => (StatusCode::SERVICE_UNAVAILABLE, "InternalServerException"),
            Internal => (StatusCode::INTERNAL_SERVER_ERROR, "InternalServerException"),
        }
    }
}

/// An error a client sees: a kind and a message meant for the client. Internal details are
/// logged where the error is made, not put in the message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ApiError {
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
    pub fn status(&self) -> StatusCode {
        self.kind.status_and_type().0
    }

    /// The TorchServe error body.
    pub fn body(&self) -> Vec<u8> {
        let (status, ty) = self.kind.status_and_type();
        let value = serde_json::json!({
            "code": status.as_u16(),
            "type": ty,
            "message": self.message,
        });
        let mut out = serde_json::to_vec_pretty(&value).unwrap_or_default();
        out.push(b'\n');
        out
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status(), self.body()).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        resp
    }
}

impl From<MarError> for ApiError {
    fn from(e: MarError) -> Self {
        let kind = if e.is_not_found() {
            ErrorKind::ModelNotFound
        } else {
            ErrorKind::InvalidModel
        };
        ApiError::new(kind, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn body_has_torchserve_shape_and_order() {
        let body = ApiError::model_not_found("x").body();
        let text = String::from_utf8(body).unwrap();
        assert_eq!(
            text,
            "{\n  \"code\": 404,\n  \"type\": \"ModelNotFoundException\",\n  \"message\": \"Model not found: x\"\n}\n"
        );
    }
}
