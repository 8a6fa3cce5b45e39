//! The same archives under TorchServe 0.12 itself and under `torchfn-local`, asked the same
//! requests: the answers must be equal (status, content type, body; error bodies as JSON).
//! TorchServe's frontend is Java: without a Java runtime this test says so on one line and
//! checks nothing (the Python-backend tests still compare against TorchServe's handlers run
//! by its Python package).

#![allow(clippy::unwrap_used)]

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use torchfn_test_support::server::Server;
use torchfn_test_support::{fixtures, handler_fixtures, path_str, reference, venv_python};

/// One request both servers get.
struct Case {
    label: &'static str,
    method: reqwest::Method,
    path: String,
    content_type: Option<&'static str>,
    body: Vec<u8>,
}

/// TorchServe, started in the foreground in its own folder; stopped when dropped.
struct TorchServe {
    child: Child,
    inference: String,
    _dir: tempfile::TempDir,
}

impl Drop for TorchServe {
    fn drop(&mut self) {
        // The launcher, its Java frontend and their Python workers: one process group.
        let _ = torchfn_test_support::signal::group(
            &self.child,
            torchfn_test_support::signal::Signal::KILL,
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether Java runs here (TorchServe's frontend needs Java 17); says the test is skipped
/// when it does not.
fn java_runs() -> bool {
    let runs = Command::new("java")
        .arg("-version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !runs {
        eprintln!(
            "torchserve_parity: skipped: no Java runtime (TorchServe's frontend needs Java 17)"
        );
    }
    runs
}

/// TorchServe on free loopback ports, serving `models` from `store`; `extra` is appended to
/// its config.properties.
fn start_torchserve(store: &Path, models: &str, extra: &str) -> TorchServe {
    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<u16> = (0..5).map(|_| free_port()).collect();
    let config = dir.path().join("config.properties");
    std::fs::write(
        &config,
        format!(
            "inference_address=http://127.0.0.1:{}\nmanagement_address=http://127.0.0.1:{}\n\
             metrics_address=http://127.0.0.1:{}\ngrpc_inference_port={}\n\
             grpc_management_port={}\ndefault_workers_per_model=1\n\
             disable_system_metrics=true\n{extra}",
            ports[0], ports[1], ports[2], ports[3], ports[4]
        ),
    )
    .unwrap();
    let bin = venv_python().parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let log = std::fs::File::create(dir.path().join("torchserve.log")).unwrap();
    let child = Command::new(bin.join("torchserve"))
        .current_dir(dir.path())
        .args(["--start", "--foreground", "--ncs", "--disable-token-auth"])
        .arg("--model-store")
        .arg(store)
        .args(["--models", models, "--ts-config"])
        .arg(&config)
        .env("PATH", path)
        // Its pid file (which refuses a second TorchServe) goes to the temporary folder.
        .env("TMPDIR", dir.path())
        .env_remove("TS_CONFIG_FILE")
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    TorchServe {
        child,
        inference: format!("http://127.0.0.1:{}", ports[0]),
        _dir: dir,
    }
}

/// Sends `case` to the server at `base`: (status, content type, body).
fn send(client: &reqwest::blocking::Client, base: &str, case: &Case) -> (u16, String, Vec<u8>) {
    let mut request = client
        .request(case.method.clone(), format!("{base}{}", case.path))
        .body(case.body.clone());
    if let Some(ct) = case.content_type {
        request = request.header("content-type", ct);
    }
    let r = request.send().unwrap();
    let status = r.status().as_u16();
    let content_type = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    (status, content_type, r.bytes().unwrap().to_vec())
}

/// Waits until every model answers 200 on TorchServe (its workers load after it listens),
/// within a generous bound.
fn wait_ready(client: &reqwest::blocking::Client, ts: &mut TorchServe, probes: &[&Case]) {
    let deadline = Instant::now() + Duration::from_secs(240);
    for probe in probes {
        loop {
            if let Some(status) = ts.child.try_wait().unwrap() {
                panic!(
                    "TorchServe exited ({status}) before it served {}",
                    probe.label
                );
            }
            let answered = client
                .request(
                    probe.method.clone(),
                    format!("{}{}", ts.inference, probe.path),
                )
                .header(
                    "content-type",
                    probe.content_type.unwrap_or("application/octet-stream"),
                )
                .body(probe.body.clone())
                .send()
                .is_ok_and(|r| r.status() == 200);
            if answered {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "TorchServe never served {}",
                probe.label
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

#[test]
fn torchserve_and_torchfn_answer_alike() {
    if !java_runs() {
        return;
    }
    let store = tempfile::tempdir().unwrap();
    let fx = fixtures();
    for (from, to) in [
        (fx.join("python/text.mar"), "text.mar"),
        (fx.join("python/mnist.mar"), "mnist.mar"),
        (fx.join("formats/default/classifier.mar"), "classifier.mar"),
        (
            handler_fixtures().join("store/text_vocab.mar"),
            "text_vocab.mar",
        ),
    ] {
        std::fs::copy(&from, store.path().join(to)).unwrap();
    }
    let models =
        "text=text.mar,mnist=mnist.mar,classifier=classifier.mar,text_vocab=text_vocab.mar";
    let seed = json!({"features": reference()["seed_features"]}).to_string();
    let digit = |k: usize| std::fs::read(fx.join(format!("python/digit{k}.png"))).unwrap();
    let case = |label, method, path: &str, content_type, body: Vec<u8>| Case {
        label,
        method,
        path: path.to_string(),
        content_type,
        body,
    };
    use reqwest::Method;
    let cases = [
        case(
            "text",
            Method::POST,
            "/predictions/text",
            Some("text/plain"),
            b"hello big wide world".to_vec(),
        ),
        case(
            "text, empty",
            Method::POST,
            "/predictions/text",
            Some("text/plain"),
            b"   ".to_vec(),
        ),
        case(
            "text, raising",
            Method::POST,
            "/predictions/text",
            Some("text/plain"),
            b"raise".to_vec(),
        ),
        case("mnist 0", Method::PUT, "/predictions/mnist", None, digit(0)),
        case(
            "mnist 0 explanation",
            Method::PUT,
            "/explanations/mnist",
            None,
            digit(0),
        ),
        case("mnist 1", Method::PUT, "/predictions/mnist", None, digit(1)),
        case(
            "guide classifier",
            Method::POST,
            "/predictions/classifier",
            Some("application/json"),
            seed.into_bytes(),
        ),
        // TorchServe's text_classifier with a torchtext-style vocabulary (source_vocab.pt):
        // a known word, and a pair of words (a bigram) the vocabulary lacks, which its
        // handler fails on.
        case(
            "torchtext vocabulary",
            Method::POST,
            "/predictions/text_vocab",
            Some("text/plain"),
            b"good".to_vec(),
        ),
        case(
            "torchtext vocabulary, unknown bigram",
            Method::POST,
            "/predictions/text_vocab",
            Some("text/plain"),
            b"good movie".to_vec(),
        ),
        case(
            "unknown model",
            Method::POST,
            "/predictions/nope",
            Some("text/plain"),
            b"x".to_vec(),
        ),
        case("ping", Method::GET, "/ping", None, Vec::new()),
    ];

    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let mut ts = start_torchserve(store.path(), models, "");
    let torchfn = Server::start(&[
        "--model-store",
        path_str(store.path()),
        "--models",
        models,
        "--ts-config",
        path_str(&fx.join("config.properties")),
    ])
    .wait_healthy();
    let probes: Vec<&Case> = [
        "text",
        "mnist 0",
        "guide classifier",
        "torchtext vocabulary",
    ]
    .iter()
    .map(|label| cases.iter().find(|c| c.label == *label).unwrap())
    .collect();
    wait_ready(&client, &mut ts, &probes);

    assert_alike(&client, &ts.inference, &torchfn.inference, &cases);
}

/// Sends every case to both servers and asserts the answers are alike: the same status; for
/// a handler's own non-JSON bytes (and the text fixture's), the same bytes and content type;
/// else the same JSON.
fn assert_alike(client: &reqwest::blocking::Client, ts: &str, torchfn: &str, cases: &[Case]) {
    for case in cases {
        let (ts_status, ts_type, ts_body) = send(client, ts, case);
        let (status, content_type, body) = send(client, torchfn, case);
        let show = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        assert_eq!(
            status,
            ts_status,
            "{}: torchfn {} vs TorchServe {}",
            case.label,
            show(&body),
            show(&ts_body)
        );
        let ts_json: Option<Value> = serde_json::from_slice(&ts_body).ok();
        let json: Option<Value> = serde_json::from_slice(&body).ok();
        if ts_status == 200 && (ts_json.is_none() || case.label == "text") {
            // The handler's own bytes, as it wrote them.
            assert_eq!(show(&body), show(&ts_body), "{}", case.label);
            assert_eq!(content_type, ts_type, "{}", case.label);
        } else {
            assert_eq!(
                json,
                ts_json,
                "{}: torchfn {} vs TorchServe {}",
                case.label,
                show(&body),
                show(&ts_body)
            );
        }
    }
}

/// KServe's explain routes under TorchServe's envelopes (`service_envelope=kserve`, then
/// `kservev2`): `/v1/models/{m}:explain` and `/v2/models/{m}/explain` reach a Python-backend
/// handler as an explanation request (the `explain` header TorchServe's frontend sets), and
/// its Captum answer comes back as TorchServe's; the predict routes alongside.
#[test]
fn kserve_explanations_answer_as_torchserve() {
    if !java_runs() {
        return;
    }
    use base64::Engine;
    use reqwest::Method;
    let store = tempfile::tempdir().unwrap();
    let fx = fixtures();
    std::fs::copy(fx.join("python/mnist.mar"), store.path().join("mnist.mar")).unwrap();
    let digit = std::fs::read(fx.join("python/digit1.png")).unwrap();
    let v1 = json!({"instances": [
        {"data": base64::engine::general_purpose::STANDARD.encode(&digit)}
    ]});
    let pixels: Vec<Vec<f64>> = (0..28)
        .map(|r| (0..28).map(|c| f64::from((r * 28 + c) % 9) / 8.0).collect())
        .collect();
    let v2 = json!({"id": "parity-1", "inputs": [
        {"name": "input-0", "shape": [1, 28, 28], "datatype": "FP32", "data": [pixels]}
    ]});
    let case = |label, path: &str, body: &Value| Case {
        label,
        method: Method::POST,
        path: path.to_string(),
        content_type: Some("application/json"),
        body: body.to_string().into_bytes(),
    };
    let rounds = [
        (
            "kserve",
            [
                case("v1 predict", "/v1/models/mnist:predict", &v1),
                case("v1 explain", "/v1/models/mnist:explain", &v1),
            ],
        ),
        (
            "kservev2",
            [
                case("v2 infer", "/v2/models/mnist/infer", &v2),
                case("v2 explain", "/v2/models/mnist/explain", &v2),
            ],
        ),
    ];
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    for (envelope, cases) in &rounds {
        let extra = format!("service_envelope={envelope}\n");
        let mut ts = start_torchserve(store.path(), "mnist=mnist.mar", &extra);
        let config = tempfile::tempdir().unwrap();
        let config_file = config.path().join("config.properties");
        std::fs::write(
            &config_file,
            format!(
                "inference_address=http://127.0.0.1:0\nmanagement_address=http://127.0.0.1:0\n\
                 metrics_address=http://127.0.0.1:0\ndefault_workers_per_model=1\n{extra}"
            ),
        )
        .unwrap();
        let torchfn = Server::start(&[
            "--model-store",
            path_str(store.path()),
            "--models",
            "mnist=mnist.mar",
            "--ts-config",
            path_str(&config_file),
        ])
        .wait_healthy();
        wait_ready(&client, &mut ts, &[&cases[0]]);
        assert_alike(&client, &ts.inference, &torchfn.inference, cases);
    }
}
