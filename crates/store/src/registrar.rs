//! What the S3-triggered registrar does: S3 `ObjectCreated` / `ObjectRemoved` events (direct,
//! or wrapped in SQS messages) for archives under a prefix become version records in the
//! registry. A zip archive's manifest is read with ranged reads (end of central directory,
//! central directory, one entry) before anything else; a tgz archive is streamed once.

use std::io::Read;

use serde_json::Value;

use crate::registry::{now_ms, Registered, Registry, RegistryError, VersionRecord, VersionStatus};
use crate::store::{DownloadOptions, Expect, Location, ObjectStore, StoreError};
use torchfn_archive::manifest::Manifest;

/// The most bytes a manifest may take.
const MAX_MANIFEST_BYTES: u64 = 1 << 20;

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
    let (manifest, names, sha256) = if magic.starts_with(b"PK") {
        let (manifest, names) = zip_manifest(store, &location, meta.size).await?;
        let sha256 = match meta.sha256.clone() {
            Some(sha) => sha,
            None => streamed_sha256(store, &location).await?,
        };
        (manifest, names, sha256)
    } else {
        tgz_manifest(store, &location).await?
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
        let resolvable = torchfn_archive::manifest::BUILTIN_HANDLERS.contains(&file)
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

fn u16_at(b: &[u8], i: usize) -> Option<u64> {
    Some(u64::from(u16::from_le_bytes(
        b.get(i..i + 2)?.try_into().ok()?,
    )))
}

fn u32_at(b: &[u8], i: usize) -> Option<u64> {
    Some(u64::from(u32::from_le_bytes(
        b.get(i..i + 4)?.try_into().ok()?,
    )))
}

/// The manifest and entry names of a zip archive, from three ranged reads.
async fn zip_manifest(
    store: &ObjectStore,
    location: &Location,
    size: u64,
) -> Result<(Manifest, Vec<String>), RegistrarError> {
    let refuse = |reason: &str| RegistrarError::Refused {
        location: location.to_string(),
        reason: reason.to_string(),
    };
    let tail_len = size.min(65_557);
    let tail = store.get_range(location, size - tail_len..size).await?;
    let eocd = (0..tail.len().saturating_sub(21))
        .rev()
        .find(|&i| tail[i..i + 4] == [0x50, 0x4b, 0x05, 0x06])
        .ok_or_else(|| refuse("not a zip archive (no end of central directory)"))?;
    let (cd_size, cd_offset) = (
        u32_at(&tail, eocd + 12).ok_or_else(|| refuse("truncated zip"))?,
        u32_at(&tail, eocd + 16).ok_or_else(|| refuse("truncated zip"))?,
    );
    if cd_offset == 0xffff_ffff || cd_offset + cd_size > size {
        return Err(refuse("zip64 or damaged central directory"));
    }
    let cd = store
        .get_range(location, cd_offset..cd_offset + cd_size)
        .await?;
    let mut names = Vec::new();
    let mut manifest_entry = None;
    let mut i = 0usize;
    while i + 46 <= cd.len() && cd[i..i + 4] == [0x50, 0x4b, 0x01, 0x02] {
        let bad = || refuse("damaged central directory");
        let method = u16_at(&cd, i + 10).ok_or_else(bad)?;
        let comp = u32_at(&cd, i + 20).ok_or_else(bad)?;
        let name_len = u16_at(&cd, i + 28).ok_or_else(bad)? as usize;
        let extra = u16_at(&cd, i + 30).ok_or_else(bad)? as usize;
        let comment = u16_at(&cd, i + 32).ok_or_else(bad)? as usize;
        let local = u32_at(&cd, i + 42).ok_or_else(bad)?;
        let name = String::from_utf8_lossy(cd.get(i + 46..i + 46 + name_len).ok_or_else(bad)?)
            .into_owned();
        if name == torchfn_archive::mar::MANIFEST_PATH {
            manifest_entry = Some((method, comp, local));
        }
        names.push(name);
        i += 46 + name_len + extra + comment;
    }
    let (method, comp, local) =
        manifest_entry.ok_or_else(|| refuse("the archive has no MAR-INF/MANIFEST.json"))?;
    if comp > MAX_MANIFEST_BYTES {
        return Err(refuse("the manifest is too large"));
    }
    let header = store.get_range(location, local..local + 30).await?;
    let start = local + 30 + u16_at(&header, 26).unwrap_or(0) + u16_at(&header, 28).unwrap_or(0);
    let data = store.get_range(location, start..start + comp).await?;
    let mut bytes = Vec::new();
    match method {
        0 => bytes = data,
        8 => {
            flate2::read::DeflateDecoder::new(&data[..])
                .take(MAX_MANIFEST_BYTES)
                .read_to_end(&mut bytes)
                .map_err(|e| refuse(&format!("the manifest does not inflate: {e}")))?;
        }
        _ => {
            return Err(refuse(
                "the manifest uses an unsupported compression method",
            ))
        }
    }
    let manifest = Manifest::parse(&bytes).map_err(|e| refuse(&e.to_string()))?;
    Ok((manifest, names))
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

/// A tgz archive streamed once: its SHA-256, entry names (top folder stripped) and manifest.
async fn tgz_manifest(
    store: &ObjectStore,
    location: &Location,
) -> Result<(Manifest, Vec<String>, String), RegistrarError> {
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
    let refuse = |reason: String| RegistrarError::Refused {
        location: location.to_string(),
        reason,
    };
    let file = std::fs::File::open(&path).map_err(|e| refuse(e.to_string()))?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut names = Vec::new();
    let mut manifest = None;
    for entry in archive
        .entries()
        .map_err(|e| refuse(format!("not a tar.gz: {e}")))?
    {
        let mut entry = entry.map_err(|e| refuse(format!("damaged tar.gz: {e}")))?;
        let full = entry
            .path()
            .map_err(|e| refuse(e.to_string()))?
            .to_string_lossy()
            .into_owned();
        let name = full
            .split_once('/')
            .map_or(full.as_str(), |(_, rest)| rest)
            .to_string();
        if name == torchfn_archive::mar::MANIFEST_PATH {
            let mut bytes = Vec::new();
            (&mut entry)
                .take(MAX_MANIFEST_BYTES)
                .read_to_end(&mut bytes)
                .map_err(|e| refuse(e.to_string()))?;
            manifest = Some(Manifest::parse(&bytes).map_err(|e| refuse(e.to_string()))?);
        }
        names.push(name);
    }
    let manifest =
        manifest.ok_or_else(|| refuse("the archive has no MAR-INF/MANIFEST.json".into()))?;
    Ok((manifest, names, report.sha256))
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
