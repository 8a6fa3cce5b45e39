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

use std::collections::hash_map::RandomState;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime};

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, ByteStreamError};
use aws_sdk_s3::types::{ChecksumAlgorithm, ChecksumMode, ChecksumType};
use aws_sdk_s3::Client;
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;
use tokio::task::JoinSet;

/// Bytes gathered from a part's body before one positioned write (per concurrent part).
const WRITE_CHUNK: usize = 1 << 20;
/// Attempts to finish one part after its body stream fails or ends early; each retry asks only
/// for the part's remaining range.
const PART_ATTEMPTS: u32 = 6;
/// Attempts of a conditional PUT answered 409 ConditionalRequestConflict (S3 asks for a retry).
const CONFLICT_ATTEMPTS: u32 = 5;
/// Attempts the SDK makes for one request (standard retry mode) unless the environment sets
/// `AWS_MAX_ATTEMPTS` / `AWS_RETRY_MODE`.
const SDK_ATTEMPTS: u32 = 5;

/// Where an object lives: a local file or an S3 object (or, for `list`, a prefix of either).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Location {
    /// A local file, from `file:///abs/path` or a plain path.
    File(PathBuf),
    /// An S3 object (or key prefix), from `s3://bucket/key`.
    S3 {
        /// The bucket name.
        bucket: String,
        /// The object key, without a leading `/`; empty for the whole bucket.
        key: String,
    },
}

impl Location {
    /// The location `rel` below this one: a path join for files, `key/rel` for S3.
    pub fn join(&self, rel: &str) -> Location {
        let rel = rel.trim_start_matches('/');
        match self {
            Location::File(path) => Location::File(path.join(rel)),
            Location::S3 { bucket, key } => {
                let key = if key.is_empty() || key.ends_with('/') {
                    format!("{key}{rel}")
                } else {
                    format!("{key}/{rel}")
                };
                Location::S3 {
                    bucket: bucket.clone(),
                    key,
                }
            }
        }
    }

    /// Whether this is an S3 location.
    pub fn is_s3(&self) -> bool {
        matches!(self, Location::S3 { .. })
    }
}

impl FromStr for Location {
    type Err = StoreError;

    /// Parses `s3://bucket/key`, `file:///abs/path` or a plain path (no percent-decoding).
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: &str| StoreError::InvalidLocation {
            input: input.to_string(),
            reason: reason.to_string(),
        };
        if input.is_empty() {
            return Err(invalid(
                "it is empty; write s3://bucket/key, file:///abs/path or a path",
            ));
        }
        if let Some(rest) = input.strip_prefix("s3://") {
            let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(invalid("it names no bucket; write s3://bucket/key"));
            }
            return Ok(Location::S3 {
                bucket: bucket.to_string(),
                key: key.to_string(),
            });
        }
        if let Some(rest) = input.strip_prefix("file://") {
            if !rest.starts_with('/') {
                return Err(invalid(
                    "a file URI needs an absolute path (file:///abs/path); \
                     write a relative path without file://",
                ));
            }
            return Ok(Location::File(PathBuf::from(rest)));
        }
        if let Some((scheme, _)) = input.split_once("://") {
            if !scheme.is_empty() && scheme.chars().all(|c| c.is_ascii_alphanumeric()) {
                return Err(invalid(&format!(
                    "the scheme `{scheme}` is not supported; use s3://bucket/key, \
                     file:///abs/path or a plain path"
                )));
            }
        }
        Ok(Location::File(PathBuf::from(input)))
    }
}

impl fmt::Display for Location {
    /// `s3://bucket/key`, `file:///abs/path` for absolute paths, the plain path otherwise.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::S3 { bucket, key } => write!(f, "s3://{bucket}/{key}"),
            Location::File(path) if path.is_absolute() => write!(f, "file://{}", path.display()),
            Location::File(path) => write!(f, "{}", path.display()),
        }
    }
}

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

