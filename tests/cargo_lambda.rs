//! The two functions as a developer runs them locally, under one real `cargo lambda watch`
//! started from the repository root with no package flags (cargo-lambda from PyPI, installed
//! by scripts/setup), with a real S3 server (moto_server):
//!
//! 1. the seed's archive is uploaded to the bucket under `archives/`;
//! 2. `cargo lambda invoke` hands `torchfn-registrar` the S3 notification for it: the version
//!    is recorded and becomes the default;
//! 3. `torchfn-model`, following that registry, serves it at cargo-lambda's Function URL
//!    emulation (`/lambda-url/torchfn-model/...`), and answers exactly as the emulator
//!    (`torchfn-local`) answers for the same archive: predictions, a batch, `/ping`, an
//!    unknown model.
//!
//! cargo-lambda builds each function itself when it is first invoked (`cargo run --bin
//! <function>`), in this target dir; the registrar, built so, links no libtorch.

#![allow(clippy::unwrap_used)]

use torchfn_test_support::{self as common, moto, server};

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{assert_json_close, cargo_tool, fixtures, reference, repo_root};
use serde_json::{json, Value};
use server::Server;
use torchfn_store::store::{Location, ObjectStore};

fn cargo_lambda() -> PathBuf {
    let bin = common::venv_python().parent().unwrap().join("cargo-lambda");
    assert!(
        bin.exists(),
        "{} is missing: run scripts/setup",
        bin.display()
    );
    bin
}

/// A `cargo lambda watch` of the whole workspace (every function of it), in a process group
/// of its own; it starts each function instance in a group of its own too.
struct Watch {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Watch {
    fn start(env: &[(&str, String)]) -> Watch {
        use std::os::unix::process::CommandExt;
        let log = moto::target_dir().join(format!("cargo-lambda-watch-{}.log", std::process::id()));
        let out = std::fs::File::create(&log).unwrap();
        let port = moto::free_port();
        let mut cmd = cargo_tool(cargo_lambda());
        cmd.args(["lambda", "watch", "--ignore-changes"])
            .args(["--invoke-address", "127.0.0.1", "--invoke-port"])
            .arg(port.to_string());
        for (key, value) in env {
            cmd.arg("--env-var").arg(format!("{key}={value}"));
        }
        let child = cmd
            .current_dir(repo_root())
            .env("RUST_LOG", "info")
            .env_remove("RUST_BACKTRACE")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .process_group(0)
            .spawn()
            .expect("could not start cargo lambda watch");
        let watch = Watch { child, port, log };
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "cargo lambda watch did not listen on {port}:\n{}",
                watch.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        watch
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn url(&self, function: &str, path: &str) -> String {
        format!("http://127.0.0.1:{}/lambda-url/{function}{path}", self.port)
    }
}

impl Watch {
    /// Stops the watch: SIGTERM to its group (cargo-lambda passes it on to each function's
    /// group, as Lambda's SHUTDOWN does), waits for cargo-lambda and the functions to end,
    /// then SIGKILL to whatever is left after 10 s. Returns the log.
    fn stop(&mut self) -> String {
        if let Ok(Some(_)) = self.child.try_wait() {
            return self.log();
        }
        let _ = common::signal::group(&self.child, common::signal::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // cargo-lambda passes the signal to each function's process group, but it may exit
        // before a function has finished its SHUTDOWN (it can fail to wait for the group):
        // wait for the functions' groups themselves.
        let groups = function_groups(&self.log());
        while Instant::now() < deadline && groups.iter().any(|&g| common::signal::group_running(g))
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = common::signal::group(&self.child, common::signal::Signal::KILL);
        for &g in &groups {
            let _ = common::signal::group_by_id(g, common::signal::Signal::KILL);
        }
        let _ = self.child.wait();
        self.log()
    }
}

/// The process groups cargo-lambda started function instances in, from its log lines
/// `process group spawned pgid=N`.
fn function_groups(log: &str) -> Vec<u32> {
    log.lines()
        .filter_map(|l| l.split("process group spawned pgid=").nth(1))
        .filter_map(|rest| {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect()
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `cargo lambda invoke <function> --data-file <event>` against a watch; its JSON answer.
fn invoke(watch: &Watch, function: &str, event: &Value) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("event.json");
    std::fs::write(&file, event.to_string()).unwrap();
    let mut child = Command::new(cargo_lambda())
        .args([
            "lambda",
            "invoke",
            function,
            "--invoke-address",
            "127.0.0.1",
        ])
        .arg("--invoke-port")
        .arg(watch.port.to_string())
        .arg("--data-file")
        .arg(&file)
        .args(["--output-format", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The first invocation builds the function; bounded all the same.
    let deadline = Instant::now() + Duration::from_secs(600);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("cargo lambda invoke did not finish:\n{}", watch.log());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "cargo lambda invoke failed: {stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        watch.log()
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("invoke answer is not JSON ({e}): {stdout}"))
}

/// The S3 notification S3 sends for `key` in `bucket` (the committed example event).
fn s3_event(bucket: &str, key: &str) -> Value {
    let text =
        std::fs::read_to_string(repo_root().join("tests/data/s3-object-created.json")).unwrap();
    let mut event: Value = serde_json::from_str(&text).unwrap();
    event["Records"][0]["s3"]["bucket"]["name"] = json!(bucket);
    event["Records"][0]["s3"]["object"]["key"] = json!(key);
    event
}

/// One request; its status and JSON body.
fn call(
    client: &reqwest::blocking::Client,
    method: reqwest::Method,
    url: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let mut request = client.request(method, url);
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_string());
    }
    let response = request.send().unwrap_or_else(|e| panic!("{url}: {e}"));
    let status = response.status().as_u16();
    let text = response.text().unwrap();
    let value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{url}: answer is not JSON ({e}): {text}"));
    (status, value)
}

#[test]
fn an_uploaded_archive_registers_and_serves_under_cargo_lambda_watch() {
    moto::env();
    let bucket = format!("cargo-lambda-{}", std::process::id());
    let archive = fixtures().join("store/classifier.mar");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = ObjectStore::from_env();
        moto::new_bucket(&bucket).await;
        let at: Location = format!("s3://{bucket}/archives/classifier.mar")
            .parse()
            .unwrap();
        store
            .put(&at, std::fs::read(&archive).unwrap())
            .await
            .unwrap();
    });
    let registry = format!("s3://{bucket}/registry");

