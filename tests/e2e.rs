//! End-to-end tests of `torchfn-local` over real HTTP on 127.0.0.1, port 0, with archives
//! made by the real torch-model-archiver and outputs checked against Python torch.

#![allow(clippy::unwrap_used, clippy::field_reassign_with_default)]

use torchfn_test_support::{self as common, moto, path_str, server};

use std::io::{Read, Write};

use common::{assert_json_close, fixtures, reference};
use serde_json::{json, Value};
use server::{sample, Server};

/// The guide's flow: archive → start with --model-store/--models/--ts-config → ping → the
/// guide's single and batch predictions, equal to Python torch's.
fn seed_server() -> Server {
    let fx = fixtures();
    Server::start(&[
        "--model-store",
        path_str(&fx.join("store")),
        "--models",
        "classifier=classifier.mar",
        "--ts-config",
        path_str(&fx.join("config.properties")),
        "--handler",
        "classifier=classifier",
    ])
    .wait_healthy()
}

#[test]
fn seed_flow_end_to_end() {
    let reference = reference();
    let server = seed_server();
    let single = json!({"features": reference["seed_features"]});
    let (status, body, headers) = server.predict("classifier", single.to_string());
    assert_eq!(status, 200, "{body}");
    assert_json_close(&body, &reference["classifier_single"], 1e-5, "single");
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(headers["x-request-id"].len(), 36);

    let (status, body, _) = server.predict("classifier", reference["seed_batch"].to_string());
    assert_eq!(status, 200, "{body}");
    assert_json_close(&body, &reference["classifier_batch"], 1e-5, "batch");

    // The explicit version route answers the same.
    let (status, body, _) = server.predict("classifier/1.0", single.to_string());
    assert_eq!(status, 200);
    assert_json_close(&body, &reference["classifier_single"], 1e-5, "versioned");

    // The intra-op threads were chosen by timing a batch at one thread and at the fair share
    // (on a machine with more than one core; one core leaves nothing to choose): the choice
    // follows the two logged timings (the fair share only when at least 10% faster) and is
    // the thread count the model was loaded with. Which one wins depends on the machine.
    if std::thread::available_parallelism().map_or(1, |n| n.get()) > 1 {
        // The log's colours out (ESC [ ... m).
        let raw = server.log();
        let mut log = String::new();
        let mut chars = raw.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                for c in chars.by_ref() {
                    if c == 'm' {
                        break;
                    }
                }
            } else {
                log.push(c);
            }
        }
        let line = log
            .lines()
            .find(|l| l.contains("intra-op threads chosen by timing a batch"))
            .unwrap_or_else(|| panic!("no thread choice logged:\n{log}"));
        let field = |line: &str, name: &str| -> u64 {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
                .and_then(|v| v.trim_matches('"').parse().ok())
                .unwrap_or_else(|| panic!("{name} missing: {line}"))
        };
        let threads = field(line, "threads");
        let one_us = field(line, "one_thread_us") as f64;
        let fair_share = field(line, "fair_share");
        let fair_us = field(line, "fair_share_us") as f64;
        assert!(fair_share > 1, "{line}");
        // The logged timings are whole microseconds: a choice within one of the 10% line
        // is allowed either way.
        if threads == fair_share {
            assert!(fair_us - 1.0 <= (one_us + 1.0) * 0.9, "{line}");
        } else {
            assert_eq!(threads, 1, "{line}");
            assert!(fair_us + 1.0 >= (one_us - 1.0) * 0.9, "{line}");
        }
        let loaded = log
            .lines()
            .find(|l| l.contains("model loaded") && l.contains("model=classifier"))
            .unwrap_or_else(|| panic!("no model loaded line:\n{log}"));
        assert_eq!(field(loaded, "threads_per_worker"), threads, "{loaded}");
    }
}

fn assert_error(status: u16, body: &Value, want_status: u16, want_type: &str, needle: &str) {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["code"], want_status, "{body}");
    assert_eq!(body["type"], want_type, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains(needle),
        "message {message:?} lacks {needle:?}"
    );
    let keys: Vec<_> = body.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["code", "type", "message"]);
}