type Result<T, E = StoreError> = std::result::Result<T, E>;

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

    /// Size, ETag, SHA-256 (when S3 recorded one) and modification time of an object.
    pub async fn head(&self, location: &Location) -> Result<ObjectMeta> {
        match location {
            Location::File(path) => {
                let path = path.clone();
                let loc = location.clone();
                blocking(move || file_head(&loc, &path)).await
            }
            Location::S3 { bucket, key } => {
                let client = self.s3_client().await?;
                let out = client
                    .head_object()
                    .bucket(bucket)
                    .key(key)
                    .checksum_mode(ChecksumMode::Enabled)
                    .send()
                    .await
                    .map_err(|e| s3_error("HeadObject", location, e))?;
                let composite = matches!(out.checksum_type(), Some(ChecksumType::Composite));
                let sha256 = match out.checksum_sha256() {
                    Some(b64) if !composite => base64_to_hex(b64),
                    _ => None,
                };
                Ok(ObjectMeta {
                    size: u64::try_from(out.content_length().unwrap_or(0)).unwrap_or(0),
                    etag: out.e_tag().map(str::to_string),
                    sha256,
                    last_modified: out
                        .last_modified()
                        .and_then(|t| SystemTime::try_from(*t).ok()),
                })
            }
        }
    }

    /// Reads a small object whole (a registry record), with its ETag.
    pub async fn get(&self, location: &Location) -> Result<Object> {
        match location {
            Location::File(path) => {
                let path = path.clone();
                let loc = location.clone();
                blocking(move || {
                    let bytes =
                        std::fs::read(&path).map_err(|e| file_error(&loc, "read", &path, e))?;
                    let etag = sha256_hex(&bytes);
                    Ok(Object { bytes, etag })
                })
                .await
            }
            Location::S3 { bucket, key } => {
                let client = self.s3_client().await?;
                let out = client
                    .get_object()
                    .bucket(bucket)
                    .key(key)
                    .send()
                    .await
                    .map_err(|e| s3_error("GetObject", location, e))?;
                let etag = out.e_tag().unwrap_or_default().to_string();
                let bytes = out
                    .body
                    .collect()
                    .await
                    .map_err(|e| body_error(location, e))?;
                Ok(Object {
                    bytes: bytes.into_bytes().to_vec(),
                    etag,
                })
            }
        }
    }

    /// Reads a small object only if its ETag is no longer `etag` (a cheap poll of a pointer):
    /// `None` when unchanged.
    pub async fn get_if_changed(&self, location: &Location, etag: &str) -> Result<Option<Object>> {
        match location {
            Location::File(_) => {
                let object = self.get(location).await?;
                Ok((object.etag != etag).then_some(object))
            }
            Location::S3 { bucket, key } => {
                let client = self.s3_client().await?;
                let sent = client
                    .get_object()
                    .bucket(bucket)
                    .key(key)
                    .if_none_match(etag)
                    .send()
                    .await;
                let out = match sent {
                    Ok(out) => out,
                    Err(e) if http_status(&e) == Some(304) => return Ok(None),
                    Err(e) => return Err(s3_error("GetObject", location, e)),
                };
                let etag = out.e_tag().unwrap_or_default().to_string();
                let bytes = out
                    .body
                    .collect()
                    .await
                    .map_err(|e| body_error(location, e))?;
                Ok(Some(Object {
                    bytes: bytes.into_bytes().to_vec(),
                    etag,
                }))
            }
        }
    }

    /// Reads `range` of an object (end exclusive); a range past the end is cut to the size.
    pub async fn get_range(&self, location: &Location, range: Range<u64>) -> Result<Vec<u8>> {
        if range.start >= range.end {
            return Ok(Vec::new());
        }
        match location {
            Location::File(path) => {
                let path = path.clone();
                let loc = location.clone();
                blocking(move || {
                    let mut file =
                        File::open(&path).map_err(|e| file_error(&loc, "open", &path, e))?;
                    let mut out = Vec::new();
                    file.seek(SeekFrom::Start(range.start))
                        .and_then(|_| file.take(range.end - range.start).read_to_end(&mut out))
                        .map_err(|e| file_error(&loc, "read", &path, e))?;
                    Ok(out)
                })
                .await
            }
            Location::S3 { bucket, key } => {
                let client = self.s3_client().await?;
                let sent = client
                    .get_object()
                    .bucket(bucket)
                    .key(key)
                    .range(format!("bytes={}-{}", range.start, range.end - 1))
                    .send()
                    .await;
                let out = match sent {
                    Ok(out) => out,
                    // 416: the range starts at or past the end; as for files, nothing is there.
                    Err(e) if http_status(&e) == Some(416) => return Ok(Vec::new()),
                    Err(e) => return Err(s3_error("GetObject", location, e)),
                };
                let bytes = out
                    .body
                    .collect()
                    .await
                    .map_err(|e| body_error(location, e))?;
                Ok(bytes.into_bytes().to_vec())
            }
        }
    }

    /// Every object whose location starts with `prefix`, in key order.
    ///
    /// For files, the prefix is a path: a directory lists everything below it, otherwise the
    /// files in its parent directory (and below) whose path starts with it.
    pub async fn list(&self, prefix: &Location) -> Result<Vec<(Location, ObjectMeta)>> {
        match prefix {
            Location::File(path) => {
                let path = path.clone();
                let loc = prefix.clone();
                blocking(move || file_list(&loc, &path)).await
            }
            Location::S3 { bucket, key } => {
                let client = self.s3_client().await?;
                let mut found = Vec::new();
                let mut token: Option<String> = None;
                loop {
                    let out = client
                        .list_objects_v2()
                        .bucket(bucket)
                        .prefix(key)
                        .set_continuation_token(token.take())
                        .send()
                        .await
                        .map_err(|e| s3_error("ListObjectsV2", prefix, e))?;
                    for object in out.contents() {
                        let Some(object_key) = object.key() else {
                            continue;
                        };
                        found.push((
                            Location::S3 {
                                bucket: bucket.clone(),
                                key: object_key.to_string(),
                            },
                            ObjectMeta {
                                size: u64::try_from(object.size().unwrap_or(0)).unwrap_or(0),
                                etag: object.e_tag().map(str::to_string),
                                sha256: None,
                                last_modified: object
                                    .last_modified()
                                    .and_then(|t| SystemTime::try_from(*t).ok()),
                            },
                        ));
                    }
                    match out.next_continuation_token() {
                        Some(next) if out.is_truncated().unwrap_or(false) => {
                            token = Some(next.to_string())
                        }
                        _ => break,
                    }
                }
                Ok(found)
            }
        }
    }

    /// Deletes an object; deleting one that is not there is not an error (as on S3).
    pub async fn delete(&self, location: &Location) -> Result<()> {
        match location {
            Location::File(path) => {
                let path = path.clone();
                let loc = location.clone();
                blocking(move || {
                    let _lock = DirLock::acquire(&loc, &path)?;
                    match std::fs::remove_file(&path) {
                        Ok(()) => Ok(()),
                        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
                        Err(e) => Err(file_error(&loc, "delete", &path, e)),
                    }
                })
                .await
            }
            Location::S3 { bucket, key } => {
                let client = self.s3_client().await?;
                client
                    .delete_object()
                    .bucket(bucket)
                    .key(key)
                    .send()
                    .await
                    .map_err(|e| s3_error("DeleteObject", location, e))?;
                Ok(())
            }
        }
    }

    /// Writes a small object unconditionally; returns its new ETag. S3 also records the
    /// object's SHA-256, so a later `head` reports it.
    pub async fn put(&self, location: &Location, bytes: Vec<u8>) -> Result<String> {
        self.put_with(location, bytes, Condition::None).await
    }

    /// Creates an object only if nothing is there (`If-None-Match: *`); returns its ETag, or
    /// `AlreadyExists`.
    ///
    /// A write whose first attempt landed but whose answer was lost is retried by the SDK and
    /// then reports `AlreadyExists`: a caller that must tell the two apart compares contents.
    pub async fn put_if_absent(&self, location: &Location, bytes: Vec<u8>) -> Result<String> {
        self.put_with(location, bytes, Condition::Absent).await
    }

    /// Replaces an object only if its ETag is still `etag` (`If-Match`, compare-and-swap);
    /// returns the new ETag, `PreconditionFailed` if it changed, `NotFound` if it is gone.
    pub async fn put_if_match(
        &self,
        location: &Location,
        bytes: Vec<u8>,
        etag: &str,
    ) -> Result<String> {
        self.put_with(location, bytes, Condition::Match(etag.to_string()))
            .await
    }

    async fn put_with(
        &self,
        location: &Location,
        bytes: Vec<u8>,
        condition: Condition,
    ) -> Result<String> {
        match location {
            Location::File(path) => {
                let path = path.clone();
                let loc = location.clone();
                blocking(move || file_put(&loc, &path, &bytes, &condition)).await
            }
            Location::S3 { bucket, key } => {
                let client = self.s3_client().await?;
                let mut attempt = 0;
                loop {
                    attempt += 1;
                    let mut request = client
                        .put_object()
                        .bucket(bucket)
                        .key(key)
                        .checksum_algorithm(ChecksumAlgorithm::Sha256)
                        .body(ByteStream::from(bytes.clone()));
                    match &condition {
                        Condition::None => {}
                        Condition::Absent => request = request.if_none_match("*"),
                        Condition::Match(etag) => request = request.if_match(etag),
                    }
                    match request.send().await {
                        Ok(out) => return Ok(out.e_tag().unwrap_or_default().to_string()),
                        Err(e) => {
                            let status = http_status(&e);
                            // 409 ConditionalRequestConflict: a concurrent conditional write to
                            // the same key; S3 asks the caller to retry, which then gets a
                            // definite answer.
                            if status == Some(409) && attempt < CONFLICT_ATTEMPTS {
                                tokio::time::sleep(backoff(attempt)).await;
                                continue;
                            }
                            return Err(match (status, &condition) {
                                (Some(412 | 409), Condition::Absent) => StoreError::AlreadyExists {
                                    location: location.clone(),
                                },
                                (Some(412 | 409), Condition::Match(_)) => {
                                    StoreError::PreconditionFailed {
                                        location: location.clone(),
                                    }
                                }
                                _ => s3_error("PutObject", location, e),
                            });
                        }
                    }
                }
            }
        }
    }

    /// Downloads an object to `dest`, checked against `expect` (and, on S3, the object's own
    /// size and SHA-256 checksum when it has one).
    ///
    /// On S3 the object is fetched with parallel ranged GETs of `opts.part_size` bytes,
    /// `opts.concurrency` at a time, each streamed to its offset in a temporary file beside
    /// `dest` (memory: about 1 MiB per part in flight). All ranges carry `If-Match` with the
    /// ETag read first, so a replaced object fails instead of mixing versions. A part whose body
    /// stream breaks is re-requested from where it stopped. The SHA-256 is computed in file
    /// order by a reader thread that hashes each part as soon as every part before it has
    /// landed (from the page cache), overlapping hashing with the download. Only a download
    /// that passes every check is renamed to `dest`; otherwise no file is left. The file is
    /// not fsynced: a cache reusing it after a power loss must check it again.
    pub async fn download(
        &self,
        from: &Location,
        dest: &Path,
        expect: Expect,
        opts: DownloadOptions,
    ) -> Result<DownloadReport> {
        self.download_inner(from, dest, expect, opts, None).await
    }

    /// Downloads as [`download`](Self::download) does while `consume` reads the file as it
    /// lands (on a blocking thread): its readers' reads wait for their bytes, and fail if the
    /// download stops first. On S3 the last part is fetched first, so a zip's directory is
    /// there at once. Returns the download's report and what `consume` returned; when the
    /// download fails (or fails its checks), that is the error and `consume`'s result is
    /// dropped, so it must not have been used for anything yet.
    pub async fn download_consuming<T, F>(
        &self,
        from: &Location,
        dest: &Path,
        expect: Expect,
        opts: DownloadOptions,
        consume: F,
    ) -> Result<(DownloadReport, T)>
    where
        T: Send + 'static,
        F: FnOnce(Reopen) -> T + Send + 'static,
    {
        let landing = Arc::new(Landing::new());
        let (file_tx, file_rx) = tokio::sync::oneshot::channel::<(Arc<File>, u64)>();
        let consumer = {
            let landing = landing.clone();
            tokio::task::spawn_blocking(move || {
                let (file, size) = file_rx.blocking_recv().ok()?;
                let reopen: Reopen = Arc::new(move || {
                    Ok(Box::new(LandingReader {
                        file: file.clone(),
                        landing: landing.clone(),
                        size,
                        pos: 0,
                    })
                        as Box<dyn torchfn_archive::mar::ReadSeek>)
                });
                Some(consume(reopen))
            })
        };
        let report = self
            .download_inner(from, dest, expect, opts, Some((landing, file_tx)))
            .await;
        let consumed = consumer.await;
        let report = report?;
        match consumed {
            Ok(Some(value)) => Ok((report, value)),
            Ok(None) => Err(StoreError::Config(format!(
                "the download of {from} never started its reader"
            ))),
            Err(e) => Err(StoreError::Config(format!(
                "the reader of {from} stopped: {e}"
            ))),
        }
    }

    async fn download_inner(
        &self,
        from: &Location,
        dest: &Path,
        expect: Expect,
        opts: DownloadOptions,
        consumer: Option<(Arc<Landing>, FileSender)>,
    ) -> Result<DownloadReport> {
        let _end = EndLanding(consumer.as_ref().map(|(l, _)| l.clone()));
        let started = Instant::now();
        if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
            let parent = parent.to_path_buf();
            blocking(move || {
                std::fs::create_dir_all(&parent).map_err(|e| io_error("create", &parent, e))
            })
            .await?;
        }
        let temp = TempFile::beside(dest);
        let (bytes, sha256, parts) = match from {
            Location::File(src) => {
                let src = src.clone();
                let loc = from.clone();
                let temp_path = temp.path.clone();
                let (bytes, sha256) = blocking(move || file_copy(&loc, &src, &temp_path)).await?;
                if let Some((landing, tx)) = consumer {
                    // A local copy is quick: its reader starts once it is complete.
                    let file =
                        File::open(&temp.path).map_err(|e| io_error("open", &temp.path, e))?;
                    landing.add(0..bytes);
                    let _ = tx.send((Arc::new(file), bytes));
                }
                (bytes, sha256, 1)
            }
            Location::S3 { bucket, key } => {
                let meta = self.head(from).await?;
                if let Some(expected) = expect.size {
                    if expected != meta.size {
                        return Err(StoreError::Truncated {
                            location: from.clone(),
                            expected,
                            actual: meta.size,
                        });
                    }
                }
                let client = self.s3_client().await?.clone();
                let file = create_file(&temp.path, meta.size)?;
                let landing = consumer.map(|(landing, tx)| {
                    let _ = tx.send((file.clone(), meta.size));
                    landing
                });
                let job = Arc::new(PartJob {
                    client,
                    location: from.clone(),
                    bucket: bucket.clone(),
                    key: key.clone(),
                    etag: meta.etag.clone(),
                    file,
                    path: temp.path.clone(),
                    landing,
                });
                let (sha256, parts) = fetch_parts(job, meta.size, opts).await?;
                if let Some(recorded) = &meta.sha256 {
                    if !recorded.eq_ignore_ascii_case(&sha256) {
                        return Err(StoreError::ChecksumMismatch {
                            location: from.clone(),
                            expected: recorded.clone(),
                            actual: sha256,
                            against: "checksum S3 recorded",
                        });
                    }
                }
                (meta.size, sha256, parts)
            }
        };
        if let Some(expected) = expect.size {
            if expected != bytes {
                return Err(StoreError::Truncated {
                    location: from.clone(),
                    expected,
                    actual: bytes,
                });
            }
        }
        if let Some(expected) = &expect.sha256 {
            if !expected.eq_ignore_ascii_case(&sha256) {
                return Err(StoreError::ChecksumMismatch {
                    location: from.clone(),
                    expected: expected.to_ascii_lowercase(),
                    actual: sha256,
                    against: "expected",
                });
            }
        }
        let dest_path = dest.to_path_buf();
        blocking(move || {
            std::fs::rename(&temp.path, &dest_path)
                .map_err(|e| io_error("rename into place", &dest_path, e))?;
            temp.keep();
            Ok(())
        })
        .await?;
        let elapsed = started.elapsed();
        let mb_per_s = bytes as f64 / 1e6 / elapsed.as_secs_f64().max(1e-9);
        tracing::debug!(
            location = %from,
            dest = %dest.display(),
            bytes,
            parts,
            part_size = opts.part_size,
            concurrency = opts.concurrency,
            elapsed_ms = elapsed.as_millis() as u64,
            mb_per_s = (mb_per_s * 10.0).round() / 10.0,
            "downloaded"
        );
        Ok(DownloadReport {
            bytes,
            sha256,
            elapsed,
            parts,
        })
    }
}

