//! The management API over real HTTP against `torchfn-local`: the seed guide's commands as
//! written, every endpoint's errors with TorchServe's statuses and messages, several versions
//! of one model, changes under prediction load (nothing lost, no answer from the wrong
//! version), and who may change models (token, model API switch).

#![allow(clippy::unwrap_used)]

use torchfn_test_support::{self as common, archive, path_str, server};

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{assert_json_close, fixtures, json_close, reference};
use reqwest::blocking::Client;
use serde_json::{json, Value};
use server::Server;

/// The seed guide's server: its config.properties, the store, classifier.mar at start.
fn seed_server(extra: &[&str]) -> Server {
    let fx = fixtures();
    let (store, config) = (fx.join("store"), fx.join("config.properties"));
    let mut args = vec![
        "--model-store",
        path_str(&store),
        "--models",
        "classifier=classifier.mar",
        "--ts-config",
        path_str(&config),
        "--handler",
        "classifier=classifier",
    ];
    args.extend_from_slice(extra);
    Server::start(&args).wait_healthy()
}

/// A request to the management API: status and JSON body.
fn call(server: &Server, method: reqwest::Method, path: &str) -> (u16, Value) {
    call_with(
        &server.client,
        method,
        &format!("{}{path}", server.management),
        None,
    )
}

fn call_with(
    client: &Client,
    method: reqwest::Method,
    url: &str,
    token: Option<&str>,
) -> (u16, Value) {
    let mut req = client.request(method, url);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let r = req.send().unwrap();
    let status = r.status().as_u16();
    let text = r.text().unwrap();
    let value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{url}: not JSON ({e}): {text}"));
    (status, value)
}

fn assert_error(got: (u16, Value), code: u16, kind: &str, message: &str) {
    let (status, body) = got;
    assert_eq!(status, code, "{body}");
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["type"], kind, "{body}");
    let text = body["message"].as_str().unwrap();
    assert!(text.contains(message), "{text:?} lacks {message:?}");
}

fn status_text(got: (u16, Value), code: u16) -> String {
    assert_eq!(got.0, code, "{}", got.1);
    got.1["status"].as_str().unwrap().to_string()
}

use reqwest::Method;

#[test]
fn the_seed_guides_management_commands_work_as_written() {
    let reference = reference();
    let server = seed_server(&[]);
    let single = json!({"features": reference["seed_features"]}).to_string();

    // curl http://localhost:8081/models
    let (code, list) = call(&server, Method::GET, "/models");
    assert_eq!(code, 200);
    assert_eq!(
        list,
        json!({"models": [{"modelName": "classifier", "modelUrl": "classifier.mar"}]})
    );
    // curl http://localhost:8081/models/classifier
    let (code, described) = call(&server, Method::GET, "/models/classifier");
    assert_eq!(code, 200);
    assert_eq!(described[0]["modelName"], "classifier");
    assert_eq!(described[0]["workers"].as_array().unwrap().len(), 1);

    // curl -X POST "http://localhost:8081/models?url=classifier.mar&model_name=classifier_v2"
    let text = status_text(
        call(
            &server,
            Method::POST,
            "/models?url=classifier.mar&model_name=classifier_v2",
        ),
        200,
    );
    assert_eq!(
        text,
        "Model \"classifier_v2\" Version: 1.0 registered with 1 initial workers"
    );
    let (code, body, _) = server.predict("classifier_v2", single.clone());
    assert_eq!(code, 200, "{body}");
    assert_json_close(
        &body,
        &reference["classifier_single"],
        1e-5,
        "classifier_v2",
    );

    // curl -X PUT "http://localhost:8081/models/classifier?min_worker=2&max_worker=4"
    let text = status_text(
        call(
            &server,
            Method::PUT,
            "/models/classifier?min_worker=2&max_worker=4&synchronous=true",
        ),
        200,
    );
    assert_eq!(text, "Workers scaled to 2 for model: classifier");
    let (_, described) = call(&server, Method::GET, "/models/classifier");
    assert_eq!(described[0]["minWorkers"], 2);
    assert_eq!(described[0]["maxWorkers"], 4);
    assert_eq!(described[0]["workers"].as_array().unwrap().len(), 2);
    let (code, body, _) = server.predict("classifier", single.clone());
    assert_eq!(code, 200, "{body}");
    // As written (no synchronous=true): TorchServe's 202, and the workers follow.
    let text = status_text(
        call(
            &server,
            Method::PUT,
            "/models/classifier?min_worker=3&max_worker=4",
        ),
        202,
    );
    assert_eq!(text, "Processing worker updates...");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, d) = call(&server, Method::GET, "/models/classifier");
        if d[0]["workers"].as_array().unwrap().len() == 3 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never 3 workers: {d}");
        std::thread::sleep(Duration::from_millis(20));
    }

    // curl -X PUT "http://localhost:8081/models/classifier/1.0/set-default"
    let text = status_text(
        call(&server, Method::PUT, "/models/classifier/1.0/set-default"),
        200,
    );
    assert_eq!(
        text,
        "Default version successfully updated for model \"classifier\" to \"1.0\""
    );

    // curl -X DELETE "http://localhost:8081/models/classifier"
    let text = status_text(call(&server, Method::DELETE, "/models/classifier"), 200);
    assert_eq!(text, "Model \"classifier\" unregistered");
    let (code, _, _) = server.predict("classifier", single.clone());
    assert_eq!(code, 404);
    let (_, list) = call(&server, Method::GET, "/models");
    assert_eq!(
        list,
        json!({"models": [{"modelName": "classifier_v2", "modelUrl": "classifier.mar"}]})
    );
    let (code, body, _) = server.predict("classifier_v2", single);
    assert_eq!(code, 200, "{body}");
}

