//! A server following an object-store registry (the one the registrar function writes):
//! every few seconds it reads the registry and loads the versions recorded there that it
//! has not loaded, moves each model's default where the registry's pointer is, and unloads
//! versions the registry marks removed. Requests are never dropped: a new version is loaded
//! beside the others before anything points at it, and a removed one finishes what it holds.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crate::manager::{retire, LoadSpec, Manager};
use torchfn_store::registry::{ModelEntry, Registry, VersionStatus};
use torchfn_store::store::Expect;

/// What one pass changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncReport {
    pub loaded: Vec<(String, String)>,
    pub defaults: Vec<(String, String)>,
    pub unloaded: Vec<(String, String)>,
    pub failed: Vec<(String, String, String)>,
}

/// Follows `registry` until the task is dropped, reading it every `every`.
pub async fn follow(registry: Registry, manager: Arc<Manager>, every: Duration) {
    let mut follower = Follower::default();
    loop {
        match registry.snapshot().await {
            Ok(snapshot) => {
                let report = follower.sync(&manager, snapshot).await;
                if report != SyncReport::default() {
                    tracing::info!(?report, registry = %registry.root(), "followed the registry");
                }
            }
            Err(e) => {
                tracing::warn!(registry = %registry.root(), error = %e, "could not read the registry; trying again");
            }
        }
        tokio::time::sleep(every).await;
    }
}

/// What the follower remembers between passes.
#[derive(Default)]
pub struct Follower {
    /// Versions this follower loaded (the only ones it unloads).
    loaded: HashSet<(String, String)>,
    /// Versions that failed to load, by archive ETag/SHA-256: not tried again until the
    /// record changes.
    failed: HashSet<(String, String, String)>,
}

impl Follower {
    /// Brings the manager in line with one snapshot of the registry.
    pub async fn sync(
        &mut self,
        manager: &Arc<Manager>,
        snapshot: BTreeMap<String, ModelEntry>,
    ) -> SyncReport {
        let mut report = SyncReport::default();
        for (model, entry) in snapshot {
            for record in &entry.versions {
                let key = (model.clone(), record.version.clone());
                let loaded_here = manager.get(&model, Some(&record.version)).is_ok();
                match record.status {
                    VersionStatus::Registered if !loaded_here => {
                        let attempt =
                            (model.clone(), record.version.clone(), record.sha256.clone());
                        if self.failed.contains(&attempt) {
                            continue;
                        }
                        let spec = match record.source.parse() {
                            Ok(source) => LoadSpec {
                                url: record.source.clone(),
                                source,
                                expect: Expect {
                                    size: Some(record.size),
                                    sha256: Some(record.sha256.clone()),
                                },
                                name: Some(model.clone()),
                                loaded_at_startup: false,
                                params: Default::default(),
                            },
                            Err(e) => {
                                self.failed.insert(attempt);
                                report.failed.push((
                                    model.clone(),
                                    record.version.clone(),
                                    e.to_string(),
                                ));
                                continue;
                            }
                        };
                        let m = manager.clone();
                        match tokio::task::spawn_blocking(move || m.load(&spec)).await {
                            Ok(Ok(_)) => {
                                self.loaded.insert(key.clone());
                                report.loaded.push(key);
                            }
                            Ok(Err(e)) => {
                                tracing::error!(model = %model, version = %record.version, error = %e.message, "registered version not loaded");
                                self.failed.insert(attempt);
                                report.failed.push((
                                    model.clone(),
                                    record.version.clone(),
                                    e.message,
                                ));
                            }
                            Err(e) => {
                                report.failed.push((
                                    model.clone(),
                                    record.version.clone(),
                                    e.to_string(),
                                ));
                            }
                        }
                    }
                    VersionStatus::Removed if loaded_here && self.loaded.contains(&key) => {
                        match manager.unload(&model, &record.version) {
                            Ok(version) => {
                                retire(version);
                                self.loaded.remove(&key);
                                report.unloaded.push(key);
                            }
                            // The default while others remain: it goes once the default moves.
                            Err(e) => {
                                tracing::debug!(model = %model, version = %record.version, error = %e.message, "removed version kept for now");
                            }
                        }
                    }
                    _ => {}
                }
            }
            if let Some(pointer) = &entry.default {
                let current = manager.get(&model, None).map(|m| m.version.clone());
                let wanted = &pointer.version;
                if current.as_ref().is_ok_and(|c| c != wanted)
                    && manager.get(&model, Some(wanted)).is_ok()
                    && manager.set_default(&model, wanted).is_ok()
                {
                    report.defaults.push((model.clone(), wanted.clone()));
                }
            }
            // A removed version that was the default can go now that the default moved.
            for record in &entry.versions {
                let key = (model.clone(), record.version.clone());
                if record.status == VersionStatus::Removed && self.loaded.contains(&key) {
                    if let Ok(version) = manager.unload(&model, &record.version) {
                        retire(version);
                        self.loaded.remove(&key);
                        report.unloaded.push(key);
                    }
                }
            }
        }
        report
    }
}