/// The write condition of a put.
enum Condition {
    None,
    Absent,
    Match(String),
}

async fn build_client(endpoint: Option<String>) -> Result<Client> {
    use aws_config::retry::RetryConfig;
    use aws_config::timeout::TimeoutConfig;
    use aws_config::BehaviorVersion;
    use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};

    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http)
        // Connect timeout as the SDK's default; the attempt timeout bounds a server that
        // accepts and never answers (for GetObject it covers the headers, not the body, whose
        // stalls the SDK's stalled-stream protection catches).
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_millis(3100))
                .operation_attempt_timeout(Duration::from_secs(60))
                .build(),
        );
    if env_unset("AWS_MAX_ATTEMPTS") && env_unset("AWS_RETRY_MODE") {
        // Standard mode: exponential backoff with full jitter for 5xx, throttling (503
        // SlowDown), timeouts and connection failures, bounded by attempts and a retry quota.
        loader = loader.retry_config(
            RetryConfig::standard()
                .with_max_attempts(SDK_ATTEMPTS)
                .with_initial_backoff(Duration::from_millis(100))
                .with_max_backoff(Duration::from_secs(5)),
        );
    }
    let custom_endpoint =
        endpoint.is_some() || !env_unset("AWS_ENDPOINT_URL_S3") || !env_unset("AWS_ENDPOINT_URL");
    let shared = loader.load().await;
    if shared.region().is_none() {
        return Err(StoreError::Config(
            "no AWS region: set AWS_REGION (for example AWS_REGION=us-east-1)".to_string(),
        ));
    }
    let mut config = aws_sdk_s3::config::Builder::from(&shared);
    if let Some(url) = endpoint {
        config = config.endpoint_url(url);
    }
    if custom_endpoint {
        // S3-compatible servers on an address (moto on 127.0.0.1) have no per-bucket host names.
        config = config.force_path_style(true);
    }
    tracing::debug!(
        region = ?shared.region(),
        custom_endpoint,
        "S3 client built"
    );
    Ok(Client::from_conf(config.build()))
}