#[test]
fn management_errors_have_torchserves_statuses_and_messages() {
    let fx = fixtures();
    let server = seed_server(&[]);
    let post = |q: &str| call(&server, Method::POST, &format!("/models{q}"));
    assert_error(
        post(""),
        400,
        "BadRequestException",
        "Parameter url is required.",
    );
    assert_error(
        post("?url=missing.mar"),
        404,
        "ModelNotFoundException",
        "Model not found at: missing.mar",
    );
    assert_error(
        post("?url=../store/classifier.mar"),
        404,
        "ModelNotFoundException",
        "Relative path is not allowed in url: ../store/classifier.mar",
    );
    assert_error(
        post("?url=classifier.mar"),
        409,
        "ConflictStatusException",
        "Model version 1.0 is already registered for model classifier",
    );
    assert_error(
        post("?url=classifier.mar&model_name=x&runtime=java"),
        400,
        "BadRequestException",
        "Invalid RuntimeType value: java",
    );
    // Nothing listens on port 1 of loopback: the download fails.
    let (code, body) = post("?url=http://127.0.0.1:1/absent.mar");
    assert_eq!(code, 400, "{body}");
    assert_eq!(body["type"], "DownloadArchiveException");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("Failed to download archive from: http://127.0.0.1:1/absent.mar"),
        "{body}"
    );
    // An eager-mode archive registers: the Python backend serves it, as TorchServe does.
    let eager = fx.join("eager/eager.mar");
    let (code, body) = post(&format!("?url={}&model_name=eager", eager.display()));
    assert_eq!(code, 200, "{body}");
    let (_, d) = call(&server, Method::GET, "/models/eager");
    assert_eq!(d[0]["handler"], "base_handler", "{d}");
    assert_eq!(call(&server, Method::DELETE, "/models/eager").0, 200);
    // With a path to TorchServe's own handler file, which TorchServe accepts: the Rust
    // built-in cannot load an eager-mode model, so TorchServe's handler serves it in Python.
    let (code, body) = post(&format!(
        "?url={}&model_name=eager&handler=serve/ts/torch_handler/base_handler.py:handle",
        eager.display()
    ));
    assert_eq!(code, 200, "{body}");
    let (_, d) = call(&server, Method::GET, "/models/eager");
    assert_eq!(d[0]["handler"], "base_handler", "{d}");
    assert_eq!(call(&server, Method::DELETE, "/models/eager").0, 200);

    assert_error(
        call(
            &server,
            Method::PUT,
            "/models/classifier?min_worker=3&max_worker=2",
        ),
        400,
        "BadRequestException",
        "max_worker cannot be less than min_worker.",
    );
    assert_error(
        call(&server, Method::PUT, "/models/nope?min_worker=1"),
        404,
        "ModelNotFoundException",
        "Model not found: nope",
    );
    assert_error(
        call(&server, Method::PUT, "/models/classifier/9.9?min_worker=1"),
        404,
        "ModelVersionNotFoundException",
        "Model version: 9.9 does not exist for model: classifier",
    );
    assert_error(
        call(&server, Method::PUT, "/models/classifier/9.9/set-default"),
        404,
        "ModelVersionNotFoundException",
        "Model version 9.9 does not exist for model classifier",
    );
    assert_error(
        call(&server, Method::PUT, "/models/nope/1.0/set-default"),
        404,
        "ModelNotFoundException",
        "Model not found: nope",
    );
    assert_error(
        call(&server, Method::DELETE, "/models/nope"),
        404,
        "ModelNotFoundException",
        "Model not found: nope",
    );
    assert_error(
        call(&server, Method::DELETE, "/models/classifier/9.9"),
        404,
        "ModelVersionNotFoundException",
        "Model version: 9.9 does not exist for model: classifier",
    );
    assert_error(
        call(&server, Method::PATCH, "/models/classifier"),
        405,
        "MethodNotAllowedException",
        "Requested method is not allowed",
    );

    // Scaled to 0 workers: predictions are refused at once with 503 until scaled up.
    status_text(
        call(
            &server,
            Method::PUT,
            "/models/classifier?min_worker=0&max_worker=0&synchronous=true",
        ),
        200,
    );
    let body = json!({"features": reference()["seed_features"]}).to_string();
    let (code, value, _) = server.predict("classifier", body.clone());
    assert_eq!(code, 503, "{value}");
    status_text(
        call(
            &server,
            Method::PUT,
            "/models/classifier?min_worker=1&synchronous=true",
        ),
        200,
    );
    let (code, value, _) = server.predict("classifier", body);
    assert_eq!(code, 200, "{value}");
}

