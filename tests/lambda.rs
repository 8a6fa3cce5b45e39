//! `torchfn-model` under a Lambda Runtime API: this test serves the Runtime API's
//! invocation endpoints itself (the runtime polls `/next`, posts `/response`), sends API
//! Gateway HTTP API (v2) events, and checks that with `AWS_LAMBDA_MAX_CONCURRENCY=8`
//! concurrent invocations of one environment share the micro-batcher (mean batch size above
//! 1) while each invocation gets its own answer.

#![allow(clippy::unwrap_used)]

use torchfn_test_support::{self as common, runtime_api};

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::oneshot;

/// An API Gateway HTTP API (v2) event for `POST /predictions/slow` with a JSON body.
fn http_api_event(id: &str, body: &Value) -> Value {
    runtime_api::http_api_event(id, "/predictions/slow", body)
}

/// An API Gateway REST API (v1) proxy event for `POST /predictions/slow` on stage `prod`.
fn rest_api_event(id: &str, body: &Value) -> Value {
    json!({
        "resource": "/{proxy+}",
        "path": "/predictions/slow",
        "httpMethod": "POST",
        "headers": {"content-type": "application/json"},
        "multiValueHeaders": {"content-type": ["application/json"]},
        "queryStringParameters": null,
        "multiValueQueryStringParameters": null,
        "pathParameters": {"proxy": "predictions/slow"},
        "stageVariables": null,
        "requestContext": {
            "accountId": "123456789012",
            "resourceId": "abc123",
            "stage": "prod",
            "requestId": id,
            "identity": {"sourceIp": "127.0.0.1"},
            "resourcePath": "/{proxy+}",
            "httpMethod": "POST",
            "apiId": "example",
            "path": "/prod/predictions/slow"
        },
        "body": body.to_string(),
        "isBase64Encoded": false
    })
}

/// An Application Load Balancer target event for `POST /predictions/slow`.
fn alb_event(body: &Value) -> Value {
    json!({
        "requestContext": {"elb": {"targetGroupArn":
            "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/torchfn/0123456789abcdef"}},
        "httpMethod": "POST",
        "path": "/predictions/slow",
        "queryStringParameters": {},
        "headers": {"content-type": "application/json", "host": "torchfn-alb.example.com"},
        "body": body.to_string(),
        "isBase64Encoded": false
    })
}

/// Standard base64 with padding.
fn base64_encode(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `torchfn-model` under the Runtime API at `addr`, with the variables Lambda sets, serving
/// the slow test model; tests add their own settings.
fn slow_function(addr: std::net::SocketAddr) -> Command {
    let slow = common::fixtures().join("slow/slow.mar");
    let mut command = Command::new(env!("CARGO_BIN_EXE_torchfn-model"));
    command
        .env("AWS_LAMBDA_RUNTIME_API", addr.to_string())
        .env("AWS_LAMBDA_FUNCTION_NAME", "slow")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "2048")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "1")
        .env("TORCHFN_MODEL_URI", slow.to_str().unwrap())
        .env("TORCHFN_MODEL_NAME", "slow")
        // One libtorch thread per process: the slow model's thousands of small ops run
        // slower on two, and with two such functions running at once (the tests of this file
        // run in parallel) two-thread passes on two cores took over a minute in CI.
        .env("OMP_NUM_THREADS", "1");
    command
}

/// Sends SIGTERM to `child`; returns when it was sent.
fn sigterm(child: &Child) -> std::time::Instant {
    let sent = std::time::Instant::now();
    common::signal::process(child, common::signal::Signal::TERM).unwrap();
    sent
}

