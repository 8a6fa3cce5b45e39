//! The store's error, and the mapping of local file-system failures onto it.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use super::Location;

/// An object-store failure, worded for the person who has to fix it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The text is not a location the store understands.
    #[error("`{input}` is not an object-store location: {reason}")]
    InvalidLocation {
        /// What was given.
        input: String,
        /// Why it was refused, with the accepted forms.
        reason: String,
    },
    /// No object (or no bucket) there.
    #[error(
        "{location} does not exist: check the bucket and key (or the path), the region \
         (AWS_REGION) and the endpoint (AWS_ENDPOINT_URL_S3)"
    )]
    NotFound {
        /// The missing object.
        location: Location,
    },
    /// The credentials in use may not do this.
    #[error(
        "access denied to {location}: check that the credentials in the environment \
         (AWS_ACCESS_KEY_ID, AWS_PROFILE or the function's role) allow it and that the bucket \
         policy does (for a file: its permissions)"
    )]
    AccessDenied {
        /// The object that was refused.
        location: Location,
    },
    /// A create-only write found an object already there.
    #[error("{location} already exists; it was not overwritten")]
    AlreadyExists {
        /// The existing object.
        location: Location,
    },
    /// A compare-and-swap write found the object changed since it was read.
    #[error("{location} changed since it was read (its ETag no longer matches): read it again and retry")]
    PreconditionFailed {
        /// The object that changed.
        location: Location,
    },
    /// The object was replaced while it was being downloaded.
    #[error("{location} was replaced while it was being downloaded; the download was discarded")]
    Modified {
        /// The object that changed.
        location: Location,
    },
    /// The object (or what arrived of it) has another size than expected.
    #[error(
        "{location} has {actual} bytes where {expected} were expected: it is truncated or not \
         the recorded version; the download was discarded"
    )]
    Truncated {
        /// The object.
        location: Location,
        /// Bytes expected.
        expected: u64,
        /// Bytes found.
        actual: u64,
    },
    /// The downloaded bytes hash to another SHA-256 than expected.
    #[error(
        "{location} has SHA-256 {actual}, not the {against} {expected}: the object is corrupt \
         or not the recorded version; the download was discarded"
    )]
    ChecksumMismatch {
        /// The object.
        location: Location,
        /// The expected hex SHA-256.
        expected: String,
        /// The hex SHA-256 of what was downloaded.
        actual: String,
        /// Where the expectation came from ("expected" or "checksum S3 recorded").
        against: &'static str,
    },
    /// Another S3 failure, after the retries for transient ones ran out.
    #[error("S3 {operation} of {location} failed: {message}")]
    S3 {
        /// The S3 operation (`GetObject`, …).
        operation: &'static str,
        /// The object.
        location: Location,
        /// The SDK's error chain, with a hint where one is known.
        message: String,
    },
    /// A local file-system failure.
    #[error("could not {action} {}: {source}", path.display())]
    Io {
        /// What was being done (`read`, `write`, …).
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The AWS environment is incomplete.
    #[error("the S3 client is not configured: {0}")]
    Config(String),
}

impl StoreError {
    /// Whether the object (or bucket) does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound { .. })
    }
}

pub(super) type Result<T, E = StoreError> = std::result::Result<T, E>;

pub(super) fn io_error(action: &'static str, path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// A file error, with missing files and permission errors given the same kinds as on S3.
pub(super) fn file_error(
    location: &Location,
    action: &'static str,
    path: &Path,
    source: std::io::Error,
) -> StoreError {
    match source.kind() {
        ErrorKind::NotFound => StoreError::NotFound {
            location: location.clone(),
        },
        ErrorKind::PermissionDenied => StoreError::AccessDenied {
            location: location.clone(),
        },
        _ => io_error(action, path, source),
    }
}