fn env_unset(name: &str) -> bool {
    std::env::var_os(name).is_none_or(|v| v.is_empty())
}

/// What one parallel download shares between its parts.
struct PartJob {
    client: Client,
    location: Location,
    bucket: String,
    key: String,
    etag: Option<String>,
    file: Arc<File>,
    path: PathBuf,
    /// Told of every range written, for a reader unpacking while the download runs.
    landing: Option<Arc<Landing>>,
}

fn create_file(path: &Path, size: u64) -> Result<Arc<File>> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| io_error("create", path, e))?;
    file.set_len(size).map_err(|e| io_error("size", path, e))?;
    Ok(Arc::new(file))
}

/// Fetches every part with at most `opts.concurrency` in flight; returns the hex SHA-256 of
/// the file and the number of parts.
async fn fetch_parts(
    job: Arc<PartJob>,
    size: u64,
    opts: DownloadOptions,
) -> Result<(String, usize)> {
    let part_size = opts.part_size.max(1);
    let parts = usize::try_from(size.div_ceil(part_size)).unwrap_or(usize::MAX);
    let (done_tx, done_rx) = mpsc::channel::<usize>();
    let hasher = {
        let job = job.clone();
        tokio::task::spawn_blocking(move || hash_in_order(&job, size, part_size, parts, done_rx))
    };
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..opts.concurrency.clamp(1, parts.max(1)) {
        let job = job.clone();
        let next = next.clone();
        let done_tx = done_tx.clone();
        workers.spawn(async move {
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= parts {
                    return Ok(());
                }
                // The last part first: a zip's directory is at its end, so a reader
                // unpacking while the download runs can start at once.
                let index = if k == 0 { parts - 1 } else { k - 1 };
                let start = index as u64 * part_size;
                let end = (start + part_size).min(size);
                fetch_part(&job, start..end).await?;
                // The hasher may have stopped on a read error; it reports that itself.
                let _ = done_tx.send(index);
            }
        });
    }
    drop(done_tx);
    while let Some(outcome) = workers.join_next().await {
        // Returning drops `workers`, which aborts the other parts.
        joined(outcome)?;
    }
    let (sha256, hashed) = joined(hasher.await)?;
    if hashed != size {
        return Err(StoreError::Truncated {
            location: job.location.clone(),
            expected: size,
            actual: hashed,
        });
    }
    Ok((sha256, parts))
}

