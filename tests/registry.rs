//! The registry on a real object store: a folder (`file://`) and a real S3 server
//! (moto_server on loopback). Versions are created exactly once, the default pointer is moved
//! by compare-and-swap, and racing writers lose nothing.

#![allow(clippy::unwrap_used)]

use torchfn_test_support::moto;

use std::sync::Arc;

use torchfn_store::registry::{
    compare_versions, Registered, Registry, VersionRecord, VersionStatus,
};
use torchfn_store::store::{Location, ObjectStore};

fn record(model: &str, version: &str, sha256: &str) -> VersionRecord {
    VersionRecord {
        model: model.into(),
        version: version.into(),
        source: format!("s3://models/{model}-{version}.mar"),
        etag: None,
        sha256: sha256.into(),
        size: 1234,
        manifest: serde_json::json!({"model": {"modelName": model, "modelVersion": version}}),
        handler: Some("tensor".into()),
        created_ms: torchfn_store::registry::now_ms(),
        status: VersionStatus::Registered,
        removed_ms: None,
    }
}

/// Both stores: a temporary folder and a bucket on the local S3 server.
async fn registries() -> Vec<(Registry, Option<tempfile::TempDir>)> {
    let dir = tempfile::tempdir().unwrap();
    moto::env();
    let store = ObjectStore::from_env();
    let file = Registry::new(store.clone(), Location::File(dir.path().to_path_buf()));
    let bucket = format!("registry-{}", std::process::id());
    moto::new_bucket(&bucket).await;
    let s3: Location = format!("s3://{bucket}/registry").parse().unwrap();
    vec![(file, Some(dir)), (Registry::new(store, s3), None)]
}

async fn registration_is_exactly_once_and_idempotent(reg: &Registry) {
    let r = record("classifier", "1.0", "aa");
    assert_eq!(reg.register(&r).await.unwrap(), Registered::Created);
    // A re-delivered event for the same archive is harmless.
    assert_eq!(
        reg.register(&r).await.unwrap(),
        Registered::AlreadyRegistered
    );
    // Another archive claiming the version is refused; the record is unchanged.
    let other = record("classifier", "1.0", "bb");
    match reg.register(&other).await.unwrap() {
        Registered::Conflict { existing } => assert_eq!(existing.sha256, "aa"),
        got => panic!("expected a conflict, got {got:?}"),
    }
    assert_eq!(reg.version("classifier", "1.0").await.unwrap().sha256, "aa");
    assert!(reg.version("classifier", "9.9").await.is_err());
    reg.mark_removed("classifier", "1.0").await.unwrap();
    let removed = reg.version("classifier", "1.0").await.unwrap();
    assert_eq!(removed.status, VersionStatus::Removed);
    assert!(removed.removed_ms.is_some());
    // A removed version still cannot be claimed by another archive.
    assert!(matches!(
        reg.register(&other).await.unwrap(),
        Registered::Conflict { .. }
    ));
}

async fn default_pointer_follows_the_highest_version_unless_pinned(reg: &Registry) {
    for v in ["1.9", "1.10", "1.2"] {
        reg.register(&record("ptr", v, v)).await.unwrap();
        reg.advance_default("ptr", v).await.unwrap();
    }
    let (p, _) = reg.default_pointer("ptr").await.unwrap().unwrap();
    assert_eq!(p.version, "1.10");
    reg.pin("ptr", "1.2", true).await.unwrap();
    reg.register(&record("ptr", "2.0", "2.0")).await.unwrap();
    assert!(!reg.advance_default("ptr", "2.0").await.unwrap());
    let (p, _) = reg.default_pointer("ptr").await.unwrap().unwrap();
    assert_eq!((p.version.as_str(), p.pinned), ("1.2", true));
    reg.pin("ptr", "1.2", false).await.unwrap();
    assert!(reg.advance_default("ptr", "2.0").await.unwrap());
    let versions: Vec<String> = reg
        .versions("ptr")
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.version)
        .collect();
    assert_eq!(versions, ["1.2", "1.9", "1.10", "2.0"]);
}

