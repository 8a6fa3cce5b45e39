//! The registrar's event handling against a real S3 server (moto_server): archives uploaded
//! under the prefix become version records, re-delivery is harmless, another archive claiming
//! a version is refused, a removed archive marks its version removed; S3 events arrive
//! directly and wrapped in SQS messages, with URL-encoded keys. A zip64 archive is registered
//! from ranged reads, without its whole object being fetched.

#![allow(clippy::unwrap_used)]

use torchfn_test_support::{self as common, archive, moto};

use serde_json::{json, Value};
use sha2::Digest;
use torchfn_store::registrar::{handle, parse_events, Outcome, RegistrarConfig};
use torchfn_store::registry::{Registry, VersionStatus};
use torchfn_store::store::{Location, ObjectStore};

/// The S3 notification payload in tests/data, for `bucket` and `key` (URL-encoded as S3
/// sends it), created or removed.
fn s3_event(bucket: &str, encoded_key: &str, created: bool) -> Value {
    let text =
        std::fs::read_to_string(common::repo_root().join("tests/data/s3-object-created.json"))
            .unwrap();
    let mut event: Value = serde_json::from_str(&text).unwrap();
    let record = &mut event["Records"][0];
    record["s3"]["bucket"]["name"] = json!(bucket);
    record["s3"]["object"]["key"] = json!(encoded_key);
    if !created {
        record["eventName"] = json!("ObjectRemoved:Delete");
    }
    event
}

