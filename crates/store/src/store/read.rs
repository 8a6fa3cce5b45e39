//! Reads: an object's metadata, a small object whole (optionally only when changed), and a
//! byte range of one.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::ops::Range;
use std::time::SystemTime;

use aws_sdk_s3::types::{ChecksumMode, ChecksumType};

use super::checksum::{base64_to_hex, sha256_hex};
use super::error::{file_error, Result};
use super::local::file_head;
use super::s3::{body_error, http_status, s3_error};
use super::{blocking, Location, Object, ObjectMeta, ObjectStore};

impl ObjectStore {
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
}