/// 16 writers race to register the same new version, and 16 more each register and
/// advance their own version: one record, and the pointer ends on the highest version.
async fn racing_writers_lose_nothing(reg: &Registry) {
    let reg = Arc::new(reg.clone());
    let same = (0..16).map(|_| {
        let reg = reg.clone();
        tokio::spawn(async move { reg.register(&record("race", "1.0", "cc")).await.unwrap() })
    });
    let outcomes = futures_join(same.collect()).await;
    let created = outcomes
        .iter()
        .filter(|o| **o == Registered::Created)
        .count();
    assert_eq!(created, 1, "{outcomes:?}");
    assert!(outcomes
        .iter()
        .all(|o| matches!(o, Registered::Created | Registered::AlreadyRegistered)));

    let each = (1..=16).map(|i| {
        let reg = reg.clone();
        tokio::spawn(async move {
            let v = format!("2.{i}");
            reg.register(&record("race", &v, &v)).await.unwrap();
            reg.advance_default("race", &v).await.unwrap()
        })
    });
    futures_join(each.collect()).await;
    let (p, _) = reg.default_pointer("race").await.unwrap().unwrap();
    assert_eq!(p.version, "2.16");
    assert_eq!(reg.versions("race").await.unwrap().len(), 17);
}

/// Uploads and deletions of one model's archives racing, each event delivered twice (S3
/// delivers at least once), through the registrar's own registry steps: every version is
/// recorded once, every deleted one is marked removed, and the default pointer ends on the
/// highest version still registered, whatever the interleaving. Deleting the default moves the
/// pointer back; deleting every version leaves it on a removed one.
async fn racing_uploads_and_deletions_lose_nothing(reg: &Registry) {
    use torchfn_store::registrar::{record_removal, record_upload, Outcome};
    let reg = Arc::new(reg.clone());
    let n = 16u32;
    for round in 0..4u32 {
        let model = format!("churn{round}");
        // Every third version is deleted, and the highest (the default, until deleted); in
        // the last round, every version.
        let deleted = move |i: u32| round == 3 || i % 3 == round % 3 || i == n;
        let tasks = (1..=n).flat_map(|i| (0..2).map(move |copy| (i, copy)));
        let handles = tasks
            .map(|(i, copy)| {
                let (reg, model) = (reg.clone(), model.clone());
                tokio::spawn(async move {
                    let version = format!("{i}.0");
                    let r = record(&model, &version, &format!("sha-{i}"));
                    match record_upload(&reg, &r).await.unwrap() {
                        Outcome::Registered { .. } | Outcome::AlreadyRegistered { .. } => {}
                        other => panic!("{version}: {other:?}"),
                    }
                    if deleted(i) {
                        // Half the deletions come at once, half after other tasks ran.
                        if copy == 1 {
                            tokio::task::yield_now().await;
                        }
                        match record_removal(&reg, &r.source).await.unwrap() {
                            Outcome::Removed { version: v, .. } => assert_eq!(v, version),
                            other => panic!("{version}: {other:?}"),
                        }
                    }
                })
            })
            .collect();
        futures_join(handles).await;

        let records = reg.versions(&model).await.unwrap();
        assert_eq!(records.len(), n as usize, "{model}: {records:?}");
        for r in &records {
            let i: u32 = r.version.trim_end_matches(".0").parse().unwrap();
            let want = if deleted(i) {
                VersionStatus::Removed
            } else {
                VersionStatus::Registered
            };
            assert_eq!(r.status, want, "{model} {}", r.version);
            assert_eq!(r.sha256, format!("sha-{i}"));
        }
        let (pointer, _) = reg.default_pointer(&model).await.unwrap().unwrap();
        let highest_left = (1..=n).rev().find(|&i| !deleted(i));
        match highest_left {
            Some(i) => assert_eq!(pointer.version, format!("{i}.0"), "{model}"),
            None => {
                let r = reg.version(&model, &pointer.version).await.unwrap();
                assert_eq!(r.status, VersionStatus::Removed, "{model}");
            }
        }
        assert!(!pointer.pinned);
    }
}

async fn futures_join<T: Send + 'static>(handles: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn registry_on_a_folder_and_on_s3() {
    moto::env();
    for (reg, _dir) in registries().await {
        let at = reg.root().to_string();
        registration_is_exactly_once_and_idempotent(&reg).await;
        default_pointer_follows_the_highest_version_unless_pinned(&reg).await;
        racing_writers_lose_nothing(&reg).await;
        racing_uploads_and_deletions_lose_nothing(&reg).await;
        eprintln!("registry checks passed on {at}");
    }
    assert_eq!(
        compare_versions("1.10", 0, "1.9", 0),
        std::cmp::Ordering::Greater
    );
}