async fn deliver(
    registry: &Registry,
    store: &ObjectStore,
    payload: &Value,
) -> Vec<Result<Outcome, String>> {
    let config = RegistrarConfig {
        prefix: "archives/".into(),
        max_archive_bytes: 100 << 20,
    };
    let mut out = Vec::new();
    for event in parse_events(payload).unwrap() {
        out.push(
            handle(registry, store, &config, &event)
                .await
                .map_err(|e| e.to_string()),
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archives_become_versions() {
    moto::env();
    let store = ObjectStore::from_env();
    let bucket = format!("registrar-{}", std::process::id());
    moto::new_bucket(&bucket).await;
    let fx = common::small_fixtures();
    let upload = |key: &str, fixture: &str| {
        let store = store.clone();
        let at: Location = format!("s3://{bucket}/{key}").parse().unwrap();
        let bytes = std::fs::read(fx.join(fixture)).unwrap();
        async move { store.put(&at, bytes).await.unwrap() }
    };
    let registry = Registry::new(
        store.clone(),
        format!("s3://{bucket}/registry").parse().unwrap(),
    );

    // A zip MAR whose key has a space (S3 sends it as `+`).
    upload("archives/seed classifier.mar", "store/classifier.mar").await;
    let created = s3_event(&bucket, "archives/seed+classifier.mar", true);
    let got = deliver(&registry, &store, &created).await;
    assert_eq!(
        got,
        [Ok(Outcome::Registered {
            model: "classifier".into(),
            version: "1.0".into(),
            default: true
        })]
    );
    let record = registry.version("classifier", "1.0").await.unwrap();
    assert_eq!(
        record.source,
        format!("s3://{bucket}/archives/seed classifier.mar")
    );
    assert_eq!(record.handler.as_deref(), Some("handler.py"));
    assert_eq!(record.sha256.len(), 64);
    // The same event again, and wrapped in an SQS message: harmless.
    let sqs = json!({"Records": [{"messageId": "1", "body": created.to_string(), "eventSource": "aws:sqs"}]});
    for payload in [&created, &sqs] {
        assert_eq!(
            deliver(&registry, &store, payload).await,
            [Ok(Outcome::AlreadyRegistered {
                model: "classifier".into(),
                version: "1.0".into()
            })]
        );
    }
    // A tgz archive of the same model and version, with other bytes: refused, nothing
    // overwritten.
    upload(
        "archives/classifier.tar.gz",
        "formats/tgz/classifier.tar.gz",
    )
    .await;
    let got = deliver(
        &registry,
        &store,
        &s3_event(&bucket, "archives/classifier.tar.gz", true),
    )
    .await;
    assert!(matches!(&got[0], Ok(Outcome::Conflict { .. })), "{got:?}");
    assert_eq!(
        registry.version("classifier", "1.0").await.unwrap().sha256,
        record.sha256
    );
    // Version 2.0 becomes the default.
    upload("archives/classifier-2.0.mar", "v2/classifier.mar").await;
    let got = deliver(
        &registry,
        &store,
        &s3_event(&bucket, "archives/classifier-2.0.mar", true),
    )
    .await;
    assert_eq!(
        got,
        [Ok(Outcome::Registered {
            model: "classifier".into(),
            version: "2.0".into(),
            default: true
        })]
    );
    assert_eq!(
        registry
            .default_pointer("classifier")
            .await
            .unwrap()
            .unwrap()
            .0
            .version,
        "2.0"
    );
    // An eager archive is refused with the reason; keys outside the prefix are ignored.
    upload("archives/eager.mar", "eager/eager.mar").await;
    let got = deliver(
        &registry,
        &store,
        &s3_event(&bucket, "archives/eager.mar", true),
    )
    .await;
    assert!(got[0].as_ref().unwrap_err().contains("eager"), "{got:?}");
    let got = deliver(
        &registry,
        &store,
        &s3_event(&bucket, "elsewhere/x.mar", true),
    )
    .await;
    assert!(matches!(&got[0], Ok(Outcome::Ignored { .. })), "{got:?}");
    // Removing an archive marks its version removed.
    let got = deliver(
        &registry,
        &store,
        &s3_event(&bucket, "archives/classifier-2.0.mar", false),
    )
    .await;
    assert_eq!(
        got,
        [Ok(Outcome::Removed {
            model: "classifier".into(),
            version: "2.0".into()
        })]
    );
    assert_eq!(
        registry.version("classifier", "2.0").await.unwrap().status,
        VersionStatus::Removed
    );
    // 2.0 was the default: the pointer is back on 1.0, the highest version left.
    let default = |registry: Registry| async move {
        registry
            .default_pointer("classifier")
            .await
            .unwrap()
            .unwrap()
            .0
            .version
    };
    assert_eq!(default(registry.clone()).await, "1.0");

    // An upload whose archive is deleted before its event is handled: nothing to record,
    // and no error (which would only make S3 retry it).
    let got = deliver(
        &registry,
        &store,
        &s3_event(&bucket, "archives/gone-already.mar", true),
    )
    .await;
    assert!(
        matches!(&got[0], Ok(Outcome::Ignored { reason }) if reason.contains("deleted")),
        "{got:?}"
    );

    // Deleted while being recorded (after the registrar's first look, before its deletion
    // event could find a record): a proxy answers the archive's later HEADs with 404. The
    // version ends removed and the default stays on 1.0.
    let v3 = archive::with_version(&std::fs::read(fx.join("v2/classifier.mar")).unwrap(), "3.0");
    store
        .put(
            &format!("s3://{bucket}/archives/classifier-3.0.mar")
                .parse()
                .unwrap(),
            v3,
        )
        .await
        .unwrap();
    let proxy = Proxy::start(&moto::env().endpoint, Some("classifier-3.0.mar"));
    let watched = ObjectStore::with_s3_endpoint(proxy.endpoint.clone());
    let got = deliver(
        &registry,
        &watched,
        &s3_event(&bucket, "archives/classifier-3.0.mar", true),
    )
    .await;
    assert_eq!(
        got,
        [Ok(Outcome::Removed {
            model: "classifier".into(),
            version: "3.0".into()
        })]
    );
    assert!(proxy.heads.load(std::sync::atomic::Ordering::SeqCst) >= 2);
    assert_eq!(
        registry.version("classifier", "3.0").await.unwrap().status,
        VersionStatus::Removed
    );
    assert_eq!(default(registry.clone()).await, "1.0");
}

/// `mar` rewritten as an archiver writes a zip over 4 GiB: `padding` stored bytes first (as
/// `extra/padding.bin`), then its entries, every one with zip64 sizes; zip64 end records; and
/// the 32-bit end of central directory's counts, size and offset set to the zip64 markers, so
/// the zip64 records are the only place they are.
fn as_zip64(mar: &[u8], padding: usize) -> Vec<u8> {
    use std::io::{Read, Write};
    use zip::write::SimpleFileOptions;
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(mar)).unwrap();
    let mut out = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = SimpleFileOptions::default().large_file(true);
    out.start_file(
        "extra/padding.bin",
        opts.compression_method(zip::CompressionMethod::Stored),
    )
    .unwrap();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let noise: Vec<u8> = (0..padding)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    out.write_all(&noise).unwrap();
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).unwrap();
        let name = entry.name().to_string();
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).unwrap();
        out.start_file(name, opts).unwrap();
        out.write_all(&bytes).unwrap();
    }
    out.set_zip64_comment(Some(""));
    let mut bytes = out.finish().unwrap().into_inner();
    let eocd = (0..bytes.len() - 21)
        .rev()
        .find(|&i| bytes[i..i + 4] == [0x50, 0x4b, 0x05, 0x06])
        .unwrap();
    bytes[eocd + 8..eocd + 20].fill(0xff);
    // The zip64 end of central directory record and its locator sit before it.
    assert_eq!(bytes[eocd - 20..eocd - 16], [0x50, 0x4b, 0x06, 0x07]);
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zip64_archives_are_registered_from_ranged_reads() {
    moto::env();
    let store = ObjectStore::from_env();
    let bucket = format!("registrar-zip64-{}", std::process::id());
    moto::new_bucket(&bucket).await;
    let registry = Registry::new(
        store.clone(),
        format!("s3://{bucket}/registry").parse().unwrap(),
    );
    let fx = common::small_fixtures();
    let bytes = as_zip64(
        &std::fs::read(fx.join("store/classifier.mar")).unwrap(),
        4 << 20,
    );
    let key = "archives/classifier-zip64.mar";
    store
        .put(
            &format!("s3://{bucket}/{key}").parse().unwrap(),
            bytes.clone(),
        )
        .await
        .unwrap();
    // Through a proxy that counts what the registrar's GETs bring back.
    let proxy = Proxy::start(&moto::env().endpoint, None);
    let watched = ObjectStore::with_s3_endpoint(proxy.endpoint.clone());
    let got = deliver(&registry, &watched, &s3_event(&bucket, key, true)).await;
    assert_eq!(
        got,
        [Ok(Outcome::Registered {
            model: "classifier".into(),
            version: "1.0".into(),
            default: true
        })]
    );
    let record = registry.version("classifier", "1.0").await.unwrap();
    assert_eq!(record.source, format!("s3://{bucket}/{key}"));
    assert_eq!(record.size, bytes.len() as u64);
    let sha256: String = sha2::Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(record.sha256, sha256);
    assert_eq!(record.handler.as_deref(), Some("handler.py"));
    // The end of the archive and the manifest's entry, not the padding before them.
    let fetched = proxy.get_bytes.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        fetched > 0 && fetched < bytes.len() / 8,
        "{fetched} of {} bytes fetched",
        bytes.len()
    );

    // A stored (zip-store) archive of the same version is read too: another archive claiming
    // the version is a conflict.
    let store_key = "archives/classifier-stored.mar";
    store
        .put(
            &format!("s3://{bucket}/{store_key}").parse().unwrap(),
            std::fs::read(fx.join("formats/zip-store/classifier.mar")).unwrap(),
        )
        .await
        .unwrap();
    let got = deliver(&registry, &store, &s3_event(&bucket, store_key, true)).await;
    assert!(matches!(&got[0], Ok(Outcome::Conflict { .. })), "{got:?}");

    // A damaged zip is refused with the reason, not retried.
    let mut damaged = bytes.clone();
    let len = damaged.len();
    damaged[len - 22..].fill(0);
    let damaged_key = "archives/damaged.mar";
    store
        .put(
            &format!("s3://{bucket}/{damaged_key}").parse().unwrap(),
            damaged,
        )
        .await
        .unwrap();
    let got = deliver(&registry, &store, &s3_event(&bucket, damaged_key, true)).await;
    let err = got[0].as_ref().unwrap_err();
    assert!(err.contains("refused") && err.contains("zip"), "{err}");
}

