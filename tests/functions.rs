//! `torchfn-model` outside Lambda (plain HTTP on `$PORT`, as on GPU serverless platforms):
//! it resolves its model in a registry on a real S3 server (moto_server), downloads and
//! checks the archive, and answers as the emulator does. An archive that does not match
//! its record is never served.

#![allow(clippy::unwrap_used)]

use torchfn_test_support::{self as common, moto};

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{assert_json_close, fixtures, json_close, reference};
use serde_json::json;
use torchfn_store::registry::{Registry, VersionRecord, VersionStatus};
use torchfn_store::store::{Location, ObjectStore};

/// Uploads the seed archive and registers it as `classifier` `version` with `sha256`.
async fn publish(store: &ObjectStore, bucket: &str, version: &str, sha256: Option<&str>) {
    publish_archive(store, bucket, version, "store/classifier.mar", sha256).await;
}

/// Uploads a fixture archive and registers it as `classifier` `version`, recording `sha256`
/// (the archive's own when `None`), and advances the default pointer to it.
async fn publish_archive(
    store: &ObjectStore,
    bucket: &str,
    version: &str,
    fixture: &str,
    sha256: Option<&str>,
) {
    let archive = std::fs::read(fixtures().join(fixture)).unwrap();
    let key: Location = format!("s3://{bucket}/archives/classifier-{version}.mar")
        .parse()
        .unwrap();
    store.put(&key, archive.clone()).await.unwrap();
    let real = {
        use std::fmt::Write;
        let mut hex = String::new();
        let sum = <sha2::Sha256 as sha2::Digest>::digest(&archive);
        for b in sum {
            write!(hex, "{b:02x}").unwrap();
        }
        hex
    };
    let registry = Registry::new(
        store.clone(),
        format!("s3://{bucket}/registry").parse().unwrap(),
    );
    let record = VersionRecord {
        model: "classifier".into(),
        version: version.into(),
        source: key.to_string(),
        etag: None,
        sha256: sha256.map_or(real, String::from),
        size: archive.len() as u64,
        manifest: json!({}),
        handler: Some("classifier".into()),
        created_ms: torchfn_store::registry::now_ms(),
        status: VersionStatus::Registered,
        removed_ms: None,
    };
    registry.register(&record).await.unwrap();
    registry
        .advance_default("classifier", version)
        .await
        .unwrap();
}

fn start(envs: &[(&str, String)]) -> (Child, Option<String>) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_torchfn-model"));
    cmd.env_remove("AWS_LAMBDA_RUNTIME_API")
        .env("PORT", "0")
        .env("TORCHFN_HOST", "127.0.0.1")
        .env("TORCHFN_HANDLER", "classifier")
        // Blank settings count as unset (Lambda's console leaves variables empty): no archive
        // URI, no pinned version (the registry's default is served and followed), the
        // default batch size.
        .env("TORCHFN_MODEL_URI", "")
        .env("TORCHFN_MODEL_VERSION", " ")
        .env("TORCHFN_BATCH_SIZE", "")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let addr = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("Inference API bind to: ").map(String::from));
    (child, addr)
}

#[test]
fn serves_the_registry_default_and_refuses_a_mismatched_archive() {
    moto::env();
    let reference = reference();
    let store = ObjectStore::from_env();
    let bucket = format!("functions-{}", std::process::id());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        moto::new_bucket(&bucket).await;
        publish(&store, &bucket, "1.0", None).await;
    });
    let registry = format!("s3://{bucket}/registry");
    let (mut child, addr) = start(&[
        ("TORCHFN_REGISTRY", registry.clone()),
        ("TORCHFN_MODEL_NAME", "classifier".into()),
    ]);
    let addr = addr.expect("the function printed no address");
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let r = client.get(format!("{addr}/ping")).send().unwrap();
    assert_eq!(r.status(), 200);
    let r = client
        .post(format!("{addr}/predictions/classifier"))
        .body(json!({"features": reference["seed_features"]}).to_string())
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().unwrap();
    assert_json_close(&body, &reference["classifier_single"], 1e-5, "function");
    // No management routes on a function.
    let r = client.get(format!("{addr}/models")).send().unwrap();
    assert_eq!(r.status(), 404);
    let _ = child.kill();
    let _ = child.wait();

    // A version whose recorded checksum does not match its archive: the function does not
    // start serving, and says why.
    rt.block_on(publish(&store, &bucket, "2.0", Some(&"0".repeat(64))));
    let (mut child, addr) = start(&[
        ("TORCHFN_REGISTRY", registry),
        ("TORCHFN_MODEL_NAME", "classifier".into()),
    ]);
    assert!(
        addr.is_none(),
        "a mismatched archive was served at {addr:?}"
    );
    let status = child.wait().unwrap();
    assert!(!status.success());
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(
        err.contains("SHA-256") || err.contains("sha256") || err.contains("checksum"),
        "{err}"
    );
}

#[test]
fn a_warm_function_swaps_to_a_new_default_without_dropping_requests() {
    moto::env();
    let reference = reference();
    let store = ObjectStore::from_env();
    let bucket = format!("swap-{}", std::process::id());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        moto::new_bucket(&bucket).await;
        publish(&store, &bucket, "1.0", None).await;
    });
    let (mut child, addr) = start(&[
        ("TORCHFN_REGISTRY", format!("s3://{bucket}/registry")),
        ("TORCHFN_MODEL_NAME", "classifier".into()),
        ("TORCHFN_POLL_SECONDS", "1".into()),
    ]);
    let addr = addr.expect("the function printed no address");
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let predict = || {
        let r = client
            .post(format!("{addr}/predictions/classifier"))
            .body(json!({"features": reference["seed_features"]}).to_string())
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "a request failed during the swap");
        r.json::<serde_json::Value>().unwrap()
    };
    assert_json_close(&predict(), &reference["classifier_single"], 1e-5, "v1");
    rt.block_on(publish_archive(
        &store,
        &bucket,
        "2.0",
        "v2/classifier.mar",
        None,
    ));
    // Requests keep flowing while the function notices the new default and swaps.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut served = 0;
    loop {
        let body = predict();
        served += 1;
        if json_close(&body, &reference["classifier_v2_single"], 1e-5) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never swapped after {served} requests"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_json_close(&predict(), &reference["classifier_v2_single"], 1e-5, "v2");
    let _ = child.kill();
    let _ = child.wait();
}