/// Hashes the file in order as parts land: part i is read back (from the page cache) once
/// parts 0..=i have all been written. Returns the hex digest and the bytes hashed.
fn hash_in_order(
    job: &PartJob,
    size: u64,
    part_size: u64,
    parts: usize,
    done: mpsc::Receiver<usize>,
) -> Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut landed = vec![false; parts];
    let mut next = 0;
    let mut hashed = 0u64;
    let mut buf = vec![0u8; WRITE_CHUNK];
    while next < parts {
        let Ok(index) = done.recv() else { break };
        landed[index] = true;
        while next < parts && landed[next] {
            let start = next as u64 * part_size;
            let end = (start + part_size).min(size);
            let mut pos = start;
            while pos < end {
                let n = usize::try_from(end - pos)
                    .unwrap_or(usize::MAX)
                    .min(buf.len());
                job.file
                    .read_exact_at(&mut buf[..n], pos)
                    .map_err(|e| io_error("read back", &job.path, e))?;
                hasher.update(&buf[..n]);
                pos += n as u64;
            }
            hashed += end - start;
            next += 1;
        }
    }
    Ok((hex(&hasher.finalize()), hashed))
}

/// Fetches `range` of the object into the same range of the file, re-requesting only what is
/// still missing when the body stream fails or ends early.
async fn fetch_part(job: &PartJob, range: Range<u64>) -> Result<()> {
    let mut written = range.start;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut request = job
            .client
            .get_object()
            .bucket(&job.bucket)
            .key(&job.key)
            .range(format!("bytes={}-{}", written, range.end - 1));
        if let Some(etag) = &job.etag {
            request = request.if_match(etag);
        }
        let out = match request.send().await {
            Ok(out) => out,
            Err(e) if http_status(&e) == Some(412) => {
                return Err(StoreError::Modified {
                    location: job.location.clone(),
                })
            }
            // The SDK has already retried what is transient.
            Err(e) => return Err(s3_error("GetObject", &job.location, e)),
        };
        let mut body = out.body;
        let mut buf: Vec<u8> = Vec::with_capacity(
            WRITE_CHUNK.min(usize::try_from(range.end - written).unwrap_or(usize::MAX)),
        );
        let failure = loop {
            match body.try_next().await {
                Ok(Some(chunk)) => {
                    if written + (buf.len() + chunk.len()) as u64 > range.end {
                        return Err(StoreError::S3 {
                            operation: "GetObject",
                            location: job.location.clone(),
                            message: format!(
                                "the server sent more than the {} bytes asked for (range {}..{})",
                                range.end - written,
                                written,
                                range.end
                            ),
                        });
                    }
                    buf.extend_from_slice(&chunk);
                    if buf.len() >= WRITE_CHUNK {
                        buf = write_at(job, buf, written).await?;
                        written += buf.len() as u64;
                        buf.clear();
                    }
                }
                Ok(None) => break None,
                Err(e) => break Some(DisplayErrorContext(e).to_string()),
            }
        };
        // What arrived before a failure is good: keep it and ask only for the rest.
        if !buf.is_empty() {
            let buf = write_at(job, buf, written).await?;
            written += buf.len() as u64;
        }
        if written == range.end {
            return Ok(());
        }
        if attempt >= PART_ATTEMPTS {
            tracing::warn!(location = %job.location, attempt, ?failure, "giving up on a part");
            return Err(match failure {
                // The server keeps ending this range early: the object is shorter than its
                // HEAD said.
                None => StoreError::Truncated {
                    location: job.location.clone(),
                    expected: range.end,
                    actual: written,
                },
                Some(reason) => StoreError::S3 {
                    operation: "GetObject",
                    location: job.location.clone(),
                    message: format!(
                        "bytes {written}..{} did not arrive after {attempt} attempts: {reason}",
                        range.end
                    ),
                },
            });
        }
        tracing::debug!(
            location = %job.location,
            attempt,
            from = written,
            to = range.end,
            reason = failure.as_deref().unwrap_or("the body ended early"),
            "re-requesting the rest of a part"
        );
        tokio::time::sleep(backoff(attempt)).await;
    }
}

