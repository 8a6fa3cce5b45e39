//! The model registry on the object store: one record per model version and a default-version
//! pointer per model, written so that concurrent writers can neither lose nor overwrite a
//! version.
//!
//! Layout under the registry root (`s3://bucket/prefix` or a folder):
//! `<model>/versions/<version>.json` (a [`VersionRecord`], created with `If-None-Match: *`, so
//! exactly one writer creates it) and `<model>/default.json` (a [`DefaultPointer`], moved with
//! `If-Match` on its ETag: compare-and-swap, retried on conflict).

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

use crate::store::{Location, ObjectStore, StoreError};

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("registry record {location} is not valid JSON: {message}")]
    Corrupt { location: String, message: String },
    #[error("model {model} version {version} is not registered")]
    UnknownVersion { model: String, version: String },
    #[error("the default pointer of model {model} kept changing under us ({attempts} attempts)")]
    Contended { model: String, attempts: usize },
    #[error("`{0}` cannot be used as a model name or version in the registry")]
    InvalidName(String),
}

/// A version's life cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VersionStatus {
    Registered,
    Removed,
}

/// What the registry knows of one model version (the fields MLflow and SageMaker model
/// registries keep).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionRecord {
    pub model: String,
    pub version: String,
    /// Where the archive is (`s3://...` or a path).
    pub source: String,
    pub etag: Option<String>,
    /// Hex SHA-256 of the archive.
    pub sha256: String,
    pub size: u64,
    /// The archive's MAR-INF/MANIFEST.json.
    pub manifest: serde_json::Value,
    pub handler: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub created_ms: u64,
    pub status: VersionStatus,
    pub removed_ms: Option<u64>,
}

/// One model in a registry snapshot.
#[derive(Debug, Clone, Default)]
pub struct ModelEntry {
    pub versions: Vec<VersionRecord>,
    pub default: Option<DefaultPointer>,
}

/// A model's default version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DefaultPointer {
    pub version: String,
    /// A pinned pointer is moved only by `pin`, never by new registrations.
    pub pinned: bool,
    pub updated_ms: u64,
}

/// What `register` did.
#[derive(Debug, Clone, PartialEq)]
pub enum Registered {
    /// A new record was written.
    Created,
    /// The same archive (same SHA-256) was already registered: a re-delivered event.
    AlreadyRegistered,
    /// Another archive holds this version; nothing was written.
    Conflict { existing: Box<VersionRecord> },
}

/// The registry at one root.
#[derive(Clone)]
pub struct Registry {
    store: ObjectStore,
    root: Location,
}

/// How often a contended pointer update is retried.
const CAS_ATTEMPTS: usize = 64;

impl Registry {
    pub fn new(store: ObjectStore, root: Location) -> Self {
        Self { store, root }
    }

    pub fn root(&self) -> &Location {
        &self.root
    }

    fn record_location(&self, model: &str, version: &str) -> Result<Location, RegistryError> {
        check_name(model)?;
        check_name(version)?;
        Ok(self.root.join(&format!("{model}/versions/{version}.json")))
    }

    fn pointer_location(&self, model: &str) -> Result<Location, RegistryError> {
        check_name(model)?;
        Ok(self.root.join(&format!("{model}/default.json")))
    }