    // One watch serves both functions; the model function's settings are the registrar's
    // plus its own (the registrar ignores them).
    let mut watch = Watch::start(&[
        ("TORCHFN_REGISTRY", registry),
        ("TORCHFN_MODEL_NAME", "classifier".into()),
        ("TORCHFN_HANDLER", "classifier".into()),
    ]);

    // The registrar, fed the upload's notification by `cargo lambda invoke`.
    let answer = invoke(
        &watch,
        "torchfn-registrar",
        &s3_event(&bucket, "archives/classifier.mar"),
    );
    assert_eq!(
        answer["outcomes"],
        json!([{"outcome": "registered", "model": "classifier", "version": "1.0", "default": true}]),
        "{answer}"
    );

    // The model function follows the registry's default: the version just registered.
    // The fixtures' config.properties: ports chosen by the OS, so a server already on 8080
    // (anyone's) cannot fail the test.
    let config = fixtures().join("config.properties");
    let emulator = Server::start(&[
        "--models",
        &format!("classifier={}", archive.display()),
        "--ts-config",
        common::path_str(&config),
        "--handler",
        "classifier=classifier",
    ])
    .wait_healthy();

    let reference = reference();
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()
        .unwrap();
    let single = json!({"features": reference["seed_features"]});
    let post = reqwest::Method::POST;
    let cases: [(&str, reqwest::Method, Option<&Value>); 5] = [
        ("/predictions/classifier", post.clone(), Some(&single)),
        (
            "/predictions/classifier",
            post.clone(),
            Some(&reference["seed_batch"]),
        ),
        ("/predictions/classifier/1.0", post.clone(), Some(&single)),
        ("/predictions/nope", post, Some(&single)),
        ("/ping", reqwest::Method::GET, None),
    ];
    for (path, method, body) in cases {
        // The first request starts the function (cargo-lambda builds and runs it lazily).
        let (status, got) = call(
            &client,
            method.clone(),
            &watch.url("torchfn-model", path),
            body,
        );
        let (want_status, want) = call(
            &client,
            method,
            &format!("{}{path}", emulator.inference),
            body,
        );
        assert_eq!(
            status,
            want_status,
            "{path}: {got} vs the emulator's {want}\n{}",
            watch.log()
        );
        assert_json_close(&got, &want, 1e-6, path);
    }
    // And both equal Python torch's answer for the guide's request.
    let (_, got) = call(
        &client,
        reqwest::Method::POST,
        &watch.url("torchfn-model", "/predictions/classifier"),
        Some(&single),
    );
    assert_json_close(&got, &reference["classifier_single"], 1e-5, "python");

    // cargo-lambda's Runtime API takes the function's shutdown extension, and stopping the
    // watch runs the function's SHUTDOWN (the unpacked model removed).
    let log = watch.stop();
    assert!(!log.contains("shutdown extension"), "{log}");
    let done = log
        .lines()
        .find(|l| l.contains("SHUTDOWN complete"))
        .unwrap_or_else(|| panic!("no SHUTDOWN in the function's log:\n{log}"));
    assert!(done.contains("removed_unpacked_models=true"), "{done}");
}
