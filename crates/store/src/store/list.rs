//! Listing: every object under a prefix, from S3 (page by page) or a folder tree.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::error::{file_error, Result};
use super::local::LOCK_NAME;
use super::s3::s3_error;
use super::{blocking, Location, ObjectMeta, ObjectStore};

impl ObjectStore {
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
