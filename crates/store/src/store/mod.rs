//! The object store: one type over local files (`file:///abs/path` or a plain path) and S3
//! objects (`s3://bucket/key`), for model archives and registry records.
//!
//! S3 goes through aws-sdk-s3 with region, credentials and endpoint from the standard AWS
//! environment (`AWS_REGION`, `AWS_ACCESS_KEY_ID`/`AWS_PROFILE`/the function's role,
//! `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL` for S3-compatible servers, which are then
//! addressed path-style). Large objects download with parallel ranged GETs written straight to
//! their offsets in the destination file, so memory stays bounded whatever the object's size,
//! and every download is checked against the expected size and SHA-256 before it is renamed
//! into place. Registry records use conditional writes: `If-None-Match: *` to create,
//! `If-Match: <etag>` to compare-and-swap.
//!
//! Local files stand in for S3 on one machine: the same checks, conditional writes made atomic
//! with a hard link (create) and an advisory lock plus rename (compare-and-swap). They are not
//! safe across machines sharing a network file system.
//!
//! One submodule per concern: `location` (parsing and writing locations), `error`, `read`
//! (metadata, whole and ranged reads), `write` (puts, conditional writes, deletes), `list`,
//! `download` (parallel ranged downloads, checked and renamed into place) with `landing`
//! (reading a download while it lands), `s3` (client set-up, error mapping, backoff), `local`
//! (temporary files, the writers' lock, file metadata and copies) and `checksum`.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_sdk_s3::Client;
use tokio::sync::OnceCell;

mod checksum;
mod download;
mod error;
mod landing;
mod list;
mod local;
mod location;
mod read;
mod s3;
mod write;

pub use error::StoreError;
pub use landing::Reopen;
pub use location::Location;

use error::Result;
use s3::build_client;

/// What the store knows about an object without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Size in bytes.
    pub size: u64,
    /// S3's ETag, quotes included (opaque; pass it back to `put_if_match`). `None` for files
    /// from `head`/`list`, where it would mean reading the whole file; `get` gives one.
    pub etag: Option<String>,
    /// Lowercase hex SHA-256 of the whole object, when S3 holds a full-object SHA-256 checksum
    /// for it (uploaded with one); never for files or multipart composite checksums.
    pub sha256: Option<String>,
    /// When the object was last written, when known.
    pub last_modified: Option<SystemTime>,
}

/// A small object read whole, with the ETag to use for a later `put_if_match`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    /// The object's bytes.
    pub bytes: Vec<u8>,
    /// S3's ETag (quotes included), or for files the hex SHA-256 of `bytes`.
    pub etag: String,
}

/// What a download must match; a mismatch discards it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expect {
    /// The size recorded for this version, in bytes.
    pub size: Option<u64>,
    /// The hex SHA-256 recorded for this version (case-insensitive).
    pub sha256: Option<String>,
}

/// How a large S3 object is fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DownloadOptions {
    /// Bytes per ranged GET (default 8 MiB).
    pub part_size: u64,
    /// Ranged GETs in flight at once (default 8); memory is about `concurrency` × 1 MiB.
    pub concurrency: usize,
}

impl Default for DownloadOptions {
    fn default() -> Self {
        DownloadOptions {
            part_size: 8 << 20,
            concurrency: 8,
        }
    }
}

/// What a finished, verified download was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadReport {
    /// Bytes written to the destination.
    pub bytes: u64,
    /// Lowercase hex SHA-256 of those bytes.
    pub sha256: String,
    /// Time from the first request to the verified file in place.
    pub elapsed: Duration,
    /// Ranged GETs it took (1 for a file copy).
    pub parts: usize,
}

/// The object store. Cheap to clone; clones share one S3 client, built on first S3 use.
#[derive(Clone, Default)]
pub struct ObjectStore {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    client: OnceCell<Client>,
    endpoint: Option<String>,
}

impl fmt::Debug for ObjectStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectStore")
            .field("endpoint", &self.inner.endpoint)
            .field("s3_client_built", &self.inner.client.initialized())
            .finish()
    }
}

impl ObjectStore {
    /// A store configured from the standard AWS environment, read when S3 is first used.
    pub fn from_env() -> Self {
        Self::default()
    }

    /// A store whose S3 requests go to `url` (an S3-compatible server, addressed path-style),
    /// whatever `AWS_ENDPOINT_URL_S3` says.
    pub fn with_s3_endpoint(url: impl Into<String>) -> Self {
        ObjectStore {
            inner: Arc::new(Inner {
                client: OnceCell::new(),
                endpoint: Some(url.into()),
            }),
        }
    }

    /// A store over an S3 client built by the caller.
    pub fn with_s3_client(client: Client) -> Self {
        ObjectStore {
            inner: Arc::new(Inner {
                client: OnceCell::new_with(Some(client)),
                endpoint: None,
            }),
        }
    }

    /// The shared S3 client, built on first call from the environment.
    pub async fn s3_client(&self) -> Result<&Client> {
        self.inner
            .client
            .get_or_try_init(|| build_client(self.inner.endpoint.clone()))
            .await
    }
}

/// Runs file-system work on tokio's blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    joined(tokio::task::spawn_blocking(f).await)
}

/// A finished task's result; a panic in the task resumes here (these tasks are never
/// cancelled while awaited).
pub(crate) fn joined<T>(result: std::result::Result<T, tokio::task::JoinError>) -> T {
    match result {
        Ok(value) => value,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}