#[test]
fn allowed_urls_restrict_where_archives_come_from() {
    let fx = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.properties");
    let store = fx.join("store");
    std::fs::write(
        &config,
        format!(
            "inference_address=http://127.0.0.1:0\nmanagement_address=http://127.0.0.1:0\n\
             metrics_address=http://127.0.0.1:0\nallowed_urls=file://{}/.*\n\
             cors_allowed_origin=https://app.example.com\ncors_allowed_methods=GET, POST\n",
            store.display()
        ),
    )
    .unwrap();
    let server = Server::start(&[
        "--ts-config",
        path_str(&config),
        "--handler",
        "classifier=classifier",
    ])
    .wait_healthy();
    // CORS headers, as configured.
    let r = server
        .client
        .get(format!("{}/models", server.management))
        .send()
        .unwrap();
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert_eq!(r.headers()["access-control-allow-methods"], "GET, POST");
    assert!(r.headers().get("access-control-allow-headers").is_none());
    let allowed = store.join("classifier.mar");
    let elsewhere = fx.join("v2/classifier.mar");
    let (code, body) = call(
        &server,
        Method::POST,
        &format!("/models?url={}", elsewhere.display()),
    );
    assert_eq!(code, 404, "{body}");
    assert!(body["message"]
        .as_str()
        .unwrap()
        .contains("does not match any allowed URL(s)"));
    let text = status_text(
        call(
            &server,
            Method::POST,
            &format!("/models?url=file://{}", allowed.display()),
        ),
        200,
    );
    assert!(
        text.starts_with("Model \"classifier\" Version: 1.0 registered"),
        "{text}"
    );
}

#[test]
fn several_versions_of_one_model() {
    let reference = reference();
    let server = seed_server(&[]);
    let single = json!({"features": reference["seed_features"]}).to_string();
    let v2 = fixtures().join("v2/classifier.mar");
    let text = status_text(
        call(
            &server,
            Method::POST,
            &format!("/models?url={}&handler=classifier", v2.display()),
        ),
        200,
    );
    assert!(text.contains("Version: 2.0 registered"), "{text}");
    // The first registered version stays the default until set-default.
    let (_, list) = call(&server, Method::GET, "/models");
    assert_eq!(list["models"].as_array().unwrap().len(), 1);
    assert_eq!(classifier_versions(&server), ["1.0", "2.0"]);
    let answer = |path: &str| {
        let (code, body, _) = server.predict(path, single.clone());
        assert_eq!(code, 200, "{path}: {body}");
        body
    };
    assert_json_close(
        &answer("classifier"),
        &reference["classifier_single"],
        1e-5,
        "v1",
    );
    assert_json_close(
        &answer("classifier/2.0"),
        &reference["classifier_v2_single"],
        1e-5,
        "v2",
    );
    // The default cannot go while another version remains.
    assert_error(
        call(&server, Method::DELETE, "/models/classifier/1.0"),
        403,
        "InvalidModelVersionException",
        "Cannot remove default version for model classifier",
    );
    status_text(
        call(&server, Method::PUT, "/models/classifier/2.0/set-default"),
        200,
    );
    assert_json_close(
        &answer("classifier"),
        &reference["classifier_v2_single"],
        1e-5,
        "default",
    );
    status_text(call(&server, Method::DELETE, "/models/classifier/1.0"), 200);
    let (code, _, _) = server.predict("classifier/1.0", single.clone());
    assert_eq!(code, 404);
    assert_json_close(
        &answer("classifier"),
        &reference["classifier_v2_single"],
        1e-5,
        "after",
    );
}

