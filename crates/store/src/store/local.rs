//! Local files standing in for S3 objects: temporary files beside their destination, the
//! directory lock that serialises writers, metadata and hashed copies.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use super::checksum::hex;
use super::download::WRITE_CHUNK;
use super::error::{file_error, io_error, Result};
use super::{Location, ObjectMeta, StoreError};

/// A temporary file beside the destination, removed on drop unless kept.
pub(super) struct TempFile {
    pub(super) path: PathBuf,
    keep: bool,
}

impl TempFile {
    pub(super) fn beside(dest: &Path) -> TempFile {
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

    pub(super) fn keep(mut self) {
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
pub(super) struct DirLock {
    _file: File,
}

pub(super) const LOCK_NAME: &str = ".torchfn.lock";

impl DirLock {
    pub(super) fn acquire(location: &Location, object: &Path) -> Result<DirLock> {
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

pub(super) fn file_head(location: &Location, path: &Path) -> Result<ObjectMeta> {
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

/// Copies a local file to `temp`, hashing it on the way; returns its size and hex SHA-256.
pub(super) fn file_copy(location: &Location, src: &Path, temp: &Path) -> Result<(u64, String)> {
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
