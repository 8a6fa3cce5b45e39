//! Writes: unconditional puts, conditional ones (create-only and compare-and-swap, on S3 and
//! made atomic for local files) and deletes.

use std::fs::OpenOptions;
use std::io::{ErrorKind, Write};
use std::path::Path;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::ChecksumAlgorithm;

use super::checksum::sha256_hex;
use super::error::{file_error, Result};
use super::local::{DirLock, TempFile};
use super::s3::{backoff, http_status, s3_error};
use super::{blocking, Location, ObjectStore, StoreError};

/// Attempts of a conditional PUT answered 409 ConditionalRequestConflict (S3 asks for a retry).
const CONFLICT_ATTEMPTS: u32 = 5;

impl ObjectStore {
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
}

/// The write condition of a put.
enum Condition {
    None,
    Absent,
    Match(String),
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