/// The versions `GET /models/classifier/all` lists, in its order.
fn classifier_versions(server: &Server) -> Vec<String> {
    let (_, all) = call(server, Method::GET, "/models/classifier/all");
    all.as_array()
        .unwrap()
        .iter()
        .map(|m| m["modelVersion"].as_str().unwrap().to_string())
        .collect()
}

/// The seed server shared by client threads, the guide's request, and the answers of versions
/// 1.0 and 2.0 (Python's).
fn shared_seed_server() -> (Arc<Server>, String, Value, Value) {
    let reference = reference();
    (
        Arc::new(seed_server(&[])),
        json!({"features": reference["seed_features"]}).to_string(),
        reference["classifier_single"].clone(),
        reference["classifier_v2_single"].clone(),
    )
}

#[test]
fn changes_under_prediction_load_lose_nothing() {
    let (server, single, v1, v2) = shared_seed_server();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    // Four clients on the default route, two pinned to 1.0.
    for i in 0..6 {
        let (server, stop, sent, single) =
            (server.clone(), stop.clone(), sent.clone(), single.clone());
        let (v1, v2) = (v1.clone(), v2.clone());
        clients.push(std::thread::spawn(move || {
            let pinned = i >= 4;
            let path = if pinned {
                "classifier/1.0"
            } else {
                "classifier"
            };
            let mut gone = false;
            while !stop.load(Ordering::Relaxed) {
                let (code, body, _) = server.predict(path, single.clone());
                sent.fetch_add(1, Ordering::Relaxed);
                if pinned && code == 404 {
                    // 1.0 was unregistered: from then on it stays gone.
                    gone = true;
                    continue;
                }
                assert_eq!(code, 200, "{path}: {body}");
                assert!(!(pinned && gone), "1.0 answered after it was unregistered");
                if pinned {
                    assert!(json_close(&body, &v1, 1e-5), "1.0 answered {body}");
                } else {
                    assert!(
                        json_close(&body, &v1, 1e-5) || json_close(&body, &v2, 1e-5),
                        "the default answered {body}"
                    );
                }
            }
        }));
    }
    let v2_path = fixtures().join("v2/classifier.mar");
    let step = |method: Method, path: String, code: u16| {
        std::thread::sleep(Duration::from_millis(150));
        status_text(call(&server, method, &path), code);
    };
    step(
        Method::POST,
        format!("/models?url={}&handler=classifier", v2_path.display()),
        200,
    );
    step(
        Method::PUT,
        "/models/classifier?min_worker=3&synchronous=true".into(),
        200,
    );
    step(
        Method::PUT,
        "/models/classifier/2.0/set-default".into(),
        200,
    );
    step(
        Method::PUT,
        "/models/classifier/1.0?min_worker=1&synchronous=true".into(),
        200,
    );
    step(Method::DELETE, "/models/classifier/1.0".into(), 200);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().expect("a client saw a lost or wrong answer");
    }
    assert!(
        sent.load(Ordering::Relaxed) > 50,
        "too little load to mean anything"
    );
    // After the switch, the default answers as 2.0.
    let (code, body, _) = server.predict("classifier", single);
    assert_eq!(code, 200);
    assert_json_close(&body, &v2, 1e-5, "final default");
}

