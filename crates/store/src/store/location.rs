//! Locations: `s3://bucket/key`, `file:///abs/path` or a plain path, parsed, joined and
//! written back.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use super::StoreError;

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