/// Writes `buf` at `offset` on a blocking thread and hands the buffer back for reuse.
async fn write_at(job: &PartJob, buf: Vec<u8>, offset: u64) -> Result<Vec<u8>> {
    let file = job.file.clone();
    let path = job.path.clone();
    let landing = job.landing.clone();
    blocking(move || {
        file.write_all_at(&buf, offset)
            .map_err(|e| io_error("write", &path, e))?;
        if let Some(landing) = landing {
            landing.add(offset..offset + buf.len() as u64);
        }
        Ok(buf)
    })
    .await
}

/// Which byte ranges of a download's file have been written, for readers that consume the
/// file while it downloads.
struct Landing {
    state: std::sync::Mutex<LandingState>,
    changed: std::sync::Condvar,
}

#[derive(Default)]
struct LandingState {
    /// Sorted, disjoint, non-adjacent.
    ranges: Vec<Range<u64>>,
    /// The download stopped; bytes not landed by now never will.
    over: bool,
}

impl Landing {
    fn new() -> Self {
        Landing {
            state: std::sync::Mutex::new(LandingState::default()),
            changed: std::sync::Condvar::new(),
        }
    }

    fn add(&self, range: Range<u64>) {
        if range.is_empty() {
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let ranges = &mut state.ranges;
        let at = ranges.partition_point(|r| r.end < range.start);
        let mut merged = range;
        while at < ranges.len() && ranges[at].start <= merged.end {
            merged.start = merged.start.min(ranges[at].start);
            merged.end = merged.end.max(ranges[at].end);
            ranges.remove(at);
        }
        ranges.insert(at, merged);
        drop(state);
        self.changed.notify_all();
    }

    /// Marks the download over (finished or failed): waiting readers stop waiting.
    fn end(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).over = true;
        self.changed.notify_all();
    }