/// Several management clients changing one model at once while it serves: four each
/// register their own version, make it the default, hand the default back to 1.0 and
/// unregister it, five times over; two more race to register and to unregister the same
/// version. Every call gets its documented answer (exactly one of two racing registrations
/// wins, the other is 409; exactly one of two racing deletions wins, the other 404),
/// predictions on the default route and pinned to 1.0 are all answered correctly throughout,
/// and the model ends with exactly the versions the clients left registered.
#[test]
fn several_management_clients_racing_on_one_model() {
    let (server, single, v1, v2) = shared_seed_server();
    // Versions 3.0 to 7.0: the 2.0 archive (its weights) under other version numbers.
    let dir = tempfile::tempdir().unwrap();
    let v2_bytes = std::fs::read(fixtures().join("v2/classifier.mar")).unwrap();
    let archive_of = |version: &str| {
        let path = dir.path().join(format!("classifier-{version}.mar"));
        std::fs::write(&path, archive::with_version(&v2_bytes, version)).unwrap();
        path
    };
    let register =
        |path: &std::path::Path| format!("/models?url={}&handler=classifier", path.display());

    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let predictors: Vec<_> = (0..4)
        .map(|i| {
            let (server, stop, answered, single) = (
                server.clone(),
                stop.clone(),
                answered.clone(),
                single.clone(),
            );
            let (v1, v2) = (v1.clone(), v2.clone());
            std::thread::spawn(move || {
                let path = if i < 2 {
                    "classifier/1.0"
                } else {
                    "classifier"
                };
                while !stop.load(Ordering::Relaxed) {
                    let (code, body, _) = server.predict(path, single.clone());
                    assert_eq!(code, 200, "{path}: {body}");
                    let right = if i < 2 {
                        json_close(&body, &v1, 1e-5)
                    } else {
                        json_close(&body, &v1, 1e-5) || json_close(&body, &v2, 1e-5)
                    };
                    assert!(right, "{path} answered {body}");
                    answered.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    let rounds = 5;
    let churners: Vec<_> = (0..4)
        .map(|k| {
            let server = server.clone();
            let version = format!("{}.0", 3 + k);
            let url = register(&archive_of(&version));
            std::thread::spawn(move || {
                let expect = |method: Method, path: &str, code: u16| {
                    let got = call(&server, method, path);
                    assert_eq!(got.0, code, "{path}: {}", got.1);
                };
                for _ in 0..rounds {
                    expect(Method::POST, &url, 200);
                    expect(
                        Method::PUT,
                        &format!("/models/classifier/{version}/set-default"),
                        200,
                    );
                    expect(Method::PUT, "/models/classifier/1.0/set-default", 200);
                    expect(
                        Method::DELETE,
                        &format!("/models/classifier/{version}"),
                        200,
                    );
                }
                // Clients 0 and 2 leave their version registered.
                if k % 2 == 0 {
                    expect(Method::POST, &url, 200);
                }
            })
        })
        .collect();
    let racing_url = register(&archive_of("7.0"));
    let barrier = Arc::new(std::sync::Barrier::new(2));
    let racers: Vec<_> = (0..2)
        .map(|_| {
            let (server, barrier, url) = (server.clone(), barrier.clone(), racing_url.clone());
            std::thread::spawn(move || {
                let mut codes = Vec::new();
                for _ in 0..rounds {
                    barrier.wait();
                    codes.push(call(&server, Method::POST, &url).0);
                    barrier.wait();
                    codes.push(call(&server, Method::DELETE, "/models/classifier/7.0").0);
                }
                codes
            })
        })
        .collect();

    for c in churners {
        c.join()
            .expect("a management client got an unexpected answer");
    }
    let codes: Vec<Vec<u16>> = racers.into_iter().map(|r| r.join().unwrap()).collect();
    for step in 0..codes[0].len() {
        let mut pair = [codes[0][step], codes[1][step]];
        pair.sort_unstable();
        let want = if step % 2 == 0 {
            [200, 409]
        } else {
            [200, 404]
        };
        assert_eq!(pair, want, "racing step {step}: {codes:?}");
    }
    stop.store(true, Ordering::Relaxed);
    for p in predictors {
        p.join().expect("a prediction was lost or wrong");
    }
    assert!(answered.load(Ordering::Relaxed) > 20, "too little load");

    assert_eq!(classifier_versions(&server), ["1.0", "3.0", "5.0"]);
    let (_, default) = call(&server, Method::GET, "/models/classifier");
    assert_eq!(default[0]["modelVersion"], "1.0", "{default}");
    for version in ["3.0", "5.0"] {
        let (code, body, _) = server.predict(&format!("classifier/{version}"), single.clone());
        assert_eq!(code, 200);
        assert_json_close(&body, &v2, 1e-5, version);
    }
    for version in ["4.0", "6.0", "7.0"] {
        let (code, _, _) = server.predict(&format!("classifier/{version}"), single.clone());
        assert_eq!(code, 404, "{version}");
    }
}

#[test]
fn a_management_api_on_the_network_needs_the_token() {
    let server = seed_server(&[]);
    drop(server);
    // Management on all interfaces: changes need the key from key_file.json.
    let fx = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.properties");
    std::fs::write(
        &config,
        "inference_address=http://127.0.0.1:0\nmanagement_address=http://0.0.0.0:0\n\
         metrics_address=http://127.0.0.1:0\n",
    )
    .unwrap();
    let store = fx.join("store");
    let args = [
        "--model-store",
        path_str(&store),
        "--models",
        "classifier=classifier.mar",
        "--ts-config",
        path_str(&config),
        "--handler",
        "classifier=classifier",
    ];
    let server = Server::start(&args).wait_healthy();
    let key_file = server.dir().join("key_file.json");
    let keys: Value = serde_json::from_str(&std::fs::read_to_string(&key_file).unwrap()).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let key = keys["management"]["key"].as_str().unwrap();
    assert_eq!(key.len(), 8);
    let url = |p: &str| format!("{}{p}", server.management);
    let register = url("/models?url=classifier.mar&model_name=c2");
    for token in [None, Some("wrong")] {
        assert_error(
            call_with(&server.client, Method::POST, &register, token),
            400,
            "InvalidKeyException",
            "Token Authorization failed",
        );
        assert_error(
            call_with(
                &server.client,
                Method::DELETE,
                &url("/models/classifier"),
                token,
            ),
            400,
            "InvalidKeyException",
            "Token Authorization failed",
        );
        assert_error(
            call_with(
                &server.client,
                Method::PUT,
                &url("/models/classifier?min_worker=2"),
                token,
            ),
            400,
            "InvalidKeyException",
            "Token Authorization failed",
        );
    }
    // Reads, probes, predictions and metrics need none.
    assert_eq!(
        call_with(&server.client, Method::GET, &url("/models"), None).0,
        200
    );
    let body = json!({"features": reference()["seed_features"]}).to_string();
    assert_eq!(server.predict("classifier", body).0, 200);
    let r = server
        .client
        .get(format!("{}/metrics", server.metrics))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = status_text(
        call_with(&server.client, Method::POST, &register, Some(key)),
        200,
    );
    assert!(text.contains("\"c2\""), "{text}");
    // Rotation, authorised with the API key only: the old management key stops working, the
    // new one works, and key_file.json holds it.
    let api_key = keys["API"]["key"].as_str().unwrap();
    let rotate = url("/token?type=management");
    assert_error(
        call_with(&server.client, Method::GET, &rotate, Some(key)),
        400,
        "InvalidKeyException",
        "Token Authorization failed",
    );
    let (code, rotated) = call_with(&server.client, Method::GET, &rotate, Some(api_key));
    assert_eq!(code, 200, "{rotated}");
    let new_key = rotated["management"]["key"].as_str().unwrap();
    assert_ne!(new_key, key);
    let scale = url("/models/classifier?min_worker=1&synchronous=true");
    assert_eq!(
        call_with(&server.client, Method::PUT, &scale, Some(key)).0,
        400
    );
    assert_eq!(
        call_with(&server.client, Method::PUT, &scale, Some(new_key)).0,
        200
    );
    let file: Value = serde_json::from_str(&std::fs::read_to_string(&key_file).unwrap()).unwrap();
    assert_eq!(file["management"]["key"], new_key);
    drop(server);

    // Explicitly disabled: no key file, no token.
    let mut open_args = args.to_vec();
    open_args.push("--disable-token-auth");
    let server = Server::start(&open_args).wait_healthy();
    assert!(!server.dir().join("key_file.json").exists());
    status_text(
        call_with(
            &server.client,
            Method::POST,
            &format!(
                "{}/models?url=classifier.mar&model_name=c3",
                server.management
            ),
            None,
        ),
        200,
    );
    drop(server);

    // The model API switched off: registering and unregistering are 405 even on loopback.
    std::fs::write(
        &config,
        "inference_address=http://127.0.0.1:0\nmanagement_address=http://127.0.0.1:0\n\
         metrics_address=http://127.0.0.1:0\nenable_model_api=false\n",
    )
    .unwrap();
    let server = Server::start(&args).wait_healthy();
    assert_error(
        call(
            &server,
            Method::POST,
            "/models?url=classifier.mar&model_name=c4",
        ),
        405,
        "MethodNotAllowedException",
        "not allowed",
    );
    assert_error(
        call(&server, Method::DELETE, "/models/classifier"),
        405,
        "MethodNotAllowedException",
        "not allowed",
    );
    // Scaling stays available, as in TorchServe.
    status_text(
        call(
            &server,
            Method::PUT,
            "/models/classifier?min_worker=1&synchronous=true",
        ),
        200,
    );
}

/// The server's resident memory, from /proc.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn unregistering_gives_the_memory_back() {
    let server = seed_server(&[]);
    let pid = server.child.id();
    let before = rss_kib(pid);
    // The wide MLP: about 70 MB of weights.
    status_text(
        call(
            &server,
            Method::POST,
            "/models?url=wide.mar&initial_workers=1",
        ),
        200,
    );
    let body = serde_json::to_string(&reference()["wide_input"]).unwrap();
    let (code, value, _) = server.predict("wide", body);
    assert_eq!(code, 200, "{value}");
    let loaded = rss_kib(pid);
    assert!(
        loaded > before + 50_000,
        "registering grew RSS by only {} KiB",
        loaded - before
    );
    status_text(call(&server, Method::DELETE, "/models/wide"), 200);
    // The version is retired once no request holds it; then its memory goes.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut after = rss_kib(pid);
    while after > before + (loaded - before) / 5 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        after = rss_kib(pid);
    }
    eprintln!("RSS: {before} KiB before, {loaded} loaded, {after} after unregistering");
    assert!(
        after <= before + (loaded - before) / 5,
        "RSS {after} KiB after unregistering, {before} before and {loaded} loaded"
    );
}

#[test]
fn flags_over_ts_variables_over_the_file() {
    let fx = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.properties");
    let store = fx.join("store");
    let write = |envvars: bool| {
        std::fs::write(
            &config,
            format!(
                "inference_address=http://127.0.0.1:0\nmanagement_address=http://127.0.0.1:0\n\
                 metrics_address=http://127.0.0.1:0\njob_queue_size=50\nload_models=wide.mar\n\
                 enable_envvars_config={envvars}\n"
            ),
        )
        .unwrap();
    };
    let args = [
        "--model-store",
        path_str(&store),
        "--models",
        "classifier=classifier.mar",
        "--ts-config",
        path_str(&config),
        "--handler",
        "classifier=classifier",
    ];
    let env = [
        ("TS_JOB_QUEUE_SIZE", "7"),
        ("TS_LOAD_MODELS", "scripted.mar"),
    ];
    let capacity = |server: &Server| {
        let (_, d) = call(server, Method::GET, "/models/classifier");
        d[0]["jobQueueStatus"]["remainingCapacity"]
            .as_u64()
            .unwrap()
    };
    // The variables count only with enable_envvars_config=true in the file.
    write(false);
    let server = Server::start_with_env(&args, &env).wait_healthy();
    assert_eq!(capacity(&server), 50);
    drop(server);
    write(true);
    let server = Server::start_with_env(&args, &env).wait_healthy();
    // TS_JOB_QUEUE_SIZE over the file's job_queue_size; --models over TS_LOAD_MODELS and the
    // file's load_models.
    assert_eq!(capacity(&server), 7);
    let (_, list) = call(&server, Method::GET, "/models");
    assert_eq!(
        list,
        json!({"models": [{"modelName": "classifier", "modelUrl": "classifier.mar"}]})
    );
}

#[test]
fn the_api_description_matches_the_routes() {
    let server = seed_server(&[]);
    let body = json!({"features": reference()["seed_features"]}).to_string();
    let validator = common::venv_python()
        .parent()
        .unwrap()
        .join("openapi-spec-validator");
    for (port, base) in [
        ("inference", &server.inference),
        ("management", &server.management),
    ] {
        let (code, doc) = call_with(&server.client, Method::OPTIONS, &format!("{base}/"), None);
        assert_eq!(code, 200, "{port}: {doc}");
        let (code, legacy) = call_with(
            &server.client,
            Method::GET,
            &format!("{base}/api-description"),
            None,
        );
        assert_eq!((code, &legacy), (200, &doc), "{port}");
        assert_eq!(
            call_with(&server.client, Method::POST, &format!("{base}/"), None).0,
            405
        );
        // A valid OpenAPI 3 document, by the reference validator.
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), doc.to_string()).unwrap();
        let out = std::process::Command::new(&validator)
            .arg(file.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{port}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // Every operation it lists is routed, and answers with a status it lists.
        for (path, methods) in doc["paths"].as_object().unwrap() {
            for (method, op) in methods.as_object().unwrap() {
                let changes = method != "get" && method != "options";
                let model = if changes && port == "management" {
                    "nope"
                } else {
                    "classifier"
                };
                let url = format!(
                    "{base}{}",
                    path.replace("{model_name}", model)
                        .replace("{model_version}", "1.0")
                );
                let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
                let mut req = server.client.request(m, &url);
                if path.starts_with("/predictions") {
                    req = req
                        .header("content-type", "application/json")
                        .body(body.clone());
                }
                let r = req.send().unwrap();
                let status = r.status().as_u16();
                let answer: Value = r.json().unwrap();
                assert_ne!(
                    answer["type"], "ResourceNotFoundException",
                    "{method} {path} is documented but not routed"
                );
                assert_ne!(status, 405, "{method} {path} is documented but refused");
                assert!(
                    op["responses"].get(status.to_string()).is_some(),
                    "{method} {url} answered {status}, which its description does not list: {answer}"
                );
            }
            // A method no route takes is 405 (paths that take any method aside).
            let any_method = ["/predictions", "/ping", "/api-description"]
                .iter()
                .any(|p| path.starts_with(p));
            if !any_method {
                let url = format!(
                    "{base}{}",
                    path.replace("{model_name}", "classifier")
                        .replace("{model_version}", "1.0")
                );
                assert_eq!(
                    server
                        .client
                        .request(Method::PATCH, &url)
                        .send()
                        .unwrap()
                        .status(),
                    405,
                    "PATCH {path}"
                );
            }
        }
    }
}

/// A one-thread HTTP server on loopback for `http(s)://` registrations: `/ok/<file>` and
/// `/evil/<file>` answer the archive, `/hop/<file>` redirects to `/evil/<file>`. It serves at
/// most `limit` connections, then stops.
fn archive_server(archive: Vec<u8>, limit: usize) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut client in listener.incoming().take(limit).map_while(Result::ok) {
            let Some(head) = common::read_request_head(&mut client) else {
                continue;
            };
            let head = String::from_utf8_lossy(&head).into_owned();
            let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
            use std::io::Write;
            let reply = if let Some(file) = path.strip_prefix("/hop/") {
                format!(
                    "HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:{port}/evil/{file}\r\n\
                     Content-Length: 0\r\nConnection: close\r\n\r\n"
                )
                .into_bytes()
            } else if path.starts_with("/ok/") || path.starts_with("/evil/") {
                let mut r = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    archive.len()
                )
                .into_bytes();
                r.extend_from_slice(&archive);
                r
            } else {
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec()
            };
            let _ = client.write_all(&reply);
        }
    });
    port
}

