//! What the S3-triggered registrar does: S3 `ObjectCreated` / `ObjectRemoved` events (direct,
//! or wrapped in SQS messages) for archives under a prefix become version records in the
//! registry. What an archive holds is read by `torchfn_archive::inspect`: a zip through ranged
//! reads (its end, where the central directory is, then the manifest's entry) before anything
//! else; a tgz archive is streamed once.

use std::ops::Range;

use serde_json::Value;

use crate::registry::{now_ms, Registered, Registry, RegistryError, VersionRecord, VersionStatus};
use crate::store::{joined, DownloadOptions, Expect, Location, ObjectStore, StoreError};
use torchfn_archive::error::MarError;
use torchfn_archive::inspect::{self, Contents, RangeReader, ZIP_TAIL_BYTES};
use torchfn_archive::mar::ArchiveFormat;

/// Why an event could not be handled.
#[derive(Debug, thiserror::Error)]
pub enum RegistrarError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("the event is not an S3 or SQS event: {0}")]
    BadEvent(String),
    #[error("{location} refused: {reason}")]
    Refused { location: String, reason: String },
}

/// The registrar's settings.
#[derive(Debug, Clone)]
pub struct RegistrarConfig {
    /// Only keys under this prefix are archives (e.g. `archives/`).
    pub prefix: String,
    /// Larger archives are refused.
    pub max_archive_bytes: u64,
}

/// One archive event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveEvent {
    pub created: bool,
    pub bucket: String,
    /// The object key, URL-decoded.
    pub key: String,
}

/// What handling an event did; serialized as `{"outcome": "registered", "model": …}`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    Registered {
        model: String,
        version: String,
        default: bool,
    },
    AlreadyRegistered {
        model: String,
        version: String,
    },
    Conflict {
        model: String,
        version: String,
        existing_source: String,
    },
    Removed {
        model: String,
        version: String,
    },
    Ignored {
        reason: String,
    },
}

/// The archive events in a Lambda payload: S3 notifications, or SQS messages whose bodies are
/// S3 notifications. S3's test event is skipped.
pub fn parse_events(payload: &Value) -> Result<Vec<ArchiveEvent>, RegistrarError> {
    let records = payload
        .get("Records")
        .and_then(Value::as_array)
        .ok_or_else(|| RegistrarError::BadEvent("no Records array".into()))?;
    let mut out = Vec::new();
    for record in records {
        if let Some(body) = record.get("body").and_then(Value::as_str) {
            let inner: Value = serde_json::from_str(body)
                .map_err(|e| RegistrarError::BadEvent(format!("SQS body is not JSON: {e}")))?;
            if inner.get("Event").and_then(Value::as_str) == Some("s3:TestEvent") {
                continue;
            }
            out.extend(parse_events(&inner)?);
            continue;
        }
        let name = record
            .get("eventName")
            .and_then(Value::as_str)
            .ok_or_else(|| RegistrarError::BadEvent("a record has no eventName".into()))?;
        let s3 = record
            .get("s3")
            .ok_or_else(|| RegistrarError::BadEvent("a record has no s3 entry".into()))?;
        let field = |path: &[&str]| {
            path.iter()
                .try_fold(s3, |v, k| v.get(*k))
                .and_then(Value::as_str)
                .map(String::from)
                .ok_or_else(|| RegistrarError::BadEvent(format!("no s3.{}", path.join("."))))
        };
        let created = name.starts_with("ObjectCreated");
        if !created && !name.starts_with("ObjectRemoved") {
            continue;
        }
        out.push(ArchiveEvent {
            created,
            bucket: field(&["bucket", "name"])?,
            key: decode_key(&field(&["object", "key"])?),
        });
    }
    Ok(out)
}