#[test]
fn bad_inputs_get_clear_errors_and_the_server_keeps_serving() {
    let reference = reference();
    let server = seed_server();
    let good = json!({"features": reference["seed_features"]}).to_string();
    let nine = json!({"features": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]}).to_string();
    let cases: Vec<(&str, String, u16, &str, &str)> = vec![
        (
            "classifier",
            "{\"features\": [0.1, ".into(),
            400,
            "BadRequestException",
            "not valid JSON",
        ),
        (
            "classifier",
            nine,
            400,
            "BadRequestException",
            "the model takes 10",
        ),
        (
            "classifier",
            r#"{"features": [0.1, "x", 0.3]}"#.into(),
            400,
            "BadRequestException",
            "features[1] must be a number",
        ),
        ("classifier", "".into(), 400, "BadRequestException", "empty"),
        (
            "classifier",
            r#"{"feature": [1]}"#.into(),
            400,
            "BadRequestException",
            "\"features\"",
        ),
        (
            "nosuchmodel",
            good.clone(),
            404,
            "ModelNotFoundException",
            "Model not found: nosuchmodel",
        ),
        (
            "classifier/9.9",
            good.clone(),
            404,
            "ModelVersionNotFoundException",
            "Model version: 9.9 does not exist for model: classifier",
        ),
    ];
    for (path, body, status, ty, needle) in cases {
        let (got, value, headers) = server.predict(path, body);
        assert_error(got, &value, status, ty, needle);
        assert!(headers.contains_key("x-request-id"));
        let (ok, value, _) = server.predict("classifier", good.clone());
        assert_eq!(ok, 200, "valid request after a bad one failed: {value}");
        assert_json_close(
            &value,
            &reference["classifier_single"],
            1e-5,
            "after bad input",
        );
    }
    // A list with one bad instance fails as a whole with the instance named.
    let mixed = json!([{"features": reference["seed_features"]}, {"features": [1, 2]}]).to_string();
    let (got, value, _) = server.predict("classifier", mixed);
    assert_error(got, &value, 400, "BadRequestException", "instance 1");
    // An explanation asked of a model a Rust built-in serves, on each explain route.
    let single = json!({"features": reference["seed_features"]});
    for (route, body) in [
        ("/explanations/classifier", single.clone()),
        (
            "/v1/models/classifier:explain",
            json!({"instances": [single]}),
        ),
        ("/v2/models/classifier/explain", json!({"inputs": []})),
    ] {
        let r = server
            .client
            .post(format!("{}{route}", server.inference))
            .json(&body)
            .send()
            .unwrap();
        let status = r.status().as_u16();
        let value: Value = r.json().unwrap();
        assert_error(
            status,
            &value,
            400,
            "BadRequestException",
            "gives no explanations",
        );
    }
    // Unknown routes and methods.
    let r = server
        .client
        .get(format!("{}/nothing/here", server.inference))
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);
    let body: Value = r.json().unwrap();
    assert_error(
        404,
        &body,
        404,
        "ResourceNotFoundException",
        "Requested resource is not found",
    );
    let r = server
        .client
        .patch(format!("{}/models", server.management))
        .send()
        .unwrap();
    assert_eq!(r.status(), 405);
    // Over max_request_size: answered from the headers, before any of the body is read (a
    // raw socket, since an HTTP client may fail writing a body the server will not read).
    let addr = server.inference.trim_start_matches("http://").to_string();
    let mut sock = std::net::TcpStream::connect(&addr).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(
        sock,
        "POST /predictions/classifier HTTP/1.1\r\nHost: {addr}\r\n\
         Content-Type: application/json\r\nContent-Length: 8000000\r\n\r\n{{\"features\": ["
    )
    .unwrap();
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&reply).ends_with("}\n") {
        let n = sock.read(&mut buf).unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&reply));
        reply.extend_from_slice(&buf[..n]);
    }
    let reply = String::from_utf8_lossy(&reply).into_owned();
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    let body: Value = serde_json::from_str(&reply[reply.find("\r\n\r\n").unwrap() + 4..]).unwrap();
    assert_error(
        413,
        &body,
        413,
        "PayloadTooLargeException",
        "max_request_size",
    );
    let (ok, _, _) = server.predict("classifier", good);
    assert_eq!(ok, 200);
}