    /// Blocks until byte `pos` has landed; returns how many bytes from `pos` on have.
    fn wait(&self, pos: u64) -> std::io::Result<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let at = state.ranges.partition_point(|r| r.end <= pos);
            if let Some(r) = state.ranges.get(at).filter(|r| r.start <= pos) {
                return Ok(r.end - pos);
            }
            if state.over {
                return Err(std::io::Error::other(
                    "the archive's download stopped before these bytes arrived",
                ));
            }
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Ends the landing when dropped: whatever way a download stops, its readers are released.
struct EndLanding(Option<Arc<Landing>>);

impl Drop for EndLanding {
    fn drop(&mut self) {
        if let Some(landing) = &self.0 {
            landing.end();
        }
    }
}

/// A reader over a file being downloaded: reads wait until their bytes have landed.
struct LandingReader {
    file: Arc<File>,
    landing: Arc<Landing>,
    size: u64,
    pos: u64,
}

impl Read for LandingReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let ready = self.landing.wait(self.pos)?;
        let want = buf
            .len()
            .min(usize::try_from(ready.min(self.size - self.pos)).unwrap_or(usize::MAX));
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for LandingReader {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let base = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.size.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = base.ok_or_else(|| {
            std::io::Error::new(ErrorKind::InvalidInput, "seek before the start of the file")
        })?;
        Ok(self.pos)
    }
}

/// Hands a consumer the download's file and size once the file exists.
type FileSender = tokio::sync::oneshot::Sender<(Arc<File>, u64)>;

/// Opens readers over a download's file (each with its own position).
pub type Reopen =
    Arc<dyn Fn() -> std::io::Result<Box<dyn torchfn_archive::mar::ReadSeek>> + Send + Sync>;

/// Exponential backoff with full jitter: a random wait in [0, min(5 s, 100 ms × 2^attempt)).
fn backoff(attempt: u32) -> Duration {
    let cap = Duration::from_millis(100u64.saturating_mul(1 << attempt.min(10)))
        .min(Duration::from_secs(5));
    let random = RandomState::new().build_hasher().finish();
    cap.mul_f64((random % 10_000) as f64 / 10_000.0)
}

/// A temporary file beside the destination, removed on drop unless kept.
struct TempFile {
    path: PathBuf,
    keep: bool,
}

impl TempFile {
    fn beside(dest: &Path) -> TempFile {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let unique = format!(
            ".{name}.torchfn-tmp-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        TempFile {
            path: dest.with_file_name(unique),
            keep: false,
        }
    }

    fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// An exclusive advisory lock (`flock`) on a directory's `.torchfn.lock`, serialising the
/// store's writers on this machine; released on drop.
struct DirLock {
    _file: File,
}

const LOCK_NAME: &str = ".torchfn.lock";

impl DirLock {
    fn acquire(location: &Location, object: &Path) -> Result<DirLock> {
        let dir = match object.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let path = dir.join(LOCK_NAME);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| file_error(location, "open the lock", &path, e))?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| file_error(location, "lock", &path, e.into()))?;
        Ok(DirLock { _file: file })
    }
}

fn file_head(location: &Location, path: &Path) -> Result<ObjectMeta> {
    let meta = std::fs::metadata(path).map_err(|e| file_error(location, "read", path, e))?;
    if !meta.is_file() {
        return Err(StoreError::NotFound {
            location: location.clone(),
        });
    }
    Ok(ObjectMeta {
        size: meta.len(),
        etag: None,
        sha256: None,
        last_modified: meta.modified().ok(),
    })
}

fn file_put(
    location: &Location,
    path: &Path,
    bytes: &[u8],
    condition: &Condition,
) -> Result<String> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| file_error(location, "create", parent, e))?;
    }
    let etag = sha256_hex(bytes);
    let temp = TempFile::beside(path);
    {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp.path)
            .map_err(|e| file_error(location, "create", &temp.path, e))?;
        file.write_all(bytes)
            .and_then(|()| file.sync_data())
            .map_err(|e| file_error(location, "write", &temp.path, e))?;
    }
    match condition {
        Condition::Absent => {
            // A hard link publishes the complete file atomically and fails if the name is
            // taken, so a reader never sees half a record and exactly one creator wins.
            match std::fs::hard_link(&temp.path, path) {
                Ok(()) => Ok(etag),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => Err(StoreError::AlreadyExists {
                    location: location.clone(),
                }),
                Err(e) => Err(file_error(location, "create", path, e)),
            }
        }
        Condition::None | Condition::Match(_) => {
            let _lock = DirLock::acquire(location, path)?;
            if let Condition::Match(expected) = condition {
                let current =
                    std::fs::read(path).map_err(|e| file_error(location, "read", path, e))?;
                if !sha256_hex(&current).eq_ignore_ascii_case(expected) {
                    return Err(StoreError::PreconditionFailed {
                        location: location.clone(),
                    });
                }
            }
            std::fs::rename(&temp.path, path)
                .map_err(|e| file_error(location, "replace", path, e))?;
            temp.keep();
            Ok(etag)
        }
    }
}

