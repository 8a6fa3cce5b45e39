//! `torchfn-local --registry s3://…` follows the registry the registrar writes (real S3
//! server: moto_server): an archive uploaded and registered while the server runs is served
//! without a restart, a higher version becomes the default, and a removed version goes.

#![allow(clippy::unwrap_used)]

use torchfn_test_support::{self as common, moto, server};

use std::time::{Duration, Instant};

use common::{fixtures, json_close, reference};
use serde_json::json;
use server::Server;
use torchfn_store::registrar::{handle, ArchiveEvent, Outcome, RegistrarConfig};
use torchfn_store::registry::Registry;
use torchfn_store::store::{Location, ObjectStore};

/// Uploads a fixture archive as `archives/<key>` and hands the registrar its upload event.
async fn upload(store: &ObjectStore, registry: &Registry, bucket: &str, fixture: &str, key: &str) {
    let at: Location = format!("s3://{bucket}/archives/{key}").parse().unwrap();
    store
        .put(&at, std::fs::read(fixtures().join(fixture)).unwrap())
        .await
        .unwrap();
    event(store, registry, bucket, key, true).await;
}

async fn event(store: &ObjectStore, registry: &Registry, bucket: &str, key: &str, created: bool) {
    let config = RegistrarConfig {
        prefix: "archives/".into(),
        max_archive_bytes: 1 << 30,
    };
    let event = ArchiveEvent {
        created,
        bucket: bucket.into(),
        key: format!("archives/{key}"),
    };
    let outcome = handle(registry, store, &config, &event).await.unwrap();
    assert!(
        matches!(
            outcome,
            Outcome::Registered { .. } | Outcome::Removed { .. }
        ),
        "{outcome:?}"
    );
}

/// Waits until `check` holds, polling the server.
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !check() {
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn registered_versions_appear_without_a_restart() {
    moto::env();
    let reference = reference();
    let bucket = format!("follow-{}", std::process::id());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = ObjectStore::from_env();
    let root: Location = format!("s3://{bucket}/registry").parse().unwrap();
    let registry = Registry::new(store.clone(), root.clone());
    rt.block_on(moto::new_bucket(&bucket));

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.properties");
    std::fs::write(
        &config,
        "inference_address=http://127.0.0.1:0\nmanagement_address=http://127.0.0.1:0\n\
         metrics_address=http://127.0.0.1:0\ntorchfn_registry_poll_seconds=1\n",
    )
    .unwrap();
    let server = Server::start(&[
        "--ts-config",
        config.to_str().unwrap(),
        "--registry",
        &root.to_string(),
        "--handler",
        "classifier=classifier",
    ])
    .wait_healthy();
    let single = json!({"features": reference["seed_features"]}).to_string();
    let answers = |path: &str, want: &serde_json::Value| {
        let r = server
            .client
            .post(format!("{}/predictions/{path}", server.inference))
            .header("content-type", "application/json")
            .body(single.clone())
            .send()
            .unwrap();
        r.status() == 200 && json_close(&r.json().unwrap(), want, 1e-5)
    };

    rt.block_on(upload(
        &store,
        &registry,
        &bucket,
        "store/classifier.mar",
        "classifier-1.mar",
    ));
    eventually("1.0 served", || {
        answers("classifier", &reference["classifier_single"])
    });
    rt.block_on(upload(
        &store,
        &registry,
        &bucket,
        "v2/classifier.mar",
        "classifier-2.mar",
    ));
    eventually("2.0 the default", || {
        answers("classifier", &reference["classifier_v2_single"])
    });
    assert!(answers("classifier/1.0", &reference["classifier_single"]));
    // The 1.0 archive deleted: the registrar marks it removed, and the server lets it go.
    rt.block_on(event(&store, &registry, &bucket, "classifier-1.mar", false));
    eventually("1.0 gone", || {
        let r = server
            .client
            .post(format!("{}/predictions/classifier/1.0", server.inference))
            .body(single.clone())
            .send()
            .unwrap();
        r.status() == 404
    });
    assert!(answers("classifier", &reference["classifier_v2_single"]));
}