/// Waits for `child` to exit, failing the test when it still runs `limit` after `since`.
async fn exit_within(
    child: &mut Child,
    since: std::time::Instant,
    limit: Duration,
) -> std::process::ExitStatus {
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            since.elapsed() < limit,
            "still running {:?} after SIGTERM",
            since.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_invocations_share_the_batcher() {
    let (api, tx, addr) = runtime_api::start().await;
    let child = slow_function(addr)
        .env("AWS_LAMBDA_MAX_CONCURRENCY", "8")
        .env("TORCHFN_BATCH_SIZE", "8")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut child = Kill(child);
    // The function's stdout: its EMF metric lines.
    let stdout = child.0.stdout.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines_tx.send(line);
        }
    });

    // Round 1 warms the environment; round 2 is counted. Each invocation's value is its
    // own, so a mixed-up answer shows.
    let mut batch_sizes = Vec::new();
    for round in 0..2 {
        let mut replies = Vec::new();
        for i in 0..8u32 {
            let id = format!("r{round}-{i}");
            let value = f64::from(round * 100 + i);
            let (reply_tx, reply_rx) = oneshot::channel();
            api.waiting.lock().unwrap().insert(id.clone(), reply_tx);
            tx.send((
                id.clone(),
                http_api_event(&id, &json!({"data": [20_000, value]})),
            ))
            .unwrap();
            replies.push((value, reply_rx));
        }
        for (value, reply) in replies {
            let response = tokio::time::timeout(Duration::from_secs(120), reply)
                .await
                .expect("no answer from the function")
                .unwrap();
            assert_eq!(response["statusCode"], 200, "{response}");
            let body: Value = serde_json::from_str(response["body"].as_str().unwrap()).unwrap();
            assert_eq!(body, json!([value * 2.0]), "{response}");
            let size = response["headers"]["x-torchfn-batch-size"]
                .as_str()
                .unwrap()
                .parse::<f64>()
                .unwrap();
            if round == 1 {
                batch_sizes.push(size);
            }
        }
    }
    // A REST API (v1) event under a named stage, an ALB event, and an HTTP API event whose
    // body came base64-encoded: the same route, the same answers.
    let body = json!({"data": [0, 21]});
    let encoded = base64_encode(body.to_string().as_bytes());
    let mut v2_binary = http_api_event("b64", &body);
    v2_binary["body"] = json!(encoded);
    v2_binary["isBase64Encoded"] = json!(true);
    for (id, event) in [
        ("rest", rest_api_event("rest", &body)),
        ("alb", alb_event(&body)),
        ("b64", v2_binary),
    ] {
        let (reply_tx, reply_rx) = oneshot::channel();
        api.waiting.lock().unwrap().insert(id.to_string(), reply_tx);
        tx.send((id.to_string(), event)).unwrap();
        let response = tokio::time::timeout(Duration::from_secs(60), reply_rx)
            .await
            .expect("no answer from the function")
            .unwrap();
        assert_eq!(response["statusCode"], 200, "{id}: {response}");
        if id == "alb" {
            // An ALB answer carries its status line too.
            assert_eq!(response["statusDescription"], "200 OK", "{response}");
        }
        let answer: Value = serde_json::from_str(response["body"].as_str().unwrap()).unwrap();
        assert_eq!(answer, json!([42.0]), "{id}");
    }
    assert!(api.init_errors.lock().unwrap().is_empty());
    // One EMF line per invocation, dimensions model and version only.
    let emf: Vec<Value> = (0..16)
        .map(|_| {
            let line = lines_rx.recv_timeout(Duration::from_secs(10)).unwrap();
            serde_json::from_str(&line).unwrap()
        })
        .collect();
    for m in &emf {
        assert_eq!(
            m["_aws"]["CloudWatchMetrics"][0]["Dimensions"],
            json!([["model", "version"]])
        );
        assert_eq!(
            (m["model"].as_str(), m["version"].as_str()),
            (Some("slow"), Some("1.0"))
        );
        assert!(m["Latency"].as_u64().unwrap() > 0);
        assert!(m["BatchSize"].as_u64().unwrap() >= 1);
        assert!(m["QueueTime"].is_u64());
    }
    let mean = batch_sizes.iter().sum::<f64>() / batch_sizes.len() as f64;
    eprintln!("batch sizes seen by 8 concurrent invocations: {batch_sizes:?} (mean {mean})");
    assert!(
        mean > 1.0,
        "invocations did not share passes: {batch_sizes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_start_is_reported_to_the_runtime_api() {
    let (api, _tx, addr) = runtime_api::start().await;
    let missing = common::fixtures().join("store/no-such-model.mar");
    let mut child = Command::new(env!("CARGO_BIN_EXE_torchfn-model"))
        .env("AWS_LAMBDA_RUNTIME_API", addr.to_string())
        .env("AWS_LAMBDA_FUNCTION_NAME", "missing")
        .env("TORCHFN_MODEL_URI", missing.to_str().unwrap())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(!status.success());
    let errors = api.init_errors.lock().unwrap().clone();
    assert_eq!(errors.len(), 1, "{errors:?}");
    let report: Value = serde_json::from_str(&errors[0]).unwrap();
    assert_eq!(report["errorType"], "Runtime.InitError");
    let message = report["errorMessage"].as_str().unwrap();
    assert!(message.contains("no-such-model.mar"), "{message}");
}