/// Registering from an http URL downloads the archive into the model store (as TorchServe
/// does), subject to `allowed_urls`, also for redirects; registering it again finds the file
/// there and answers TorchServe's 500.
#[test]
fn archives_register_from_allowed_http_urls() {
    let archive = std::fs::read(fixtures().join("store/scripted.mar")).unwrap();
    let port = archive_server(archive, 8);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    std::fs::create_dir(&store).unwrap();
    let config = dir.path().join("config.properties");
    std::fs::write(
        &config,
        format!(
            "inference_address=http://127.0.0.1:0\nmanagement_address=http://127.0.0.1:0\n\
             metrics_address=http://127.0.0.1:0\n\
             allowed_urls=http://127.0.0.1:{port}/(ok|hop)/.*\n"
        ),
    )
    .unwrap();
    let server = Server::start(&[
        "--ts-config",
        path_str(&config),
        "--model-store",
        path_str(&store),
    ])
    .wait_healthy();
    let url = format!("http://127.0.0.1:{port}/ok/scripted.mar");
    let (code, body) = call(
        &server,
        Method::POST,
        &format!("/models?url={url}&initial_workers=1"),
    );
    assert_eq!(code, 200, "{body}");
    assert!(store.join("scripted.mar").is_file());
    let (_, d) = server.get(format!("{}/models/scripted", server.management));
    assert_eq!(d[0]["modelUrl"], url);
    let reference = reference();
    let (code, value, _) = server.predict("scripted", reference["seed_features"].to_string());
    assert_eq!(code, 200, "{value}");
    assert_json_close(&value, &reference["tensor_single"], 1e-5, "downloaded");

    // The same file again: TorchServe's answer, before any download.
    let (code, body) = call(
        &server,
        Method::POST,
        &format!("/models?url={url}&model_name=again"),
    );
    assert_eq!(code, 500, "{body}");
    assert_eq!(body["message"], "Model file already exists scripted.mar");

    // A URL the pattern refuses, and an allowed one redirecting to a refused one.
    let (code, body) = call(
        &server,
        Method::POST,
        &format!("/models?url=http://127.0.0.1:{port}/evil/other.mar"),
    );
    assert_eq!(code, 404, "{body}");
    assert_eq!(body["type"], "ModelNotFoundException");
    let (code, body) = call(
        &server,
        Method::POST,
        &format!("/models?url=http://127.0.0.1:{port}/hop/third.mar"),
    );
    assert_eq!(code, 400, "{body}");
    assert_eq!(body["type"], "DownloadArchiveException");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("allowed_urls"), "{message}");
    assert!(!store.join("third.mar").exists());

    // Unregistering removes the downloaded file, as TorchServe does, so the URL registers
    // again; a registration whose workers cannot start leaves no file behind either.
    assert_eq!(call(&server, Method::DELETE, "/models/scripted").0, 200);
    assert!(!store.join("scripted.mar").exists());
    let (code, body) = call(
        &server,
        Method::POST,
        &format!("/models?url={url}&handler=invalidHandler&initial_workers=1"),
    );
    assert_eq!(code, 500, "{body}");
    assert!(!store.join("scripted.mar").exists());
    let (code, body) = call(&server, Method::POST, &format!("/models?url={url}"));
    assert_eq!(code, 200, "{body}");
    assert!(store.join("scripted.mar").is_file());
}
