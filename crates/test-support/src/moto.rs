//! A real S3 server for tests: `moto_server` from a small venv of its own (PyPI
//! `moto[server]`, installed by `scripts/setup --s3-server`; no torch), started once per test binary on a free loopback port, with
//! the AWS environment pointed at it and isolated from the user's own AWS configuration. It
//! runs under a wrapper that exits when its stdin closes, that is when the test process ends.
//! A counting listener stands in for the EC2 instance-metadata service, which nothing should
//! contact.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The moto server and the fake instance-metadata endpoint shared by every test here.
pub struct Env {
    pub endpoint: String,
    /// Connections accepted by the fake instance-metadata endpoint.
    pub imds_connections: Arc<AtomicUsize>,
    /// Kept so the server lives as long as the test binary; it also exits when our end of
    /// its stdin closes, which happens when this process ends (statics are never dropped).
    _moto: Mutex<Child>,
}

/// Starts moto and sets the AWS environment, once, before any store is built.
pub fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let imds_connections = Arc::new(AtomicUsize::new(0));
        let imds_port = start_counting_listener(imds_connections.clone());
        let (moto, port) = start_moto();
        let endpoint = format!("http://127.0.0.1:{port}");
        let nowhere = target_dir().join("no-such-aws-config");
        // Process-global, so set once here; these tests read the environment only after this.
        for (key, value) in [
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ENDPOINT_URL_S3", endpoint.as_str()),
            (
                "AWS_EC2_METADATA_SERVICE_ENDPOINT",
                &format!("http://127.0.0.1:{imds_port}"),
            ),
            ("AWS_CONFIG_FILE", nowhere.to_str().unwrap()),
            ("AWS_SHARED_CREDENTIALS_FILE", nowhere.to_str().unwrap()),
        ] {
            std::env::set_var(key, value);
        }
        for key in [
            "AWS_SESSION_TOKEN",
            "AWS_PROFILE",
            "AWS_DEFAULT_PROFILE",
            "AWS_ENDPOINT_URL",
            "AWS_EC2_METADATA_DISABLED",
            "AWS_MAX_ATTEMPTS",
            "AWS_RETRY_MODE",
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            "AWS_ROLE_ARN",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        ] {
            std::env::remove_var(key);
        }
        Env {
            endpoint,
            imds_connections,
            _moto: Mutex::new(moto),
        }
    })
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::repo_root().join("target"))
}

/// `<venv>/bin/moto_server`, as `scripts/setup` installs it.
fn moto_server() -> PathBuf {
    moto_venv().join("bin/moto_server")
}

/// The small venv holding only moto's S3 server (`scripts/setup --s3-server` makes it when
/// missing): the S3 tests need neither torch nor libtorch.
fn moto_venv() -> PathBuf {
    static VENV: OnceLock<PathBuf> = OnceLock::new();
    VENV.get_or_init(|| {
        let out = Command::new(crate::repo_root().join("scripts/setup"))
            .arg("--s3-server")
            .output()
            .expect("could not run scripts/setup --s3-server");
        assert!(
            out.status.success(),
            "scripts/setup --s3-server failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8(out.stdout).unwrap();
        PathBuf::from(
            stdout
                .lines()
                .last()
                .expect("scripts/setup --s3-server printed no venv path")
                .trim(),
        )
    })
    .clone()
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `moto_server` on a free port under a wrapper that exits when its stdin closes, and
/// waits until it accepts connections.
fn start_moto() -> (Child, u16) {
    let server = moto_server();
    assert!(
        server.exists(),
        "{} is missing: run scripts/setup",
        server.display()
    );
    std::fs::create_dir_all(target_dir()).unwrap();
    let log = std::fs::File::create(target_dir().join("moto-server.log")).unwrap();
    for _ in 0..5 {
        let port = free_port();
        let mut child = Command::new(moto_venv().join("bin/python"))
            .arg("-c")
            .arg(
                "import os, runpy, sys, threading\n\
                 threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()\n\
                 sys.argv = sys.argv[1:]\n\
                 runpy.run_path(sys.argv[0], run_name='__main__')",
            )
            .arg(&server)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::piped())
            .stdout(log.try_clone().unwrap())
            .stderr(log.try_clone().unwrap())
            .spawn()
            .expect("could not start moto_server");
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().unwrap() {
                // Most likely the port was taken between picking and binding: try another.
                eprintln!("moto_server exited with {status}; retrying on another port");
                break;
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return (child, port);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("moto_server did not start; see target/moto-server.log");
}

/// A loopback listener that counts the connections it accepts (standing in for the EC2
/// instance-metadata service, which nothing here should contact).
fn start_counting_listener(count: Arc<AtomicUsize>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let counter = count.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            counter.fetch_add(1, Ordering::SeqCst);
            drop(stream);
        }
    });
    // Prove the counter works before relying on a zero from it.
    drop(TcpStream::connect(("127.0.0.1", port)).unwrap());
    let deadline = Instant::now() + Duration::from_secs(5);
    while count.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the counting listener saw nothing"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    count.store(0, Ordering::SeqCst);
    port
}

/// Creates `bucket` on the server (valid S3 names only), with S3's `CreateBucket` (an
/// unsigned `PUT /{bucket}`, which moto takes).
pub async fn new_bucket(bucket: &str) {
    let url = format!("{}/{bucket}", env().endpoint);
    let response = reqwest::Client::new()
        .put(&url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("PUT {url}: {e}"));
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    assert!(status.is_success(), "PUT {url}: {status}: {text}");
}