/// Waits (up to `secs`) for a condition, polling every 20 ms.
async fn wait_for(what: &str, secs: u64, mut ready: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while !ready() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Lambda's SHUTDOWN phase: the function registers an internal extension during INIT (before
/// it asks for an invocation), so Lambda will send SIGTERM; on SIGTERM the invocation in
/// flight is answered, the unpacked model is removed from /tmp and the process exits 0
/// within its budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_phase_answers_the_invocation_in_flight_and_cleans_up() {
    let tmp = tempfile::tempdir().unwrap();
    let (api, tx, addr) = runtime_api::start().await;
    // Ample for the pass on a loaded machine (the default is 400 ms, inside Lambda's 500). A
    // passing run does not wait for it; the test checks that the answer comes and that the
    // function then exits.
    let budget_ms = 60_000u64;
    let child = slow_function(addr)
        .env("AWS_LAMBDA_MAX_CONCURRENCY", "2")
        .env("TORCHFN_SHUTDOWN_BUDGET_MS", budget_ms.to_string())
        .env("TMPDIR", tmp.path())
        .env("RUST_LOG", "info,torchfn_lambda::shutdown=debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Kill(child);
    let stderr = child.0.stderr.take().unwrap();
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let logging = {
        let log = log.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let mut log = log.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        })
    };

    wait_for("INIT to end", 120, || {
        !api.extensions_waiting.lock().unwrap().is_empty()
    })
    .await;
    let extensions = api.extensions.lock().unwrap().clone();
    assert_eq!(
        extensions,
        vec![("torchfn-shutdown".to_string(), json!([]), 0)],
        "one extension, subscribed to nothing, registered before the first invocation"
    );
    let unpacked = || {
        std::fs::read_dir(tmp.path())
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("torchfn-models-")
            })
            .count()
    };
    assert_eq!(unpacked(), 1, "the model is unpacked under TMPDIR");

    let warm = runtime_api::invoke(
        &api,
        &tx,
        "warm",
        http_api_event("warm", &json!({"data": [0, 1]})),
        60,
    )
    .await;
    assert_eq!(warm["statusCode"], 200, "{warm}");

    // An invocation whose forward pass is still running when SIGTERM arrives.
    let (reply_tx, reply_rx) = oneshot::channel();
    api.waiting
        .lock()
        .unwrap()
        .insert("in-flight".into(), reply_tx);
    tx.send((
        "in-flight".into(),
        http_api_event("in-flight", &json!({"data": [60_000, 7]})),
    ))
    .unwrap();
    wait_for("the function to take the invocation", 30, || {
        log.lock()
            .unwrap()
            .lines()
            .any(|l| l.contains("invocation received") && l.contains("in-flight"))
    })
    .await;
    let mut reply_rx = reply_rx;
    assert!(
        matches!(
            reply_rx.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        ),
        "answered before SIGTERM: the pass is too short to test with"
    );
    let signalled = sigterm(&child.0);

    let answer = match tokio::time::timeout(Duration::from_millis(budget_ms), reply_rx).await {
        Ok(answer) => answer.unwrap(),
        Err(_) => panic!(
            "the invocation in flight was not answered within {:?} of SIGTERM; the function's log:\n{}",
            signalled.elapsed(),
            log.lock().unwrap()
        ),
    };
    assert_eq!(answer["statusCode"], 200, "{answer}");
    let body: Value = serde_json::from_str(answer["body"].as_str().unwrap()).unwrap();
    assert_eq!(body, json!([14.0]));

    let status = exit_within(
        &mut child.0,
        signalled,
        Duration::from_millis(budget_ms + 1000),
    )
    .await;
    let took = signalled.elapsed();
    assert!(status.success(), "{status}");
    logging.join().unwrap();
    let log = log.lock().unwrap().clone();
    assert!(log.contains("SHUTDOWN complete"), "{log}");
    assert!(log.contains("unanswered=0"), "{log}");
    assert!(
        log.contains("threads_per_worker=1"),
        "OMP_NUM_THREADS=1 not honoured: {log}"
    );
    assert_eq!(unpacked(), 0, "the unpacked model is left in TMPDIR");
    eprintln!("SIGTERM to exit, one invocation in flight: {took:?}");
}