/// S3 event keys are URL-encoded with `+` for spaces.
pub fn decode_key(key: &str) -> String {
    let bytes = key.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                match std::str::from_utf8(&bytes[i + 1..(i + 3).min(bytes.len())])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(b) if i + 3 <= bytes.len() => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn is_archive(key: &str) -> bool {
    [".mar", ".tar.gz", ".tgz"].iter().any(|e| key.ends_with(e))
}

/// Handles one event.
pub async fn handle(
    registry: &Registry,
    store: &ObjectStore,
    config: &RegistrarConfig,
    event: &ArchiveEvent,
) -> Result<Outcome, RegistrarError> {
    if !event.key.starts_with(&config.prefix) || !is_archive(&event.key) {
        return Ok(Outcome::Ignored {
            reason: format!("{} is not an archive under {}", event.key, config.prefix),
        });
    }
    let location = Location::S3 {
        bucket: event.bucket.clone(),
        key: event.key.clone(),
    };
    if !event.created {
        return record_removal(registry, &location.to_string()).await;
    }
    let refuse = |reason: String| RegistrarError::Refused {
        location: location.to_string(),
        reason,
    };
    let meta = match store.head(&location).await {
        Ok(meta) => meta,
        // Deleted before this event was handled: its deletion event records nothing either,
        // and retrying cannot help.
        Err(e) if e.is_not_found() => {
            return Ok(Outcome::Ignored {
                reason: format!("{location} was deleted before it could be recorded"),
            })
        }
        Err(e) => return Err(e.into()),
    };
    if meta.size > config.max_archive_bytes {
        return Err(refuse(format!(
            "{} bytes is over the {}-byte limit",
            meta.size, config.max_archive_bytes
        )));
    }
    let magic = store.get_range(&location, 0..4).await?;
    let format = inspect::format_of(&magic).map_err(|e| refuse(e.to_string()))?;
    let (
        Contents {
            manifest, names, ..
        },
        sha256,
    ) = if format == ArchiveFormat::Zip {
        let contents = zip_contents(store, &location, meta.size).await?;
        let sha256 = match meta.sha256.clone() {
            Some(sha) => sha,
            None => streamed_sha256(store, &location).await?,
        };
        (contents, sha256)
    } else {
        tgz_contents(store, &location).await?
    };
    let model = &manifest.model;
    if model.model_file.is_some() {
        return Err(refuse("an eager-mode archive (modelFile); torchfn serves TorchScript: script or trace the model".into()));
    }
    let serialized = model
        .serialized_file
        .as_deref()
        .ok_or_else(|| refuse("the manifest names no serializedFile".into()))?;
    if !names.iter().any(|n| n == serialized) {
        return Err(refuse(format!(
            "serializedFile {serialized} is not in the archive"
        )));
    }
    if let Some(handler) = model.handler.as_deref() {
        let file = handler.split(':').next().unwrap_or(handler);
        let resolvable = torchfn_archive::handlers::is_builtin(file)
            || names
                .iter()
                .any(|n| n == file || *n == format!("{file}.py"));
        if !resolvable {
            return Err(refuse(format!(
                "handler {handler} is neither built in nor in the archive"
            )));
        }
    }
    let record = VersionRecord {
        model: manifest.model_name().to_string(),
        version: manifest.model_version().to_string(),
        source: location.to_string(),
        etag: meta.etag.clone(),
        sha256,
        size: meta.size,
        manifest: serde_json::to_value(&manifest).unwrap_or(Value::Null),
        handler: model.handler.clone(),
        created_ms: now_ms(),
        status: VersionStatus::Registered,
        removed_ms: None,
    };
    let outcome = record_upload(registry, &record).await?;
    // Deleted while it was being recorded: its deletion event may have found no record to
    // mark, so the removal is recorded here (whichever of the two comes second sees the
    // other's work).
    if matches!(
        outcome,
        Outcome::Registered { .. } | Outcome::AlreadyRegistered { .. }
    ) {
        match store.head(&location).await {
            Err(e) if e.is_not_found() => {
                tracing::info!(archive = %location, "deleted while being recorded; marked removed");
                return record_removal(registry, &location.to_string()).await;
            }
            _ => {}
        }
    }
    Ok(outcome)
}

/// The registry's part of an upload: the version recorded (exactly once), then the default
/// pointer advanced. A re-delivered event advances the pointer too, so an event retried after
/// a failure between the two steps still moves it.
pub async fn record_upload(
    registry: &Registry,
    record: &VersionRecord,
) -> Result<Outcome, RegistrarError> {
    let (name, version) = (record.model.clone(), record.version.clone());
    match registry.register(record).await? {
        Registered::Created => {
            let default = registry.advance_default(&name, &version).await?;
            Ok(Outcome::Registered {
                model: name,
                version,
                default,
            })
        }
        Registered::AlreadyRegistered => {
            registry.advance_default(&name, &version).await?;
            Ok(Outcome::AlreadyRegistered {
                model: name,
                version,
            })
        }
        Registered::Conflict { existing } => Ok(Outcome::Conflict {
            model: name,
            version,
            existing_source: existing.source,
        }),
    }
}

/// The registry's part of a deletion: every version recorded from `source` marked removed,
/// and the default pointer moved off it (to the highest version still registered).
pub async fn record_removal(registry: &Registry, source: &str) -> Result<Outcome, RegistrarError> {
    let records = registry.find_by_source(source).await?;
    for record in &records {
        registry
            .mark_removed(&record.model, &record.version)
            .await?;
        registry
            .retreat_default(&record.model, &record.version)
            .await?;
    }
    Ok(match records.into_iter().next() {
        Some(record) => Outcome::Removed {
            model: record.model,
            version: record.version,
        },
        None => Outcome::Ignored {
            reason: format!("no version was registered from {source}"),
        },
    })
}

/// The contents of a zip archive, read through ranged GETs: the end of the archive first
/// (where the central directory is, zip64 records included), then only the ranges the zip
/// reader asks for beyond it (usually just the manifest's entry).
async fn zip_contents(
    store: &ObjectStore,
    location: &Location,
    size: u64,
) -> Result<Contents, RegistrarError> {
    let handle = tokio::runtime::Handle::current();
    let (store, at) = (store.clone(), location.clone());
    // The zip reader is synchronous: it runs on a blocking thread whose reads wait for their
    // ranges. A store failure is kept, to be reported as itself (and retried) rather than as
    // a damaged archive.
    let (inspected, failure, fetches, fetched) = joined(
        tokio::task::spawn_blocking(move || {
            let mut failure = None;
            let fetch = |range: Range<u64>| {
                handle.block_on(store.get_range(&at, range)).map_err(|e| {
                    let message = e.to_string();
                    failure = Some(e);
                    std::io::Error::other(message)
                })
            };
            let mut reader = RangeReader::new(size, fetch);
            let inspected = match reader.prefetch_tail(ZIP_TAIL_BYTES) {
                Ok(()) => inspect::inspect_zip(&mut reader),
                Err(e) => Err(MarError::io("read the end of the archive", e)),
            };
            let (fetches, fetched) = (reader.fetches(), reader.bytes_fetched());
            drop(reader);
            (inspected, failure, fetches, fetched)
        })
        .await,
    );
    tracing::debug!(archive = %location, size, fetches, fetched, "zip inspected");
    if let Some(e) = failure {
        return Err(e.into());
    }
    inspected.map_err(|e| RegistrarError::Refused {
        location: location.to_string(),
        reason: e.to_string(),
    })
}

/// A scratch folder for one archive.
fn scratch() -> Result<tempfile::TempDir, RegistrarError> {
    tempfile::tempdir().map_err(|source| {
        RegistrarError::Store(StoreError::Io {
            action: "create a scratch folder in",
            path: std::env::temp_dir(),
            source,
        })
    })
}

/// SHA-256 of an object without a recorded checksum, reading it once.
async fn streamed_sha256(
    store: &ObjectStore,
    location: &Location,
) -> Result<String, RegistrarError> {
    let dir = scratch()?;
    let report = store
        .download(
            location,
            &dir.path().join("archive"),
            Expect::default(),
            DownloadOptions::default(),
        )
        .await?;
    Ok(report.sha256)
}

/// A tgz archive streamed once: its SHA-256 and contents.
async fn tgz_contents(
    store: &ObjectStore,
    location: &Location,
) -> Result<(Contents, String), RegistrarError> {
    let dir = scratch()?;
    let path = dir.path().join("archive");
    let report = store
        .download(
            location,
            &path,
            Expect::default(),
            DownloadOptions::default(),
        )
        .await?;
    let inspected = joined(
        tokio::task::spawn_blocking(move || {
            let file = std::fs::File::open(&path)
                .map_err(|e| MarError::io("read the downloaded archive", e))?;
            inspect::inspect_tgz(std::io::BufReader::new(file))
        })
        .await,
    );
    drop(dir);
    let contents = inspected.map_err(|e| RegistrarError::Refused {
        location: location.to_string(),
        reason: e.to_string(),
    })?;
    Ok((contents, report.sha256))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn keys_are_url_decoded() {
        assert_eq!(
            decode_key("archives/my+model%201.0.mar"),
            "archives/my model 1.0.mar"
        );
        assert_eq!(decode_key("a%2Fb%zz%"), "a/b%zz%");
    }

    #[test]
    fn s3_and_sqs_events() {
        let s3 = serde_json::json!({"Records": [{
            "eventName": "ObjectCreated:Put",
            "s3": {"bucket": {"name": "b"}, "object": {"key": "archives/a+b.mar", "size": 3}}
        }, {
            "eventName": "ObjectRemoved:Delete",
            "s3": {"bucket": {"name": "b"}, "object": {"key": "archives/c.mar"}}
        }]});
        let events = parse_events(&s3).unwrap();
        assert_eq!(events.len(), 2);
        assert!(events[0].created && !events[1].created);
        assert_eq!(events[0].key, "archives/a b.mar");
        let sqs = serde_json::json!({"Records": [
            {"body": s3.to_string()},
            {"body": "{\"Event\": \"s3:TestEvent\"}"}
        ]});
        assert_eq!(parse_events(&sqs).unwrap(), events);
        assert!(parse_events(&serde_json::json!({"nope": 1})).is_err());
    }
}