    /// Records a version, exactly once. Re-registering the same archive is harmless; a
    /// different archive claiming an existing version is refused and nothing is overwritten.
    pub async fn register(&self, record: &VersionRecord) -> Result<Registered, RegistryError> {
        let location = self.record_location(&record.model, &record.version)?;
        let bytes = to_json(record);
        match self.store.put_if_absent(&location, bytes).await {
            Ok(_) => Ok(Registered::Created),
            Err(StoreError::AlreadyExists { .. }) => {
                let existing = self.version(&record.model, &record.version).await?;
                if existing.sha256 == record.sha256 {
                    Ok(Registered::AlreadyRegistered)
                } else {
                    tracing::warn!(
                        model = %record.model,
                        version = %record.version,
                        existing = %existing.source,
                        refused = %record.source,
                        "a different archive claims a registered version; refused"
                    );
                    Ok(Registered::Conflict {
                        existing: Box::new(existing),
                    })
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// One version's record.
    pub async fn version(
        &self,
        model: &str,
        version: &str,
    ) -> Result<VersionRecord, RegistryError> {
        let location = self.record_location(model, version)?;
        match self.store.get(&location).await {
            Ok(object) => from_json(&object.bytes, &location),
            Err(e) if e.is_not_found() => Err(RegistryError::UnknownVersion {
                model: model.to_string(),
                version: version.to_string(),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// All of a model's version records, in version order.
    pub async fn versions(&self, model: &str) -> Result<Vec<VersionRecord>, RegistryError> {
        check_name(model)?;
        let prefix = self.root.join(&format!("{model}/versions/"));
        let mut out = Vec::new();
        for (location, _) in self.store.list(&prefix).await? {
            if location.to_string().ends_with(".json") {
                let object = self.store.get(&location).await?;
                out.push(from_json::<VersionRecord>(&object.bytes, &location)?);
            }
        }
        out.sort_by(|a, b| compare_versions(&a.version, a.created_ms, &b.version, b.created_ms));
        Ok(out)
    }

    /// Every model's version records (in version order) and default pointer, from one
    /// listing of the registry: what a server following the registry compares itself with.
    pub async fn snapshot(
        &self,
    ) -> Result<std::collections::BTreeMap<String, ModelEntry>, RegistryError> {
        let mut out: std::collections::BTreeMap<String, ModelEntry> = Default::default();
        for (location, _) in self.store.list(&self.root).await? {
            let text = location.to_string();
            if text.ends_with("/default.json") {
                let object = self.store.get(&location).await?;
                let pointer: DefaultPointer = from_json(&object.bytes, &location)?;
                let model = text
                    .trim_end_matches("/default.json")
                    .rsplit('/')
                    .next()
                    .unwrap_or_default()
                    .to_string();
                out.entry(model).or_default().default = Some(pointer);
            } else if text.contains("/versions/") && text.ends_with(".json") {
                let object = self.store.get(&location).await?;
                let record: VersionRecord = from_json(&object.bytes, &location)?;
                out.entry(record.model.clone())
                    .or_default()
                    .versions
                    .push(record);
            }
        }
        for entry in out.values_mut() {
            entry.versions.sort_by(|a, b| {
                compare_versions(&a.version, a.created_ms, &b.version, b.created_ms)
            });
        }
        Ok(out)
    }

    /// Every version record, across models, whose archive is `source`.
    pub async fn find_by_source(&self, source: &str) -> Result<Vec<VersionRecord>, RegistryError> {
        let mut out = Vec::new();
        for (location, _) in self.store.list(&self.root).await? {
            let text = location.to_string();
            if text.contains("/versions/") && text.ends_with(".json") {
                let object = self.store.get(&location).await?;
                let record: VersionRecord = from_json(&object.bytes, &location)?;
                if record.source == source {
                    out.push(record);
                }
            }
        }
        Ok(out)
    }

    /// Marks a version removed (its archive was deleted). The record stays, so the version
    /// cannot be claimed again by another archive.
    pub async fn mark_removed(&self, model: &str, version: &str) -> Result<(), RegistryError> {
        let location = self.record_location(model, version)?;
        for _ in 0..CAS_ATTEMPTS {
            let (bytes, etag) = match self.store.get(&location).await {
                Ok(object) => (object.bytes, object.etag),
                Err(e) if e.is_not_found() => {
                    return Err(RegistryError::UnknownVersion {
                        model: model.to_string(),
                        version: version.to_string(),
                    })
                }
                Err(e) => return Err(e.into()),
            };
            let mut record: VersionRecord = from_json(&bytes, &location)?;
            if record.status == VersionStatus::Removed {
                return Ok(());
            }
            record.status = VersionStatus::Removed;
            record.removed_ms = Some(now_ms());
            match self
                .store
                .put_if_match(&location, to_json(&record), &etag)
                .await
            {
                Ok(_) => return Ok(()),
                Err(StoreError::PreconditionFailed { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(RegistryError::Contended {
            model: model.to_string(),
            attempts: CAS_ATTEMPTS,
        })
    }

    /// The model's default pointer and its ETag, if it has one.
    pub async fn default_pointer(
        &self,
        model: &str,
    ) -> Result<Option<(DefaultPointer, String)>, RegistryError> {
        let location = self.pointer_location(model)?;
        match self.store.get(&location).await {
            Ok(object) => Ok(Some((from_json(&object.bytes, &location)?, object.etag))),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The default pointer if it changed since `etag` was read (a conditional GET: cheap
    /// when nothing changed), else `None`.
    pub async fn default_pointer_if_changed(
        &self,
        model: &str,
        etag: &str,
    ) -> Result<Option<(DefaultPointer, String)>, RegistryError> {
        let location = self.pointer_location(model)?;
        match self.store.get_if_changed(&location, etag).await {
            Ok(Some(object)) => Ok(Some((from_json(&object.bytes, &location)?, object.etag))),
            Ok(None) => Ok(None),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes the default pointer as a compare-and-swap against what was read: `etag` of the
    /// pointer read, or `None` when there was none. `Ok(false)` when another writer got there
    /// first (the caller reads again and decides again).
    async fn swap_pointer(
        &self,
        location: &Location,
        new: &DefaultPointer,
        etag: Option<&str>,
    ) -> Result<bool, RegistryError> {
        let written = match etag {
            None => self.store.put_if_absent(location, to_json(new)).await,
            Some(etag) => self.store.put_if_match(location, to_json(new), etag).await,
        };
        match written {
            Ok(_) => Ok(true),
            Err(StoreError::AlreadyExists { .. } | StoreError::PreconditionFailed { .. }) => {
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Moves the default pointer to `version` if it is higher than the current default
    /// (or there is none, or the current one was removed) and the model is not pinned.
    /// Compare-and-swap: a concurrent writer makes this re-read and decide again, so no update
    /// is lost. Returns whether it moved.
    ///
    /// With [`Registry::retreat_default`] after each removal, racing registrations and
    /// removals always leave the pointer on the highest version still registered: whichever
    /// of "pointer written" and "version removed" comes second sees the other and moves on.
    pub async fn advance_default(&self, model: &str, version: &str) -> Result<bool, RegistryError> {
        let candidate = self.version(model, version).await?;
        if candidate.status == VersionStatus::Removed {
            return Ok(false);
        }
        let location = self.pointer_location(model)?;
        for _ in 0..CAS_ATTEMPTS {
            let current = self.default_pointer(model).await?;
            if let Some((pointer, _)) = &current {
                if pointer.pinned || pointer.version == version {
                    return Ok(false);
                }
                let current = match self.version(model, &pointer.version).await {
                    Ok(r) => Some(r),
                    Err(RegistryError::UnknownVersion { .. }) => None,
                    Err(e) => return Err(e),
                };
                // A default that was removed (or whose record is gone) gives way to any
                // registered version.
                if let Some(current) = current.filter(|r| r.status == VersionStatus::Registered) {
                    let order = compare_versions(
                        version,
                        candidate.created_ms,
                        &current.version,
                        current.created_ms,
                    );
                    if order != Ordering::Greater {
                        return Ok(false);
                    }
                }
            }
            let new = DefaultPointer {
                version: version.to_string(),
                pinned: false,
                updated_ms: now_ms(),
            };
            let etag = current.as_ref().map(|(_, etag)| etag.as_str());
            if self.swap_pointer(&location, &new, etag).await? {
                tracing::info!(model, version, "default version advanced");
                // Removed while the pointer was being written: move on from it.
                if self.version(model, version).await?.status == VersionStatus::Removed {
                    self.retreat_default(model, version).await?;
                }
                return Ok(true);
            }
        }
        Err(RegistryError::Contended {
            model: model.to_string(),
            attempts: CAS_ATTEMPTS,
        })
    }

    /// After `version` was marked removed: if it is the (unpinned) default, moves the pointer
    /// to the highest version still registered. Compare-and-swap, like
    /// [`Registry::advance_default`]; a no-op when the pointer is elsewhere or pinned. When no
    /// version is left registered the pointer stays where it is (a function told to serve the
    /// model then refuses to start, naming the removed version). Returns whether it moved.
    pub async fn retreat_default(&self, model: &str, version: &str) -> Result<bool, RegistryError> {
        let location = self.pointer_location(model)?;
        let mut from = version.to_string();
        let mut moved = false;
        for _ in 0..CAS_ATTEMPTS {
            let Some((pointer, etag)) = self.default_pointer(model).await? else {
                return Ok(moved);
            };
            if pointer.pinned || pointer.version != from {
                return Ok(moved);
            }
            let Some(best) = self
                .versions(model)
                .await?
                .into_iter()
                .rfind(|r| r.status == VersionStatus::Registered)
            else {
                return Ok(moved);
            };
            let new = DefaultPointer {
                version: best.version.clone(),
                pinned: false,
                updated_ms: now_ms(),
            };
            if self.swap_pointer(&location, &new, Some(&etag)).await? {
                tracing::info!(model, from = %from, to = %best.version, "default version moved off a removed version");
                moved = true;
                if self.version(model, &best.version).await?.status == VersionStatus::Registered {
                    return Ok(true);
                }
                // That one was removed meanwhile too: move on from it.
                from = best.version;
            }
        }
        Err(RegistryError::Contended {
            model: model.to_string(),
            attempts: CAS_ATTEMPTS,
        })
    }

    /// Pins (or unpins, with `pinned = false`) the model's default to `version`.
    pub async fn pin(&self, model: &str, version: &str, pinned: bool) -> Result<(), RegistryError> {
        self.version(model, version).await?;
        let location = self.pointer_location(model)?;
        let new = DefaultPointer {
            version: version.to_string(),
            pinned,
            updated_ms: now_ms(),
        };
        for _ in 0..CAS_ATTEMPTS {
            let current = self.default_pointer(model).await?;
            let etag = current.as_ref().map(|(_, etag)| etag.as_str());
            if self.swap_pointer(&location, &new, etag).await? {
                return Ok(());
            }
        }
        Err(RegistryError::Contended {
            model: model.to_string(),
            attempts: CAS_ATTEMPTS,
        })
    }
}

/// Orders versions: dot-separated numbers compare numerically (1.10 > 1.9, 2 = 2.0);
/// anything else (or a mix) by creation time, then by text.
pub fn compare_versions(a: &str, a_created: u64, b: &str, b_created: u64) -> Ordering {
    match (numeric_parts(a), numeric_parts(b)) {
        (Some(x), Some(y)) => {
            let len = x.len().max(y.len());
            let pad = |v: &[u64], i: usize| v.get(i).copied().unwrap_or(0);
            (0..len)
                .map(|i| pad(&x, i).cmp(&pad(&y, i)))
                .find(|o| o.is_ne())
                .unwrap_or(Ordering::Equal)
        }
        _ => a_created.cmp(&b_created).then_with(|| a.cmp(b)),
    }
}

fn numeric_parts(v: &str) -> Option<Vec<u64>> {
    v.split('.').map(|p| p.parse::<u64>().ok()).collect()
}

/// Model names and versions become object keys: no separators, no dot-only names.
fn check_name(name: &str) -> Result<(), RegistryError> {
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(RegistryError::InvalidName(name.to_string()))
    }
}

fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec_pretty(value).unwrap_or_default()
}

fn from_json<T: for<'de> Deserialize<'de>>(
    bytes: &[u8],
    location: &Location,
) -> Result<T, RegistryError> {
    serde_json::from_slice(bytes).map_err(|e| RegistryError::Corrupt {
        location: location.to_string(),
        message: e.to_string(),
    })
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_order_numerically_then_by_time() {
        assert_eq!(compare_versions("1.10", 0, "1.9", 0), Ordering::Greater);
        assert_eq!(compare_versions("2", 0, "2.0", 0), Ordering::Equal);
        assert_eq!(compare_versions("1.0.1", 0, "1.0", 0), Ordering::Greater);
        assert_eq!(compare_versions("beta", 5, "alpha", 9), Ordering::Less);
        assert_eq!(compare_versions("beta", 9, "1.0", 5), Ordering::Greater);
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("classifier").is_ok());
        assert!(check_name("1.0").is_ok());
        for bad in ["", "..", "a/b", "a b", "x\\y"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
