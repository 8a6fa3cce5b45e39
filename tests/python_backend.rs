//! The Python backend through the real `torchfn-local`: archives made by the real
//! torch-model-archiver whose handlers no Rust built-in matches, served with TorchServe's own
//! flags only, by TorchServe's own worker (`ts/model_service_worker.py`).

#![allow(clippy::unwrap_used)]

use serde_json::{json, Value};
use torchfn_test_support::server::{sample, Server};
use torchfn_test_support::{fixtures, path_str, reference};

fn python_store() -> std::path::PathBuf {
    fixtures().join("python")
}

/// `torchfn-local --model-store <python fixtures> --models <models>` on ports the OS picks
/// (TorchServe's own flags; the config file only moves the ports).
fn start(models: &str, extra: &[&str]) -> Server {
    let mut args = vec!["--models", models];
    args.extend_from_slice(extra);
    start_in(&python_store(), &args)
}

/// `torchfn-local --model-store <store> <args>` on ports the OS picks.
fn start_in(store: &std::path::Path, extra: &[&str]) -> Server {
    static CONFIG: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    let config = CONFIG.get_or_init(|| {
        let path = std::env::temp_dir().join(format!(
            "torchfn-python-backend-{}.properties",
            std::process::id()
        ));
        std::fs::write(
            &path,
            "inference_address=http://127.0.0.1:0\nmanagement_address=http://127.0.0.1:0\n\
             metrics_address=http://127.0.0.1:0\n",
        )
        .unwrap();
        path
    });
    let mut args = vec![
        "--model-store",
        path_str(store),
        "--ts-config",
        path_str(config),
    ];
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// `torchfn-local --model-store <store>` with a config file of its own in `dir`: the ports
/// the OS picks, then `properties`.
fn start_with_properties(
    store: &std::path::Path,
    dir: &std::path::Path,
    properties: &str,
) -> Server {
    let config = dir.join("config.properties");
    std::fs::write(
        &config,
        format!(
            "inference_address=http://127.0.0.1:0\nmanagement_address=http://127.0.0.1:0\n\
             metrics_address=http://127.0.0.1:0\n{properties}"
        ),
    )
    .unwrap();
    Server::start(&[
        "--model-store",
        path_str(store),
        "--ts-config",
        path_str(&config),
    ])
}

/// A folder archive `<store>/<name>` made by the real torch-model-archiver, whose handler is
/// `handler_py`.
fn archive_handler(store: &std::path::Path, name: &str, handler_py: &str) {
    let src = tempfile::tempdir().unwrap();
    let handler = src.path().join(format!("{name}_handler.py"));
    std::fs::write(&handler, handler_py).unwrap();
    let archiver = torchfn_test_support::venv_python()
        .parent()
        .unwrap()
        .join("torch-model-archiver");
    let made = std::process::Command::new(&archiver)
        .args(["--model-name", name, "--version", "1.0", "--handler"])
        .arg(&handler)
        .arg("--export-path")
        .arg(store)
        .args(["--archive-format", "no-archive"])
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
}

fn post(
    server: &Server,
    path: &str,
    content_type: &str,
    body: Vec<u8>,
) -> reqwest::blocking::Response {
    server
        .client
        .post(format!("{}/predictions/{path}", server.inference))
        .header("content-type", content_type)
        .body(body)
        .send()
        .unwrap()
}

/// A handler of its own: text bodies in, its own JSON shape and header out (json.dumps with
/// indent=2, as TorchServe sends it), numpy imported, and its errors answered with its own
/// status (PredictionException) or TorchServe's 503.
#[test]
fn a_custom_python_handler_answers_as_under_torchserve() {
    let server = start("text=text.mar", &[]).wait_healthy();

    let r = post(
        &server,
        "text",
        "text/plain",
        b"hello big wide world".to_vec(),
    );
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-word-count"], "4");
    let text = r.text().unwrap();
    assert_eq!(
        text,
        "{\n  \"words\": 4,\n  \"mean_length\": 4.25,\n  \"longest\": \"hello\"\n}"
    );

    let r = post(&server, "text", "text/plain", b"   ".to_vec());
    assert_eq!(r.status(), 422);
    let body: Value = r.json().unwrap();
    assert_eq!(
        body,
        json!({"code": 422, "type": "InternalServerException", "message": "empty text: send some words"})
    );
    let r = post(&server, "text", "text/plain", b"raise".to_vec());
    assert_eq!(r.status(), 503);
    let body: Value = r.json().unwrap();
    assert_eq!(body["message"], "Prediction failed");
    // The server and the worker keep serving.
    let r = post(&server, "text", "text/plain", b"still here".to_vec());
    assert_eq!(r.status(), 200);

    // Describe names the handler; metrics count the requests.
    let (status, d) = server.get(format!("{}/models/text", server.management));
    assert_eq!(status, 200);
    assert_eq!(d[0]["handler"], "text_handler.py");
    assert_eq!(d[0]["workers"].as_array().unwrap().len(), 1);
    let metrics = server.metrics_text();
    let count = sample(
        &metrics,
        "ts_inference_requests_total",
        &[("model_name", "text"), ("model_version", "default")],
    );
    assert_eq!(count, 4.0, "{metrics}");
}

/// TorchServe's MNIST example: an eager-mode archive (model file and state_dict) whose
/// handler answers the argmax of an image, sent the way the guide sends images.
#[test]
fn the_mnist_example_answers_its_argmax() {
    let store = python_store();
    let server = start("mnist=mnist.mar", &[]).wait_healthy();
    let want = reference()["mnist_answers"].clone();
    for (k, want) in want.as_array().unwrap().iter().enumerate() {
        let image = std::fs::read(store.join(format!("digit{k}.png"))).unwrap();
        // `curl -T digit.png`: a PUT with the file as the body.
        let r = server
            .client
            .put(format!("{}/predictions/mnist", server.inference))
            .body(image.clone())
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        let got: Value = r.json().unwrap();
        assert_eq!(got, *want, "digit{k}");
        // `curl -F data=@digit.png`: a form field named data.
        let form = reqwest::blocking::multipart::Form::new().part(
            "data",
            reqwest::blocking::multipart::Part::bytes(image).file_name("digit.png"),
        );
        let r = server
            .client
            .post(format!("{}/predictions/mnist", server.inference))
            .multipart(form)
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        let got: Value = r.json().unwrap();
        assert_eq!(got, *want, "digit{k} as a form");
    }
}

/// Scaling a Python model down while requests arrive: every request is answered, none lost.
#[test]
fn scaling_down_during_traffic_loses_no_request() {
    let server = start("text=text.mar", &[]).wait_healthy();
    let scale = |n: usize| {
        let r = server
            .client
            .put(format!(
                "{}/models/text?min_worker={n}&synchronous=true",
                server.management
            ))
            .send()
            .unwrap();
        assert!(r.status().is_success(), "{}", r.text().unwrap());
    };
    scale(2);
    let answered = std::thread::scope(|s| {
        let senders: Vec<_> = (0..4)
            .map(|t| {
                let server = &server;
                s.spawn(move || {
                    (0..10)
                        .map(|i| {
                            let r = post(
                                server,
                                "text",
                                "text/plain",
                                format!("word{t} n{i}").into_bytes(),
                            );
                            r.status().as_u16()
                        })
                        .collect::<Vec<u16>>()
                })
            })
            .collect();
        scale(1);
        senders
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect::<Vec<u16>>()
    });
    assert_eq!(answered.len(), 40);
    assert!(answered.iter().all(|&s| s == 200), "{answered:?}");
    let (_, d) = server.get(format!("{}/models/text", server.management));
    assert_eq!(d[0]["workers"].as_array().unwrap().len(), 1);
    // The worker left still answers.
    assert_eq!(
        post(&server, "text", "text/plain", b"one more".to_vec()).status(),
        200
    );
}

/// Without the `ts` package the model is not served and the log says what to install.
#[test]
fn a_python_without_torchserve_is_named_with_the_fix() {
    let venv = tempfile::tempdir().unwrap();
    let made = std::process::Command::new("python3")
        .args(["-m", "venv", "--without-pip"])
        .arg(venv.path())
        .status()
        .unwrap();
    assert!(made.success());
    let python = venv.path().join("bin/python");
    let server = start("text=text.mar", &["--python", path_str(&python)]);
    let log = server.wait_log("start-up models loaded");
    let (status, ping) = server.get(format!("{}/ping", server.inference));
    assert_eq!((status, ping), (500, json!({"status": "Unhealthy"})));
    assert!(
        log.contains("cannot import TorchServe's Python package"),
        "{log}"
    );
    assert!(log.contains("pip install torchserve"), "{log}");
}

/// TorchServe's registration semantics, with its defaults (no `default_workers_per_model`):
/// a registration starts 0 workers and so answers 200 even asynchronously; an unknown handler
/// registers and fails when its workers start (500); workers that cannot start within
/// `startup_timeout` fail the registration (500).
#[test]
fn registrations_follow_torchserve() {
    let server = start("text=text.mar", &[]).wait_healthy();
    let call = |method: reqwest::Method, path: &str| {
        let r = server
            .client
            .request(method, format!("{}{path}", server.management))
            .send()
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json::<Value>().unwrap())
    };
    let (status, body) = call(reqwest::Method::POST, "/models?url=text.mar&model_name=t2");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["status"],
        "Model \"t2\" Version: 1.0 registered with 0 initial workers. Use scale workers API to add workers for the model."
    );
    let (status, body) = call(
        reqwest::Method::POST,
        "/models?url=text.mar&model_name=t3&synchronous=false",
    );
    assert_eq!(status, 200, "{body}");
    // 0 workers: predictions are refused until it is scaled up.
    let r = post(&server, "t3", "text/plain", b"a b".to_vec());
    assert_eq!(r.status(), 503);
    let (status, body) = call(
        reqwest::Method::PUT,
        "/models/t3?min_worker=1&synchronous=true",
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        post(&server, "t3", "text/plain", b"a b".to_vec()).status(),
        200
    );

    let (status, body) = call(
        reqwest::Method::POST,
        "/models?url=text.mar&model_name=bad&handler=invalidHandler",
    );
    assert_eq!(status, 200, "{body}");
    let (status, body) = call(
        reqwest::Method::PUT,
        "/models/bad?min_worker=1&synchronous=true",
    );
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["type"], "InternalServerException");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.starts_with("Failed to start workers for model bad version: 1.0"),
        "{message}"
    );
    assert!(message.contains("invalidHandler"), "{message}");

    let (status, body) = call(
        reqwest::Method::POST,
        "/models?url=text.mar&model_name=late&initial_workers=3&startup_timeout=0",
    );
    assert_eq!(status, 500, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("Failed to start workers for model late"),
        "{body}"
    );
    let (status, _) = call(reqwest::Method::GET, "/models/late");
    assert_eq!(status, 404);
}