#[test]
fn metrics_move_by_exactly_the_requests_sent() {
    let reference = reference();
    let server = seed_server();
    let good = json!({"features": reference["seed_features"]}).to_string();
    let m = [("model_name", "classifier")];
    let before = server.metrics_text();
    for _ in 0..5 {
        assert_eq!(server.predict("classifier", good.clone()).0, 200);
    }
    for _ in 0..2 {
        assert_eq!(server.predict("classifier", "{").0, 400);
    }
    assert_eq!(server.predict("classifier/1.0", good.clone()).0, 200);
    let after = server.metrics_text();
    let delta = |name: &str, labels: &[(&str, &str)]| {
        sample(&after, name, labels) - sample(&before, name, labels)
    };
    assert_eq!(delta("ts_inference_requests_total", &m), 8.0);
    assert_eq!(
        delta(
            "ts_inference_requests_total",
            &[("model_name", "classifier"), ("model_version", "default")]
        ),
        7.0
    );
    assert_eq!(
        delta(
            "ts_inference_requests_total",
            &[("model_name", "classifier"), ("model_version", "1.0")]
        ),
        1.0
    );
    // 6 good predictions and the first /metrics scrape (counted once it has answered).
    assert_eq!(delta("Requests2XX", &[("Level", "Host")]), 7.0);
    assert_eq!(delta("Requests4XX", &[("Level", "Host")]), 2.0);
    assert_eq!(delta("Requests5XX", &[("Level", "Host")]), 0.0);
    assert_eq!(delta("ts_inference_latency_ms_count", &m), 6.0);
    assert_eq!(delta("ts_queue_latency_ms_count", &m), 6.0);
    assert!(delta("ts_inference_latency_microseconds", &m) > 0.0);
    assert!(delta("ts_queue_latency_microseconds", &m) >= 0.0);
    assert!(after.contains("ts_queue_latency_ms_bucket{"));
    assert_eq!(sample(&after, "ts_model_workers", &m), 1.0);
    // name[] filter.
    let filtered = server
        .client
        .get(format!(
            "{}/metrics?name[]=ts_model_workers",
            server.metrics
        ))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(filtered.contains("ts_model_workers{"));
    assert!(!filtered.contains("Requests2XX"));
}

#[test]
fn every_archive_format_serves_the_same_answers() {
    let reference = reference();
    let fx = fixtures().join("formats");
    let models = format!(
        "zip={},store={},tgz={},dir={}",
        path_str(&fx.join("default/classifier.mar")),
        path_str(&fx.join("zip-store/classifier.mar")),
        path_str(&fx.join("tgz/classifier.tar.gz")),
        path_str(&fx.join("no-archive/classifier")),
    );
    let server = Server::start_with_env(
        &["--models", &models],
        &[(
            "TS_CONFIG_FILE",
            path_str(&fixtures().join("config.properties")),
        )],
    );
    // TS_CONFIG_FILE was read: its port-0 addresses were used, not the defaults.
    assert!(!server.inference.ends_with(":8080"), "{}", server.inference);
    let server = server.wait_healthy();
    let single = json!({"features": reference["seed_features"]}).to_string();
    for name in ["zip", "store", "tgz", "dir"] {
        // No --handler here: these archives name the guide's handler.py, which runs in the
        // Python backend, with the answers Python torch gives.
        let (status, body, _) = server.predict(name, single.clone());
        assert_eq!(status, 200, "{name}: {body}");
        assert_json_close(&body, &reference["classifier_single"], 1e-5, name);
    }
    drop(server);

    let server = Server::start(&[
        "--models",
        &models,
        "--ts-config",
        path_str(&fixtures().join("config.properties")),
        "--handler",
        "zip=classifier,store=classifier,tgz=classifier,dir=classifier",
    ])
    .wait_healthy();
    for name in ["zip", "store", "tgz", "dir"] {
        let (status, body, _) = server.predict(name, single.clone());
        assert_eq!(status, 200, "{name}: {body}");
        assert_json_close(&body, &reference["classifier_single"], 1e-5, name);
    }
}