fn file_list(location: &Location, prefix: &Path) -> Result<Vec<(Location, ObjectMeta)>> {
    let as_text = prefix.to_string_lossy().into_owned();
    let (root, filter) = if prefix.is_dir() {
        (prefix.to_path_buf(), None)
    } else {
        let parent = match prefix.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        (parent, Some(as_text))
    };
    let mut found = Vec::new();
    let mut stack = vec![root];
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(file_error(location, "list", &dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| file_error(location, "list", &dir, e))?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == LOCK_NAME || name.contains(".torchfn-tmp-") {
                continue;
            }
            let text = path.to_string_lossy();
            let kind = entry
                .file_type()
                .map_err(|e| file_error(location, "list", &path, e))?;
            if kind.is_dir() {
                // Descend only where something below can still match the prefix.
                if filter
                    .as_deref()
                    .is_none_or(|f| text.starts_with(f) || f.starts_with(&*text))
                {
                    stack.push(path);
                }
                continue;
            }
            if filter.as_deref().is_some_and(|f| !text.starts_with(f)) {
                continue;
            }
            let meta = entry
                .metadata()
                .map_err(|e| file_error(location, "list", &path, e))?;
            if meta.is_file() {
                found.push((
                    Location::File(path),
                    ObjectMeta {
                        size: meta.len(),
                        etag: None,
                        sha256: None,
                        last_modified: meta.modified().ok(),
                    },
                ));
            }
        }
    }
    found.sort_by_key(|(location, _)| location.to_string());
    Ok(found)
}

/// Copies a local file to `temp`, hashing it on the way; returns its size and hex SHA-256.
fn file_copy(location: &Location, src: &Path, temp: &Path) -> Result<(u64, String)> {
    let mut input = File::open(src).map_err(|e| file_error(location, "open", src, e))?;
    let mut output = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(temp)
        .map_err(|e| io_error("create", temp, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; WRITE_CHUNK];
    let mut total = 0u64;
    loop {
        let n = input
            .read(&mut buf)
            .map_err(|e| file_error(location, "read", src, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        output
            .write_all(&buf[..n])
            .map_err(|e| io_error("write", temp, e))?;
        total += n as u64;
    }
    Ok((total, hex(&hasher.finalize())))
}

/// Runs file-system work on tokio's blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    joined(tokio::task::spawn_blocking(f).await)
}

/// A finished task's result; a panic in the task resumes here (these tasks are never
/// cancelled while awaited).
fn joined<T>(result: std::result::Result<T, tokio::task::JoinError>) -> T {
    match result {
        Ok(value) => value,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

fn io_error(action: &'static str, path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// A file error, with missing files and permission errors given the same kinds as on S3.
fn file_error(
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

fn http_status<E>(err: &SdkError<E, HttpResponse>) -> Option<u16> {
    err.raw_response().map(|r| r.status().as_u16())
}

/// Maps an SDK error to the store's kinds: 404 and `NoSuch*` to `NotFound`, 403 to
/// `AccessDenied`, anything else (left after the SDK's retries) to `S3` with a hint.
fn s3_error<E>(
    operation: &'static str,
    location: &Location,
    err: SdkError<E, HttpResponse>,
) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = http_status(&err);
    let code = err.code().map(str::to_string);
    match (status, code.as_deref()) {
        (Some(404), _) | (_, Some("NoSuchKey" | "NoSuchBucket" | "NotFound")) => {
            StoreError::NotFound {
                location: location.clone(),
            }
        }
        (Some(403), _)
        | (_, Some("AccessDenied" | "InvalidAccessKeyId" | "SignatureDoesNotMatch")) => {
            StoreError::AccessDenied {
                location: location.clone(),
            }
        }
        _ => {
            let mut message = DisplayErrorContext(&err).to_string();
            if status == Some(301) || code.as_deref() == Some("PermanentRedirect") {
                message
                    .push_str(" (the bucket is in another region: set AWS_REGION to its region)");
            }
            StoreError::S3 {
                operation,
                location: location.clone(),
                message,
            }
        }
    }
}

/// A body-stream failure of a whole-object read (ranged downloads retry theirs).
fn body_error(location: &Location, err: ByteStreamError) -> StoreError {
    StoreError::S3 {
        operation: "GetObject",
        location: location.clone(),
        message: format!("reading the body failed: {}", DisplayErrorContext(err)),
    }
}

fn base64_to_hex(b64: &str) -> Option<String> {
    // A composite (multipart) checksum reads `<base64>-<parts>`: not a whole-object hash.
    if b64.contains('-') {
        return None;
    }
    let bytes = aws_smithy_types::base64::decode(b64).ok()?;
    (bytes.len() == 32).then(|| hex(&bytes))
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_and_base64() {
        assert_eq!(hex(&[0x00, 0xab, 0xff]), "00abff");
        let digest = Sha256::digest(b"abc");
        let b64 = aws_smithy_types::base64::encode(digest);
        assert_eq!(
            base64_to_hex(&b64).as_deref(),
            Some(sha256_hex(b"abc").as_str())
        );
        assert_eq!(base64_to_hex(&format!("{b64}-3")), None);
    }

    #[test]
    fn backoff_is_bounded() {
        for attempt in 0..40 {
            assert!(backoff(attempt) <= Duration::from_secs(5));
        }
    }
}