/// A handler that loads in at most two worker processes of a model: each takes one of two
/// lock files in the model's folder, and one that finds both taken fails its `initialize`.
const TWO_WORKERS_PY: &str = r#"
import os


class TwoWorkers:
    def initialize(self, context):
        folder = context.system_properties["model_dir"]
        for slot in range(2):
            try:
                self.fd = os.open(os.path.join(folder, "worker.%d" % slot), os.O_CREAT | os.O_EXCL)
                return
            except FileExistsError:
                pass
        raise RuntimeError("two workers already run in " + folder)

    def handle(self, data, context):
        return [os.getpid() for _ in data]
"#;

/// TorchServe's worker-start answers: when only some of the workers asked for start, the
/// model runs with those and the answer is 206 "Workers scaling in progress...", at
/// registration and at scaling; when none of them starts it is 500 and the model keeps the
/// workers it had.
#[test]
fn workers_that_start_partly_are_answered_206() {
    let store = tempfile::tempdir().unwrap();
    for name in ["a", "b"] {
        archive_handler(store.path(), name, TWO_WORKERS_PY);
    }

    let server = start_in(store.path(), &[]).wait_healthy();
    let call = |method: reqwest::Method, path: &str| {
        let r = server
            .client
            .request(method, format!("{}{path}", server.management))
            .send()
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json::<Value>().unwrap())
    };
    let workers = |model: &str| {
        let (_, described) = call(reqwest::Method::GET, &format!("/models/{model}"));
        described[0]["workers"].as_array().unwrap().len()
    };
    let (status, body) = call(
        reqwest::Method::POST,
        "/models?url=a&initial_workers=3&synchronous=true",
    );
    assert_eq!(status, 206, "{body}");
    assert_eq!(body["status"], "Workers scaling in progress...");
    assert_eq!(workers("a"), 2);
    assert_eq!(
        post(&server, "a", "text/plain", b"x".to_vec()).status(),
        200
    );

    let (status, body) = call(
        reqwest::Method::POST,
        "/models?url=b&initial_workers=1&synchronous=true",
    );
    assert_eq!(status, 200, "{body}");
    let (status, body) = call(
        reqwest::Method::PUT,
        "/models/b?min_worker=3&synchronous=true",
    );
    assert_eq!(status, 206, "{body}");
    assert_eq!(body["status"], "Workers scaling in progress...");
    assert_eq!(workers("b"), 2);
    let (status, body) = call(
        reqwest::Method::PUT,
        "/models/b?min_worker=4&synchronous=true",
    );
    assert_eq!(status, 500, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("Failed to start workers for model b version: 1.0"),
        "{body}"
    );
    assert_eq!(workers("b"), 2);
    assert_eq!(
        post(&server, "b", "text/plain", b"x".to_vec()).status(),
        200
    );
}

