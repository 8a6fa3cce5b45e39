//! The object store against a real S3-compatible server: moto's `moto_server` from the
//! project venv (`scripts/setup` installs it), started once for this test binary on a free
//! loopback port, and against local files.
//!
//! Run: `cargo test -p torchfn-store --test store`
//! (no libtorch needed). moto's log goes to `<target>/moto-server.log`.

#![allow(clippy::unwrap_used)]

use torchfn_test_support::{self as common, moto};

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::ChecksumAlgorithm;
use moto::env;
use sha2::{Digest, Sha256};
use torchfn_store::store::{DownloadOptions, Expect, Location, ObjectStore, StoreError};

/// A store from the test environment, with `bucket` created (valid S3 names only).
async fn store_with_bucket(bucket: &str) -> ObjectStore {
    env();
    let store = ObjectStore::from_env();
    moto::new_bucket(bucket).await;
    store
}

fn s3(bucket: &str, key: &str) -> Location {
    format!("s3://{bucket}/{key}").parse().unwrap()
}

/// Deterministic pseudo-random bytes (xorshift64*).
fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Files in `dir`, to show a failed download left nothing (not even a temporary file).
fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

async fn put_raw(store: &ObjectStore, bucket: &str, key: &str, bytes: Vec<u8>, sha256: bool) {
    let mut request = store
        .s3_client()
        .await
        .unwrap()
        .put_object()
        .bucket(bucket)
        .key(key)
        .body(ByteStream::from(bytes));
    if sha256 {
        request = request.checksum_algorithm(ChecksumAlgorithm::Sha256);
    }
    request.send().await.unwrap();
}