/// A proxy in front of the S3 server that passes requests through, one per upstream
/// connection, counting the bytes of the answers to GETs. With `gone_suffix`, it answers every
/// HEAD of a key ending in it after the first with 404, as if the object had been deleted just
/// then.
struct Proxy {
    endpoint: String,
    heads: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    get_bytes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Proxy {
    fn start(upstream: &str, gone_suffix: Option<&'static str>) -> Self {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let upstream = upstream.trim_start_matches("http://").to_string();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let heads = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let get_bytes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (counted, counted_gets) = (heads.clone(), get_bytes.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(mut client) = client else { return };
                let (upstream, heads, gets) =
                    (upstream.clone(), counted.clone(), counted_gets.clone());
                std::thread::spawn(move || loop {
                    // One request head (the registrar's reads here carry no body).
                    let Some(head) = common::read_request_head(&mut client) else {
                        return;
                    };
                    let text = String::from_utf8_lossy(&head).to_string();
                    let request_line = text.lines().next().unwrap_or_default().to_string();
                    let path = request_line.split(' ').nth(1).unwrap_or_default();
                    let path = path.split('?').next().unwrap_or_default();
                    if request_line.starts_with("HEAD ")
                        && gone_suffix.is_some_and(|suffix| path.ends_with(suffix))
                        && heads.fetch_add(1, Ordering::SeqCst) >= 1
                    {
                        let _ = client
                            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
                        continue;
                    }
                    // Through to the server on a connection of its own, closed after the answer.
                    let mut forwarded: String = text
                        .trim_end_matches("\r\n")
                        .split("\r\n")
                        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
                        .map(|l| format!("{l}\r\n"))
                        .collect();
                    forwarded.push_str("Connection: close\r\n\r\n");
                    let Ok(mut server) = std::net::TcpStream::connect(&upstream) else {
                        return;
                    };
                    let mut answer = Vec::new();
                    if server.write_all(forwarded.as_bytes()).is_err()
                        || server.read_to_end(&mut answer).is_err()
                        || client.write_all(&answer).is_err()
                    {
                        return;
                    }
                    if request_line.starts_with("GET ") {
                        gets.fetch_add(answer.len(), Ordering::SeqCst);
                    }
                    // The server said `Connection: close`; so does this answer.
                    return;
                });
            }
        });
        Proxy {
            endpoint,
            heads,
            get_bytes,
        }
    }
}