/// A handler with metrics of its own, through TorchServe's metrics API
/// (`context.metrics.add_metric_to_cache`).
const COUNTING_PY: &str = r#"
from ts.metrics.metric_type_enum import MetricTypes


class Counting:
    def initialize(self, context):
        cache = context.metrics
        self.requests = cache.add_metric_to_cache(
            "TextRequests", "count", ["ModelName", "Source"], MetricTypes.COUNTER
        )
        self.sizes = cache.add_metric_to_cache(
            "BodyBytes", "B", ["ModelName"], MetricTypes.HISTOGRAM
        )
        self.undeclared = cache.add_metric_to_cache(
            "Undeclared", "count", ["ModelName"], MetricTypes.GAUGE
        )

    def handle(self, data, context):
        sizes = []
        for row in data:
            body = row.get("body") or row.get("data") or b""
            self.requests.add_or_update(1, [context.model_name, "test"])
            self.sizes.add_or_update(len(body), [context.model_name])
            self.undeclared.add_or_update(7, [context.model_name])
            sizes.append(len(body))
        return sizes
"#;

/// The samples of one family in a /metrics text.
fn samples<'a>(text: &'a str, family: &str) -> Vec<&'a str> {
    text.lines()
        .filter(|l| {
            l.strip_prefix(family)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with('_'))
        })
        .collect()
}

