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
    let store = python_store();
    let mut args = vec![
        "--model-store",
        path_str(&store),
        "--models",
        models,
        "--ts-config",
        path_str(config),
    ];
    args.extend_from_slice(extra);
    Server::start(&args)
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
