//! `torchfn-registrar` as a Lambda function, under a Runtime API served by the test, with a
//! real S3 server (moto_server): an uploaded archive's S3 notification registers its version;
//! the same notification re-delivered through SQS changes nothing. The binary is built
//! without libtorch (it would not start here otherwise: it has no rpath to libtorch).

#![allow(clippy::unwrap_used)]

use torchfn_test_support::{self as common, moto, runtime_api};

use std::process::{Child, Command, Stdio};

use serde_json::{json, Value};
use torchfn_store::registry::Registry;
use torchfn_store::store::{Location, ObjectStore};

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn s3_event(bucket: &str, key: &str) -> Value {
    let text =
        std::fs::read_to_string(common::repo_root().join("tests/data/s3-object-created.json"))
            .unwrap();
    let mut event: Value = serde_json::from_str(&text).unwrap();
    event["Records"][0]["s3"]["bucket"]["name"] = json!(bucket);
    event["Records"][0]["s3"]["object"]["key"] = json!(key);
    event
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_notification_registers_its_version() {
    moto::env();
    let store = ObjectStore::from_env();
    let bucket = format!("registrar-fn-{}", std::process::id());
    moto::new_bucket(&bucket).await;
    let archive = std::fs::read(common::fixtures().join("store/classifier.mar")).unwrap();
    let at: Location = format!("s3://{bucket}/archives/classifier.mar")
        .parse()
        .unwrap();
    store.put(&at, archive).await.unwrap();

    let (api, tx, addr) = runtime_api::start().await;
    let child = Command::new(env!("CARGO_BIN_EXE_torchfn-registrar"))
        .env("AWS_LAMBDA_RUNTIME_API", addr.to_string())
        .env("AWS_LAMBDA_FUNCTION_NAME", "registrar")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "512")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "1")
        .env("TORCHFN_REGISTRY", format!("s3://{bucket}/registry"))
        // Blank settings count as unset: the default prefix and size limit.
        .env("TORCHFN_ARCHIVE_PREFIX", "")
        .env("TORCHFN_MAX_ARCHIVE_BYTES", " ")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let _child = Kill(child);

    let event = s3_event(&bucket, "archives/classifier.mar");
    let answer = runtime_api::invoke(&api, &tx, "created", event.clone(), 60).await;
    assert_eq!(
        answer["outcomes"],
        json!([{"outcome": "registered", "model": "classifier", "version": "1.0", "default": true}]),
        "{answer}"
    );
    let registry = Registry::new(
        store.clone(),
        format!("s3://{bucket}/registry").parse().unwrap(),
    );
    let record = registry.version("classifier", "1.0").await.unwrap();
    assert_eq!(record.source, at.to_string());
    let (pointer, _) = registry
        .default_pointer("classifier")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(pointer.version, "1.0");

    let sqs = json!({"Records": [{"messageId": "m1", "eventSource": "aws:sqs", "body": event.to_string()}]});
    let answer = runtime_api::invoke(&api, &tx, "again", sqs, 60).await;
    assert_eq!(
        answer["outcomes"],
        json!([{"outcome": "already_registered", "model": "classifier", "version": "1.0"}]),
        "{answer}"
    );
    assert!(api.init_errors.lock().unwrap().is_empty());
}

/// `--help` lists the settings with their environment variables; a setting that does not
/// parse fails the start, naming it.
#[test]
fn help_lists_the_settings_and_a_bad_one_fails_the_start() {
    common::assert_help_lists(
        env!("CARGO_BIN_EXE_torchfn-registrar"),
        &[
            "TORCHFN_REGISTRY",
            "TORCHFN_ARCHIVE_PREFIX",
            "TORCHFN_MAX_ARCHIVE_BYTES",
        ],
    );
    let bad = Command::new(env!("CARGO_BIN_EXE_torchfn-registrar"))
        .env_remove("AWS_LAMBDA_RUNTIME_API")
        .env("TORCHFN_REGISTRY", "s3://bucket/registry")
        .env("TORCHFN_MAX_ARCHIVE_BYTES", "lots")
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let log = String::from_utf8_lossy(&bad.stderr);
    assert!(log.contains("lots"), "{log}");
}

/// The registrar binary links no libtorch, even when built with the whole workspace (this
/// test binary is: `cargo test --workspace` builds every package together).
#[test]
fn the_registrar_links_no_libtorch() {
    let bin = env!("CARGO_BIN_EXE_torchfn-registrar");
    let ldd = Command::new("ldd").arg(bin).output().unwrap();
    let libraries = String::from_utf8_lossy(&ldd.stdout);
    assert!(ldd.status.success(), "ldd {bin} failed: {libraries}");
    for torch in ["libtorch", "libc10"] {
        assert!(
            !libraries.contains(torch),
            "{bin} links {torch}:\n{libraries}"
        );
    }
    // What it does link: the C library, and nothing of CUDA either.
    assert!(libraries.contains("libc.so"), "{libraries}");
    assert!(!libraries.contains("libcuda"), "{libraries}");
}