/// A handler's own metrics reach /metrics as under TorchServe in Prometheus mode: those the
/// `metrics_config` file declares (a counter adds, a histogram observes, labels in declared
/// order then Hostname), undeclared ones dropped unless `model_metrics_auto_detect=true`,
/// and TorchServe's default declarations (`PredictionTime`, `HandlerTime`) when no file is
/// named.
#[test]
fn a_handler_s_own_metrics_reach_the_metrics_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    std::fs::create_dir(&store).unwrap();
    archive_handler(&store, "counting", COUNTING_PY);
    let metrics_yaml = dir.path().join("metrics.yaml");
    std::fs::write(
        &metrics_yaml,
        "dimensions:\n  - &model_name \"ModelName\"\nmodel_metrics:\n  counter:\n    - name: TextRequests\n      unit: count\n      dimensions: [*model_name, Source]\n  histogram:\n    - name: BodyBytes\n      unit: B\n      dimensions: [*model_name]\n",
    )
    .unwrap();

    let scrape = |server: &Server| {
        server
            .client
            .get(format!("{}/metrics", server.metrics))
            .send()
            .unwrap()
            .text()
            .unwrap()
    };
    let register = |server: &Server| {
        let r = server
            .client
            .post(format!(
                "{}/models?url=counting&initial_workers=1&synchronous=true",
                server.management
            ))
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        for body in ["ab", "abcd"] {
            let r = post(server, "counting", "text/plain", body.as_bytes().to_vec());
            assert_eq!(r.status(), 200);
        }
    };

    let server = start_with_properties(
        &store,
        dir.path(),
        &format!("metrics_config={}\n", metrics_yaml.display()),
    )
    .wait_healthy();
    register(&server);
    // The lines arrive on the worker's output after its answer: wait for the second.
    let host = hostname_of(&scrape(&server));
    let counted =
        format!("TextRequests{{ModelName=\"counting\",Source=\"test\",Hostname=\"{host}\",}} 2.0");
    let text = wait_for_metrics(&server, &scrape, &counted);
    assert!(
        text.contains("# HELP TextRequests Torchserve prometheus counter metric with unit: count"),
        "{text}"
    );
    assert!(text.contains("# TYPE BodyBytes histogram"), "{text}");
    assert!(
        text.contains(&format!(
            "BodyBytes_count{{ModelName=\"counting\",Hostname=\"{host}\",}} 2.0"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "BodyBytes_sum{{ModelName=\"counting\",Hostname=\"{host}\",}} 6.0"
        )),
        "{text}"
    );
    assert!(samples(&text, "Undeclared").is_empty(), "{text}");
    assert!(!text.contains("PredictionTime"), "{text}");
    drop(server);

    let server = start_with_properties(&store, dir.path(), "model_metrics_auto_detect=true\n")
        .wait_healthy();
    register(&server);
    let undeclared = format!("Undeclared{{ModelName=\"counting\",Hostname=\"{host}\",}} 7.0");
    let text = wait_for_metrics(&server, &scrape, &undeclared);
    assert!(text.contains("# TYPE PredictionTime gauge"), "{text}");
    let predicted = samples(&text, "PredictionTime");
    assert_eq!(predicted.len(), 1, "{text}");
    assert!(
        predicted[0].starts_with(&format!(
            "PredictionTime{{ModelName=\"counting\",Level=\"Model\",Hostname=\"{host}\",}} "
        )),
        "{text}"
    );
}

/// The Hostname label torchfn writes (`Requests2XX{Level="Host",Hostname="…",}`).
fn hostname_of(text: &str) -> String {
    let line = text
        .lines()
        .find(|l| l.starts_with("Requests2XX{"))
        .unwrap_or_else(|| panic!("{text}"));
    line.split("Hostname=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_string()
}

/// Scrapes until `line` is there (the worker writes its metrics after its answer), within a
/// generous bound.
fn wait_for_metrics(server: &Server, scrape: &dyn Fn(&Server) -> String, line: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let text = scrape(server);
        if text.contains(line) || std::time::Instant::now() > deadline {
            assert!(text.contains(line), "no {line} in\n{text}");
            return text;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