#[test]
fn location_parsing_and_display() {
    let loc: Location = "s3://models/classifier/1.0/model.mar".parse().unwrap();
    assert_eq!(
        loc,
        Location::S3 {
            bucket: "models".into(),
            key: "classifier/1.0/model.mar".into()
        }
    );
    assert_eq!(loc.to_string(), "s3://models/classifier/1.0/model.mar");
    assert!(loc.is_s3());

    let bucket: Location = "s3://models".parse().unwrap();
    assert_eq!(
        bucket,
        Location::S3 {
            bucket: "models".into(),
            key: String::new()
        }
    );
    assert_eq!(bucket.join("a/b.json").to_string(), "s3://models/a/b.json");
    let prefix: Location = "s3://models/registry/".parse().unwrap();
    assert_eq!(
        prefix.join("x.json").to_string(),
        "s3://models/registry/x.json"
    );
    assert_eq!(
        "s3://models/registry"
            .parse::<Location>()
            .unwrap()
            .join("/x.json")
            .to_string(),
        "s3://models/registry/x.json"
    );

    let file: Location = "file:///srv/models/a.mar".parse().unwrap();
    assert_eq!(file, Location::File("/srv/models/a.mar".into()));
    assert_eq!(file.to_string(), "file:///srv/models/a.mar");
    let plain: Location = "/srv/models/a.mar".parse().unwrap();
    assert_eq!(plain, file);
    let relative: Location = "model_store/a.mar".parse().unwrap();
    assert_eq!(relative, Location::File("model_store/a.mar".into()));
    assert_eq!(relative.to_string(), "model_store/a.mar");
    assert_eq!(
        Location::File("/srv".into()).join("models/a.mar"),
        Location::File("/srv/models/a.mar".into())
    );
    // Display and FromStr round-trip.
    for text in ["s3://b-1/k/x", "file:///a/b", "rel/path"] {
        assert_eq!(text.parse::<Location>().unwrap().to_string(), text);
    }

    for bad in [
        "",
        "s3://",
        "s3:///key",
        "gs://bucket/key",
        "file://relative/x",
    ] {
        let err = bad.parse::<Location>().unwrap_err();
        assert!(
            matches!(err, StoreError::InvalidLocation { .. }),
            "{bad}: {err}"
        );
        assert!(
            err.to_string().contains("s3://") || err.to_string().contains("file"),
            "{err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_put_get_head_list_delete_and_ranges() {
    let store = store_with_bucket("torchfn-basic").await;
    let a = s3("torchfn-basic", "registry/models/a.json");
    let b = s3("torchfn-basic", "registry/models/b.json");
    let other = s3("torchfn-basic", "other/c.json");

    let etag_a = store.put(&a, b"{\"v\":1}".to_vec()).await.unwrap();
    store.put(&b, b"0123456789".to_vec()).await.unwrap();
    store.put(&other, b"x".to_vec()).await.unwrap();

    let got = store.get(&a).await.unwrap();
    assert_eq!(got.bytes, b"{\"v\":1}");
    assert_eq!(got.etag, etag_a);

    let meta = store.head(&b).await.unwrap();
    assert_eq!(meta.size, 10);
    assert!(meta.etag.is_some());
    assert!(meta.last_modified.is_some());
    // `put` sends a SHA-256 checksum, so S3 reports it back.
    assert_eq!(
        meta.sha256.as_deref(),
        Some(sha256_hex(b"0123456789").as_str())
    );

    assert_eq!(store.get_range(&b, 2..5).await.unwrap(), b"234");
    assert_eq!(store.get_range(&b, 8..100).await.unwrap(), b"89");
    assert_eq!(store.get_range(&b, 20..30).await.unwrap(), b"");

    let listed = store.list(&s3("torchfn-basic", "registry/")).await.unwrap();
    let names: Vec<String> = listed.iter().map(|(l, _)| l.to_string()).collect();
    assert_eq!(
        names,
        [
            "s3://torchfn-basic/registry/models/a.json",
            "s3://torchfn-basic/registry/models/b.json"
        ]
    );
    assert_eq!(listed[1].1.size, 10);

    // Unchanged pointer: nothing to read; changed: the new bytes.
    assert!(store.get_if_changed(&a, &etag_a).await.unwrap().is_none());
    store.put(&a, b"{\"v\":2}".to_vec()).await.unwrap();
    let changed = store.get_if_changed(&a, &etag_a).await.unwrap().unwrap();
    assert_eq!(changed.bytes, b"{\"v\":2}");

    store.delete(&a).await.unwrap();
    assert!(store.head(&a).await.unwrap_err().is_not_found());
    // Deleting what is not there is fine, as on S3.
    store.delete(&a).await.unwrap();
    assert_eq!(store.list(&s3("torchfn-basic", "")).await.unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_parallel_download_is_byte_identical() {
    let store = store_with_bucket("torchfn-large").await;
    let bytes = data(40 * 1000 * 1000 + 12_345, 7);
    let want = sha256_hex(&bytes);
    put_raw(
        &store,
        "torchfn-large",
        "big/model.mar",
        bytes.clone(),
        false,
    )
    .await;

    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("nested/model.mar");
    let report = store
        .download(
            &s3("torchfn-large", "big/model.mar"),
            &dest,
            Expect {
                size: Some(bytes.len() as u64),
                sha256: Some(want.to_uppercase()),
            },
            DownloadOptions {
                part_size: 1 << 20,
                concurrency: 8,
            },
        )
        .await
        .unwrap();
    eprintln!(
        "40 MB from moto in {} parts of 1 MiB, 8 at a time: {:?} ({:.0} MB/s)",
        report.parts,
        report.elapsed,
        report.bytes as f64 / 1e6 / report.elapsed.as_secs_f64()
    );
    assert_eq!(report.bytes, bytes.len() as u64);
    assert_eq!(report.sha256, want);
    assert_eq!(report.parts, bytes.len().div_ceil(1 << 20));
    assert!(
        std::fs::read(&dest).unwrap() == bytes,
        "the download differs"
    );
    assert_eq!(files_in(dest.parent().unwrap()), ["model.mar"]);

    // Default options, no expectations: the same bytes.
    let again = dir.path().join("again.mar");
    let report = store
        .download(
            &s3("torchfn-large", "big/model.mar"),
            &again,
            Expect::default(),
            DownloadOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(report.sha256, want);
    assert_eq!(report.parts, 5);

    // An empty object downloads to an empty file.
    put_raw(&store, "torchfn-large", "empty", Vec::new(), false).await;
    let empty = dir.path().join("empty");
    let report = store
        .download(
            &s3("torchfn-large", "empty"),
            &empty,
            Expect {
                size: Some(0),
                sha256: Some(sha256_hex(b"")),
            },
            DownloadOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(report.bytes, 0);
    assert_eq!(std::fs::metadata(&empty).unwrap().len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_recorded_checksum_and_expectations_are_enforced() {
    let store = store_with_bucket("torchfn-checks").await;
    let bytes = data(3 * 1000 * 1000, 11);
    let want = sha256_hex(&bytes);
    put_raw(
        &store,
        "torchfn-checks",
        "v1/model.mar",
        bytes.clone(),
        true,
    )
    .await;
    let loc = s3("torchfn-checks", "v1/model.mar");

    let meta = store.head(&loc).await.unwrap();
    assert_eq!(meta.sha256.as_deref(), Some(want.as_str()));
    assert_eq!(meta.size, bytes.len() as u64);

    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("model.mar");
    let opts = DownloadOptions {
        part_size: 1 << 20,
        concurrency: 4,
    };

    let wrong = "0".repeat(64);
    let err = store
        .download(
            &loc,
            &dest,
            Expect {
                size: Some(bytes.len() as u64),
                sha256: Some(wrong.clone()),
            },
            opts,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::ChecksumMismatch { expected, actual, .. } if *expected == wrong && *actual == want),
        "{err}"
    );
    assert!(
        err.to_string().contains("s3://torchfn-checks/v1/model.mar"),
        "{err}"
    );
    assert!(!dest.exists());
    assert!(
        files_in(dir.path()).is_empty(),
        "{:?}",
        files_in(dir.path())
    );

    let err = store
        .download(
            &loc,
            &dest,
            Expect {
                size: Some(bytes.len() as u64 + 1),
                sha256: None,
            },
            opts,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Truncated { expected, actual, .. } if expected == bytes.len() as u64 + 1 && actual == bytes.len() as u64),
        "{err}"
    );
    assert!(
        files_in(dir.path()).is_empty(),
        "{:?}",
        files_in(dir.path())
    );

    let report = store
        .download(
            &loc,
            &dest,
            Expect {
                size: Some(bytes.len() as u64),
                sha256: Some(want.clone()),
            },
            opts,
        )
        .await
        .unwrap();
    assert_eq!(report.sha256, want);
    assert_eq!(files_in(dir.path()), ["model.mar"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_missing_objects_and_buckets_are_not_found() {
    let store = store_with_bucket("torchfn-missing").await;
    let loc = s3("torchfn-missing", "no/such/model.mar");
    for err in [
        store.head(&loc).await.unwrap_err(),
        store.get(&loc).await.unwrap_err(),
        store.get_range(&loc, 0..10).await.unwrap_err(),
        store
            .put_if_match(&loc, b"x".to_vec(), "\"etag\"")
            .await
            .unwrap_err(),
    ] {
        assert!(err.is_not_found(), "{err}");
        assert!(
            err.to_string()
                .contains("s3://torchfn-missing/no/such/model.mar"),
            "{err}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let err = store
        .download(
            &loc,
            &dir.path().join("m.mar"),
            Expect::default(),
            DownloadOptions::default(),
        )
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err}");
    assert!(files_in(dir.path()).is_empty());

    let no_bucket = s3("torchfn-no-such-bucket", "k");
    let err = store.get(&no_bucket).await.unwrap_err();
    assert!(err.is_not_found(), "{err}");
    assert!(err.to_string().contains("check the bucket"), "{err}");
    let err = store.list(&no_bucket).await.unwrap_err();
    assert!(err.is_not_found(), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_conditional_writes() {
    let store = store_with_bucket("torchfn-cas").await;
    let record = s3("torchfn-cas", "models/a/versions/1.json");
    let etag = store.put_if_absent(&record, b"one".to_vec()).await.unwrap();
    let err = store
        .put_if_absent(&record, b"two".to_vec())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::AlreadyExists { .. }), "{err}");
    assert_eq!(store.get(&record).await.unwrap().bytes, b"one");

    let pointer = s3("torchfn-cas", "models/a/default.json");
    let first = store.put_if_absent(&pointer, b"1".to_vec()).await.unwrap();
    let second = store
        .put_if_match(&pointer, b"2".to_vec(), &first)
        .await
        .unwrap();
    assert_ne!(first, second);
    let err = store
        .put_if_match(&pointer, b"3".to_vec(), &first)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::PreconditionFailed { .. }),
        "{err}"
    );
    assert_eq!(store.get(&pointer).await.unwrap().bytes, b"2");
    assert_ne!(etag, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_sixteen_creators_exactly_one_wins() {
    let store = store_with_bucket("torchfn-race").await;
    let loc = s3("torchfn-race", "models/a/versions/7.json");
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let store = store.clone();
            let loc = loc.clone();
            tokio::spawn(async move {
                (
                    i,
                    store
                        .put_if_absent(&loc, format!("writer {i}").into_bytes())
                        .await,
                )
            })
        })
        .collect();
    let mut winners = Vec::new();
    for task in tasks {
        let (i, outcome) = task.await.unwrap();
        match outcome {
            Ok(_) => winners.push(i),
            Err(StoreError::AlreadyExists { .. }) => {}
            Err(e) => panic!("writer {i}: {e}"),
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    assert_eq!(
        store.get(&loc).await.unwrap().bytes,
        format!("writer {}", winners[0]).into_bytes()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_compare_and_swap_loses_no_update() {
    let store = store_with_bucket("torchfn-counter").await;
    let loc = s3("torchfn-counter", "counter");
    counter_race(&store, &loc).await;
}

/// 16 writers each add 1 to a counter with read + `put_if_match`, retrying on
/// `PreconditionFailed`: the final count is 16 only if no update was lost.
async fn counter_race(store: &ObjectStore, loc: &Location) {
    store.put_if_absent(loc, b"0".to_vec()).await.unwrap();
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let store = store.clone();
            let loc = loc.clone();
            tokio::spawn(async move {
                loop {
                    let current = store.get(&loc).await.unwrap();
                    let n: u32 = String::from_utf8(current.bytes).unwrap().parse().unwrap();
                    match store
                        .put_if_match(&loc, (n + 1).to_string().into_bytes(), &current.etag)
                        .await
                    {
                        Ok(_) => return,
                        Err(StoreError::PreconditionFailed { .. }) => continue,
                        Err(e) => panic!("{e}"),
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(store.get(loc).await.unwrap().bytes, b"16");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_broken_body_streams_resume_where_they_stopped() {
    let env = env();
    let port: u16 = env.endpoint.rsplit(':').next().unwrap().parse().unwrap();
    let setup = store_with_bucket("torchfn-flaky").await;
    let bytes = data(8 << 20, 3);
    put_raw(&setup, "torchfn-flaky", "model.mar", bytes.clone(), true).await;

    // Four connections through the proxy are cut 300 kB into what the server sends them,
    // mid-way through a 1 MiB part.
    let proxy = FaultProxy::start(port, 4, 300_000);
    let store = ObjectStore::with_s3_endpoint(format!("http://127.0.0.1:{}", proxy.port));
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("model.mar");
    let report = store
        .download(
            &s3("torchfn-flaky", "model.mar"),
            &dest,
            Expect {
                size: Some(bytes.len() as u64),
                sha256: Some(sha256_hex(&bytes)),
            },
            DownloadOptions {
                part_size: 1 << 20,
                concurrency: 4,
            },
        )
        .await
        .unwrap();
    assert_eq!(report.bytes, bytes.len() as u64);
    assert!(
        std::fs::read(&dest).unwrap() == bytes,
        "the download differs"
    );
    assert_eq!(proxy.cuts.load(Ordering::SeqCst), 4);
    // Some request asked for the rest of a part only: a range not starting on a part boundary.
    let ranges = proxy.ranges.lock().unwrap().clone();
    let resumed: Vec<&String> = ranges
        .iter()
        .filter(|r| {
            let start: u64 = r.split('-').next().unwrap().parse().unwrap();
            !start.is_multiple_of(1 << 20)
        })
        .collect();
    assert!(
        !resumed.is_empty(),
        "no partial re-request among {ranges:?}"
    );
}

/// A loopback TCP proxy to moto that cuts `cut_first` connections, each once it has passed
/// `cut_after` bytes from the server, and records the `Range` of every request.
struct FaultProxy {
    port: u16,
    cuts: Arc<AtomicUsize>,
    ranges: Arc<Mutex<Vec<String>>>,
}

impl FaultProxy {
    fn start(upstream: u16, cut_first: usize, cut_after: usize) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cuts = Arc::new(AtomicUsize::new(0));
        let ranges = Arc::new(Mutex::new(Vec::new()));
        let (cuts2, ranges2) = (cuts.clone(), ranges.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let server = TcpStream::connect(("127.0.0.1", upstream)).unwrap();
                let (mut client_r, mut server_w) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                let ranges = ranges2.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match client_r.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let text = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
                        for line in text.lines() {
                            if let Some(range) = line.strip_prefix("range: bytes=") {
                                ranges.lock().unwrap().push(range.trim().to_string());
                            }
                        }
                        if server_w.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = server_w.shutdown(Shutdown::Write);
                });
                let (mut server_r, mut client_w) = (server, client);
                let cuts = cuts2.clone();
                std::thread::spawn(move || {
                    let mut sent = 0usize;
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match server_r.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        // Cut this connection once it passes `cut_after` bytes, while fewer
                        // than `cut_first` connections have been cut.
                        if sent + n > cut_after
                            && cuts
                                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| {
                                    (c < cut_first).then_some(c + 1)
                                })
                                .is_ok()
                        {
                            let _ = client_w.write_all(&buf[..cut_after.saturating_sub(sent)]);
                            let _ = client_w.shutdown(Shutdown::Both);
                            let _ = server_r.shutdown(Shutdown::Both);
                            return;
                        }
                        if client_w.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        sent += n;
                    }
                    let _ = client_w.shutdown(Shutdown::Write);
                });
            }
        });
        FaultProxy { port, cuts, ranges }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_instance_metadata_lookup() {
    let env = env();
    let store = store_with_bucket("torchfn-imds").await;
    let loc = s3("torchfn-imds", "a.json");
    store.put(&loc, b"{}".to_vec()).await.unwrap();
    store.head(&loc).await.unwrap();
    store.get(&loc).await.unwrap();
    store.list(&s3("torchfn-imds", "")).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    store
        .download(
            &loc,
            &dir.path().join("a.json"),
            Expect::default(),
            DownloadOptions::default(),
        )
        .await
        .unwrap();
    // A second store builds its own client from the environment again.
    ObjectStore::from_env().head(&loc).await.unwrap();
    assert_eq!(
        env.imds_connections.load(Ordering::SeqCst),
        0,
        "the SDK contacted the instance-metadata endpoint"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn files_put_get_head_list_delete_and_download() {
    let store = ObjectStore::from_env();
    let dir = tempfile::tempdir().unwrap();
    let root = Location::File(dir.path().to_path_buf());
    let a = root.join("registry/models/a.json");
    let b = root.join("registry/models/b.json");
    let other = root.join("other/c.json");

    let etag = store.put(&a, b"{\"v\":1}".to_vec()).await.unwrap();
    assert_eq!(etag, sha256_hex(b"{\"v\":1}"));
    store.put(&b, b"0123456789".to_vec()).await.unwrap();
    store.put(&other, b"x".to_vec()).await.unwrap();
    let got = store.get(&a).await.unwrap();
    assert_eq!(
        (got.bytes.as_slice(), got.etag.as_str()),
        (&b"{\"v\":1}"[..], etag.as_str())
    );
    assert_eq!(store.head(&b).await.unwrap().size, 10);
    assert_eq!(store.get_range(&b, 2..5).await.unwrap(), b"234");
    assert_eq!(store.get_range(&b, 8..100).await.unwrap(), b"89");
    assert_eq!(store.get_range(&b, 20..30).await.unwrap(), b"");

    let listed = store.list(&root.join("registry")).await.unwrap();
    assert_eq!(
        listed.iter().map(|(l, _)| l.clone()).collect::<Vec<_>>(),
        [a.clone(), b.clone()]
    );
    // A prefix that is not a directory filters names, as on S3.
    let listed = store.list(&root.join("registry/models/a")).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(store.list(&root).await.unwrap().len(), 3);

    assert!(store.get_if_changed(&a, &etag).await.unwrap().is_none());

    let dest = dir.path().join("out/copy.json");
    let report = store
        .download(
            &b,
            &dest,
            Expect {
                size: Some(10),
                sha256: Some(sha256_hex(b"0123456789")),
            },
            DownloadOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(report.bytes, 10);
    assert_eq!(std::fs::read(&dest).unwrap(), b"0123456789");
    let bad = dir.path().join("out/bad.json");
    let err = store
        .download(
            &b,
            &bad,
            Expect {
                size: None,
                sha256: Some("ab".repeat(32)),
            },
            DownloadOptions::default(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::ChecksumMismatch { .. }), "{err}");
    let err = store
        .download(
            &b,
            &bad,
            Expect {
                size: Some(11),
                sha256: None,
            },
            DownloadOptions::default(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Truncated { .. }), "{err}");
    assert_eq!(files_in(&dir.path().join("out")), ["copy.json"]);

    store.delete(&a).await.unwrap();
    store.delete(&a).await.unwrap();
    let err = store.get(&a).await.unwrap_err();
    assert!(err.is_not_found(), "{err}");
    assert!(err.to_string().contains(&a.to_string()), "{err}");
    let err = store
        .download(&a, &bad, Expect::default(), DownloadOptions::default())
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn files_conditional_writes_and_races() {
    let store = ObjectStore::from_env();
    let dir = tempfile::tempdir().unwrap();
    let root = Location::File(dir.path().to_path_buf());

    let record = root.join("models/a/versions/1.json");
    store.put_if_absent(&record, b"one".to_vec()).await.unwrap();
    let err = store
        .put_if_absent(&record, b"two".to_vec())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::AlreadyExists { .. }), "{err}");
    assert_eq!(store.get(&record).await.unwrap().bytes, b"one");

    let pointer = root.join("models/a/default.json");
    let first = store.put_if_absent(&pointer, b"1".to_vec()).await.unwrap();
    let second = store
        .put_if_match(&pointer, b"2".to_vec(), &first)
        .await
        .unwrap();
    let err = store
        .put_if_match(&pointer, b"3".to_vec(), &first)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::PreconditionFailed { .. }),
        "{err}"
    );
    assert_eq!(store.get(&pointer).await.unwrap().etag, second);
    let err = store
        .put_if_match(&root.join("models/none.json"), b"x".to_vec(), &first)
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err}");

    let raced = root.join("models/a/versions/7.json");
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let store = store.clone();
            let loc = raced.clone();
            tokio::spawn(async move {
                (
                    i,
                    store
                        .put_if_absent(&loc, format!("writer {i}").into_bytes())
                        .await,
                )
            })
        })
        .collect();
    let mut winners = Vec::new();
    for task in tasks {
        let (i, outcome) = task.await.unwrap();
        match outcome {
            Ok(_) => winners.push(i),
            Err(StoreError::AlreadyExists { .. }) => {}
            Err(e) => panic!("writer {i}: {e}"),
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    assert_eq!(
        store.get(&raced).await.unwrap().bytes,
        format!("writer {}", winners[0]).into_bytes()
    );

    counter_race(&store, &root.join("counter")).await;
    // No temporary or lock files show up as objects.
    let listed = store.list(&root).await.unwrap();
    assert_eq!(listed.len(), 4, "{listed:?}");
}

/// A model archive (zip) holding `weights` as its serialized file.
fn archive_with(weights: &[u8]) -> Vec<u8> {
    use zip::write::SimpleFileOptions;
    let manifest = r#"{"runtime": "python", "model": {"modelName": "big", "serializedFile": "model.pt", "handler": "base_handler", "modelVersion": "1.0"}, "archiverVersion": "0.12.0"}"#;
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    w.start_file("model.pt", options).unwrap();
    w.write_all(weights).unwrap();
    w.start_file("MAR-INF/MANIFEST.json", options).unwrap();
    w.write_all(manifest.as_bytes()).unwrap();
    w.finish().unwrap().into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_archives_unpack_while_they_download() {
    use torchfn_archive::mar::{self, Limits};
    let store = store_with_bucket("torchfn-streaming").await;
    let weights = data(3 << 20, 11);
    let archive = archive_with(&weights);
    put_raw(
        &store,
        "torchfn-streaming",
        "big.mar",
        archive.clone(),
        false,
    )
    .await;
    let from = s3("torchfn-streaming", "big.mar");
    // Many small parts: the unpacker's reads wait on parts landing out of order (the last
    // one first, where the zip's directory is).
    let opts = DownloadOptions {
        part_size: 64 << 10,
        concurrency: 4,
    };
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("models");
    let unpack = |root: std::path::PathBuf| {
        move |reopen: torchfn_store::store::Reopen| {
            mar::open_archive(Path::new("big.mar"), &*reopen, &root, &Limits::default())
        }
    };
    let (report, opened) = store
        .download_consuming(
            &from,
            &dir.path().join("big.mar"),
            Expect {
                size: Some(archive.len() as u64),
                sha256: Some(sha256_hex(&archive)),
            },
            opts,
            unpack(root.clone()),
        )
        .await
        .unwrap();
    assert_eq!(report.sha256, sha256_hex(&archive));
    assert!(report.parts > 40, "{report:?}");
    let opened = opened.unwrap();
    assert_eq!(opened.model_name(), "big");
    assert!(std::fs::read(opened.dir().join("model.pt")).unwrap() == weights);
    drop(opened);
    assert!(files_in(&root).is_empty(), "{:?}", files_in(&root));

    // A recorded checksum the bytes do not match: an error, and whatever the unpacker made
    // of the bytes is gone with it.
    let err = store
        .download_consuming(
            &from,
            &dir.path().join("bad.mar"),
            Expect {
                size: None,
                sha256: Some("0".repeat(64)),
            },
            opts,
            unpack(root.clone()),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::ChecksumMismatch { .. }), "{err}");
    assert!(files_in(&root).is_empty(), "{:?}", files_in(&root));
    assert!(!dir.path().join("bad.mar").exists());

    // A missing object: the error, at once, with the unpacker released.
    let started = std::time::Instant::now();
    let err = store
        .download_consuming(
            &s3("torchfn-streaming", "absent.mar"),
            &dir.path().join("absent.mar"),
            Expect::default(),
            opts,
            unpack(root.clone()),
        )
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
}

/// A loopback proxy to moto that answers the first `fail_first` requests itself with
/// `status` and an S3 error body (`code`), and passes everything else through.
struct StatusProxy {
    port: u16,
    faults: Arc<AtomicUsize>,
}

impl StatusProxy {
    fn start(upstream: u16, fail_first: usize, status: &'static str, code: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let faults = Arc::new(AtomicUsize::new(0));
        let faults2 = faults.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(mut client) = client else { return };
                let faults = faults2.clone();
                std::thread::spawn(move || {
                    let Some(head) = common::read_request_head(&mut client) else {
                        return;
                    };
                    let fail = faults
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| {
                            (c < fail_first).then_some(c + 1)
                        })
                        .is_ok();
                    if fail {
                        let body = format!(
                            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code>\
                             <Message>injected by the test</Message></Error>"
                        );
                        let _ = write!(
                            client,
                            "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = client.shutdown(Shutdown::Both);
                        return;
                    }
                    // Pass this connection through, the head already read included.
                    let mut server = TcpStream::connect(("127.0.0.1", upstream)).unwrap();
                    if server.write_all(&head).is_err() {
                        return;
                    }
                    let (mut client_r, mut server_w) =
                        (client.try_clone().unwrap(), server.try_clone().unwrap());
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut client_r, &mut server_w);
                        let _ = server_w.shutdown(Shutdown::Write);
                    });
                    let _ = std::io::copy(&mut server, &mut client);
                    let _ = client.shutdown(Shutdown::Write);
                });
            }
        });
        StatusProxy { port, faults }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_throttling_and_server_errors_are_retried_then_reported() {
    let env = env();
    let port: u16 = env.endpoint.rsplit(':').next().unwrap().parse().unwrap();
    let setup = store_with_bucket("torchfn-faults").await;
    let bytes = data(3 << 20, 5);
    put_raw(&setup, "torchfn-faults", "model.mar", bytes.clone(), true).await;
    let expect = || Expect {
        size: Some(bytes.len() as u64),
        sha256: Some(sha256_hex(&bytes)),
    };
    let options = DownloadOptions {
        part_size: 1 << 20,
        concurrency: 1,
    };

    // Two throttled answers (503 SlowDown): retried, and the download completes intact.
    let proxy = StatusProxy::start(port, 2, "503 Slow Down", "SlowDown");
    let store = ObjectStore::with_s3_endpoint(format!("http://127.0.0.1:{}", proxy.port));
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("model.mar");
    store
        .download(&s3("torchfn-faults", "model.mar"), &dest, expect(), options)
        .await
        .unwrap();
    assert_eq!(proxy.faults.load(Ordering::SeqCst), 2);
    assert!(
        std::fs::read(&dest).unwrap() == bytes,
        "the download differs"
    );

    // A server that only fails (500 InternalError): reported after the retries, within
    // bounded time, and nothing is left behind.
    let proxy = StatusProxy::start(
        port,
        usize::MAX,
        "500 Internal Server Error",
        "InternalError",
    );
    let store = ObjectStore::with_s3_endpoint(format!("http://127.0.0.1:{}", proxy.port));
    let dir = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let err = store
        .download(
            &s3("torchfn-faults", "model.mar"),
            &dir.path().join("model.mar"),
            expect(),
            options,
        )
        .await
        .unwrap_err();
    let text = format!("{err}");
    assert!(
        proxy.faults.load(Ordering::SeqCst) >= 2,
        "not retried: {text}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
    assert!(
        files_in(dir.path()).is_empty(),
        "{:?}",
        files_in(dir.path())
    );

    // No server at all: an error, not a hang.
    let closed = moto::free_port();
    let store = ObjectStore::with_s3_endpoint(format!("http://127.0.0.1:{closed}"));
    let started = std::time::Instant::now();
    let err = store
        .download(
            &s3("torchfn-faults", "model.mar"),
            &dir.path().join("model.mar"),
            expect(),
            options,
        )
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "{err}"
    );
    assert!(files_in(dir.path()).is_empty());
}
