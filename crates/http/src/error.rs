//! The one table from the engine's error kinds to HTTP statuses and TorchServe's error body
//! (`{"code", "type", "message"}`, pretty-printed as TorchServe's Gson does). Domain crates
//! return `ServeError`; only this crate turns one into a response.

use std::ops::Deref;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use torchfn_archive::mar::MarError;
use torchfn_engine::error::{ErrorKind, ServeError};

/// HTTP status and TorchServe `type` of each kind.
pub fn status_and_type(kind: ErrorKind) -> (StatusCode, &'static str) {
    use ErrorKind::*;
    match kind {
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
        Status(code) => (
            StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            "InternalServerException",
        ),
    }
}

/// A `ServeError` on its way to the client.
#[derive(Debug, Clone)]
pub struct HttpError(pub ServeError);

impl HttpError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self(ServeError::new(kind, message))
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self(ServeError::bad_request(message))
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self(ServeError::internal(message))
    }
    pub fn model_not_found(name: &str) -> Self {
        Self(ServeError::model_not_found(name))
    }
    pub fn version_not_found(name: &str, version: &str) -> Self {
        Self(ServeError::version_not_found(name, version))
    }
    pub fn resource_not_found() -> Self {
        Self(ServeError::resource_not_found())
    }
    pub fn method_not_allowed() -> Self {
        Self(ServeError::method_not_allowed())
    }

    pub fn status(&self) -> StatusCode {
        status_and_type(self.0.kind).0
    }

    /// The TorchServe error body.
    pub fn body(&self) -> Vec<u8> {
        let (status, ty) = status_and_type(self.0.kind);
        let value = serde_json::json!({
            "code": status.as_u16(),
            "type": ty,
            "message": self.0.message,
        });
        let mut out = serde_json::to_vec_pretty(&value).unwrap_or_default();
        out.push(b'\n');
        out
    }
}

impl Deref for HttpError {
    type Target = ServeError;
    fn deref(&self) -> &ServeError {
        &self.0
    }
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl From<ServeError> for HttpError {
    fn from(e: ServeError) -> Self {
        Self(e)
    }
}

impl From<MarError> for HttpError {
    fn from(e: MarError) -> Self {
        Self(e.into())
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let mut resp = (self.status(), self.body()).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        resp
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn body_has_torchserve_shape_and_order() {
        let body = HttpError::model_not_found("x").body();
        let text = String::from_utf8(body).unwrap();
        assert_eq!(
            text,
            "{\n  \"code\": 404,\n  \"type\": \"ModelNotFoundException\",\n  \"message\": \"Model not found: x\"\n}\n"
        );
    }
}