#[test]
fn tensor_handler_models_and_describe() {
    let reference = reference();
    let fx = fixtures();
    let server = Server::start(&[
        "--model-store",
        path_str(&fx.join("store")),
        "--models",
        "scripted.mar,traced.mar,conv.mar",
        "--ts-config",
        path_str(&fx.join("config.properties")),
    ])
    .wait_healthy();
    let features = &reference["seed_features"];
    for (name, want) in [("scripted", "tensor_single"), ("traced", "traced_single")] {
        for body in [features.to_string(), json!({"data": features}).to_string()] {
            let (status, got, _) = server.predict(name, body);
            assert_eq!(status, 200, "{got}");
            assert_json_close(&got, &reference[want], 1e-5, name);
        }
    }
    let batch = json!({"instances": reference["seed_batch"].as_array().unwrap().iter().map(|b| &b["features"]).collect::<Vec<_>>()});
    let (status, got, _) = server.predict("scripted", batch.to_string());
    assert_eq!(status, 200, "{got}");
    assert_json_close(&got, &reference["tensor_batch"], 1e-5, "tensor batch");

    let conv_in = &reference["conv_inputs"];
    let (status, got, _) = server.predict("conv", json!({"instances": conv_in}).to_string());
    assert_eq!(status, 200, "{got}");
    assert_json_close(&got, &reference["conv_outputs"], 1e-5, "conv");
    let (status, got, _) = server.predict("conv", json!([[1.0, 2.0]]).to_string());
    assert_error(
        status,
        &got,
        400,
        "BadRequestException",
        "model cannot take this input",
    );

    // List and describe.
    let (status, list) = server.get(format!("{}/models", server.management));
    assert_eq!(status, 200);
    assert_eq!(
        list,
        json!({"models": [
            {"modelName": "conv", "modelUrl": "conv.mar"},
            {"modelName": "scripted", "modelUrl": "scripted.mar"},
            {"modelName": "traced", "modelUrl": "traced.mar"},
        ]})
    );
    let (_, page) = server.get(format!("{}/models?limit=2", server.management));
    assert_eq!(page["nextPageToken"], "2");
    assert_eq!(page["models"].as_array().unwrap().len(), 2);
    let (_, page) = server.get(format!(
        "{}/models?limit=2&next_page_token=2",
        server.management
    ));
    assert!(page.get("nextPageToken").is_none());
    assert_eq!(page["models"][0]["modelName"], "traced");
    // A page that ends at the last model still carries a token, as TorchServe's does.
    let (_, page) = server.get(format!(
        "{}/models?limit=1&next_page_token=2",
        server.management
    ));
    assert_eq!(page["nextPageToken"], "3");
    assert_eq!(page["models"][0]["modelName"], "traced");
    // Trailing slashes are ignored, as TorchServe's path split drops them.
    let (status, d) = server.get(format!("{}/models/conv/", server.management));
    assert_eq!(status, 200, "{d}");
    assert_eq!(d[0]["modelName"], "conv");

    let (status, d) = server.get(format!("{}/models/conv", server.management));
    assert_eq!(status, 200);
    let d = &d[0];
    // From conv's model-config YAML.
    assert_eq!(d["modelName"], "conv");
    assert_eq!(d["modelVersion"], "1.0");
    assert_eq!(d["batchSize"], 8);
    assert_eq!(d["maxBatchDelay"], 5);
    assert_eq!(d["minWorkers"], 1);
    assert_eq!(d["maxWorkers"], 2);
    assert_eq!(d["responseTimeout"], 30);
    assert_eq!(d["deviceType"], "cpu");
    assert_eq!(d["loadedAtStartup"], true);
    assert_eq!(d["workers"][0]["status"], "READY");
    assert_eq!(d["workers"][0]["pid"], server.child.id());
    assert!(d["workers"][0]["memoryUsage"].as_u64().unwrap() > 1_000_000);
    assert_eq!(d["jobQueueStatus"]["remainingCapacity"], 100);
    // From config.properties (batch_size=32, max_batch_delay=100) for a model without YAML.
    let (_, d) = server.get(format!("{}/models/scripted/all", server.management));
    assert_eq!(d[0]["batchSize"], 32);
    assert_eq!(d[0]["maxBatchDelay"], 100);
    let (status, e) = server.get(format!("{}/models/nope", server.management));
    assert_error(
        status,
        &e,
        404,
        "ModelNotFoundException",
        "Model not found: nope",
    );
    let (status, e) = server.get(format!("{}/models/conv/2.0", server.management));
    assert_error(status, &e, 404, "ModelVersionNotFoundException", "2.0");
}