/// A Runtime API without the Extensions API (some local emulators): the registration fails
/// with a warning, the function serves as before, and SIGTERM still ends it cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_extensions_api_the_function_still_serves() {
    let (api, tx, addr) = runtime_api::start_without_extensions().await;
    // Three libtorch threads, a count the automatic choice never makes on a 2-core machine.
    let child = slow_function(addr)
        .env("OMP_NUM_THREADS", "3")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Kill(child);
    let answer = runtime_api::invoke(
        &api,
        &tx,
        "plain",
        http_api_event("plain", &json!({"data": [0, 4]})),
        120,
    )
    .await;
    assert_eq!(answer["statusCode"], 200, "{answer}");
    let body: Value = serde_json::from_str(answer["body"].as_str().unwrap()).unwrap();
    assert_eq!(body, json!([8.0]));
    assert!(api.extensions.lock().unwrap().is_empty());
    let signalled = sigterm(&child.0);
    let status = exit_within(&mut child.0, signalled, Duration::from_secs(10)).await;
    assert!(status.success(), "{status}");
    let mut log = String::new();
    std::io::Read::read_to_string(&mut child.0.stderr.take().unwrap(), &mut log).unwrap();
    assert!(
        log.contains("threads_per_worker=3"),
        "OMP_NUM_THREADS=3 not honoured: {log}"
    );
}

/// `--help` lists the settings with their environment variables, without starting anything.
#[test]
fn help_lists_the_settings() {
    common::assert_help_lists(
        env!("CARGO_BIN_EXE_torchfn-model"),
        &[
            "TORCHFN_MODEL_URI",
            "TORCHFN_MODEL_SHA256",
            "TORCHFN_REGISTRY",
            "TORCHFN_MODEL_NAME",
            "TORCHFN_MODEL_VERSION",
            "TORCHFN_HANDLER",
            "TORCHFN_PYTHON",
            "TORCHFN_BATCH_SIZE",
            "TORCHFN_MAX_BATCH_DELAY_MS",
            "TORCHFN_JOB_QUEUE_SIZE",
            "TORCHFN_DEVICE",
            "TORCHFN_SHUTDOWN_BUDGET_MS",
            "TORCHFN_POLL_SECONDS",
            "TORCHFN_HOST",
            "PORT",
        ],
    );
}