#[test]
fn concurrent_requests_match_single_results_and_sigterm_stops_cleanly() {
    let reference = reference();
    let mut server = seed_server();
    let single = json!({"features": reference["seed_features"]}).to_string();
    let other = json!(reference["seed_batch"][1]).to_string();
    let want_other = reference["classifier_batch"][1].clone();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..16)
            .map(|i| {
                let (server, single, other) = (&server, single.clone(), other.clone());
                s.spawn(move || {
                    let body = if i % 2 == 0 { single } else { other };
                    (i, server.predict("classifier", body))
                })
            })
            .collect();
        for h in handles {
            let (i, (status, body, _)) = h.join().unwrap();
            assert_eq!(status, 200, "{body}");
            let want = if i % 2 == 0 {
                &reference["classifier_single"]
            } else {
                &want_other
            };
            assert_json_close(&body, want, 1e-5, &format!("request {i}"));
        }
    });
    let status = server.terminate();
    assert!(status.success(), "exit status {status:?}");
    let mut rest = String::new();
    let _ = std::fs::File::open(&server.log)
        .unwrap()
        .read_to_string(&mut rest);
    assert!(rest.contains("stopped"), "{rest}");
}

#[test]
fn serves_archives_from_an_s3_model_store() {
    moto::env();
    let reference = reference();
    let store = torchfn_store::store::ObjectStore::from_env();
    let bucket = format!("models-{}", std::process::id());
    let archive = std::fs::read(fixtures().join("store/classifier.mar")).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        moto::new_bucket(&bucket).await;
        let at = format!("s3://{bucket}/store/classifier.mar")
            .parse()
            .unwrap();
        store.put(&at, archive).await.unwrap();
    });
    // The server inherits the AWS environment pointing at the local S3 server.
    let server = Server::start(&[
        "--model-store",
        &format!("s3://{bucket}/store"),
        "--models",
        "classifier=classifier.mar,missing=nope.mar",
        "--ts-config",
        path_str(&fixtures().join("config.properties")),
        "--handler",
        "classifier=classifier",
    ]);
    server.wait_log("start-up models loaded");
    // A model named at start-up failed: /ping says so, so readiness probes keep traffic away.
    let (status, ping) = server.get(format!("{}/ping", server.inference));
    assert_eq!((status, ping), (500, json!({"status": "Unhealthy"})));
    let single = json!({"features": reference["seed_features"]}).to_string();
    let (status, body, _) = server.predict("classifier", single.clone());
    assert_eq!(status, 200, "{body}");
    assert_json_close(&body, &reference["classifier_single"], 1e-5, "from S3");
    let (_, d) = server.get(format!("{}/models/classifier", server.management));
    assert_eq!(d[0]["modelUrl"], "classifier.mar");
    let (status, body, _) = server.predict("missing", single);
    assert_error(status, &body, 404, "ModelNotFoundException", "missing");
    let log = server.log();
    assert!(
        log.contains(&format!("Model not found at: s3://{bucket}/store/nope.mar")),
        "{log}"
    );
}
