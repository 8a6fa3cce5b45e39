//! The micro-batcher through `torchfn-local` over real HTTP: list requests spread over
//! several forward passes in order, requests sharing a pass, one bad request failing alone,
//! 503 on a full queue, callers that went away skipped, and the response timeout.
//!
//! The `slow` fixture model spins for the `work` its instances ask for (`[work, value]` →
//! `[value * 2]`), so a test can keep the model busy while requests queue behind it.

#![allow(clippy::unwrap_used)]

use torchfn_test_support::{self as common, server};

use std::time::{Duration, Instant};

use common::fixtures;
use serde_json::{json, Value};
use server::{sample, Server};

/// About a second of work on this machine (~6 µs an iteration).
const BUSY: u64 = 150_000;

/// These tests time a busy worker against queued requests; they run one at a time so that
/// several servers do not compete for the machine's cores.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn slow_server(
    extra_config: &str,
) -> (
    Server,
    tempfile::TempDir,
    std::sync::MutexGuard<'static, ()>,
) {
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.properties");
    std::fs::write(
        &config,
        format!(
            "inference_address=http://127.0.0.1:0\nmanagement_address=http://127.0.0.1:0\n\
             metrics_address=http://127.0.0.1:0\nbatch_size=4\nmax_batch_delay=50\n\
             job_queue_size=3\ndefault_response_timeout=600\n{extra_config}"
        ),
    )
    .unwrap();
    let slow = fixtures().join("slow/slow.mar");
    let server = Server::start(&[
        "--models",
        &format!("slow={}", slow.display()),
        "--ts-config",
        config.to_str().unwrap(),
    ])
    .wait_healthy();
    (server, dir, guard)
}

fn passes(server: &Server) -> f64 {
    sample(
        &server.metrics_text(),
        "torchfn_batch_size_count",
        &[("model_name", "slow")],
    )
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn pending(server: &Server) -> u64 {
    let (_, d) = server.get(format!("{}/models/slow", server.management));
    d[0]["jobQueueStatus"]["pendingRequests"].as_u64().unwrap()
}

#[test]
fn a_list_longer_than_the_batch_is_spread_over_passes_in_order() {
    let (server, _dir, _serial) = slow_server("");
    let before = passes(&server);
    let items: Vec<Value> = (1..=10).map(|v| json!([0, v])).collect();
    let (status, body, _) = server.predict("slow", json!({"instances": items}).to_string());
    assert_eq!(status, 200, "{body}");
    let want: Vec<Value> = (1..=10).map(|v| json!([f64::from(v) * 2.0])).collect();
    assert_eq!(body, Value::Array(want));
    // batch_size=4: 4 + 4 + 2.
    assert_eq!(passes(&server) - before, 3.0);
    let (status, body, headers) = server.predict("slow", json!({"data": [0, 7]}).to_string());
    assert_eq!((status, body), (200, json!([14.0])));
    assert_eq!(headers["x-torchfn-batch-size"], "1");
    // Over max_instances_per_request (1000 by default): refused whole with 400.
    let many: Vec<Value> = (0..1001).map(|_| json!([0, 1])).collect();
    let (status, body, _) = server.predict("slow", json!({"instances": many}).to_string());
    assert_eq!(status, 400, "{body}");
    assert!(body["message"]
        .as_str()
        .unwrap()
        .contains("max_instances_per_request"));
}

#[test]
fn waiting_requests_share_a_pass_and_a_bad_one_fails_alone() {
    let (server, _dir, _serial) = slow_server("");
    std::thread::scope(|s| {
        let before = passes(&server);
        let busy = s.spawn(|| server.predict("slow", json!({"data": [BUSY, 1]}).to_string()));
        wait_until("the busy pass to start", || passes(&server) > before);
        let a = s.spawn(|| server.predict("slow", json!({"data": [0, 3]}).to_string()));
        let c =
            s.spawn(|| server.predict("slow", json!({"instances": [[0, 4], [0, 5]]}).to_string()));
        let b = s.spawn(|| server.predict("slow", json!({"data": [0, 1, 2]}).to_string()));
        wait_until("three queued requests", || pending(&server) == 3);
        assert_eq!(busy.join().unwrap().0, 200);
        let (status, body, headers) = a.join().unwrap();
        assert_eq!((status, &body), (200, &json!([6.0])));
        // A and C's two instances went through one forward pass.
        assert_eq!(headers["x-torchfn-batch-size"], "3");
        let (status, body, headers) = c.join().unwrap();
        assert_eq!((status, body), (200, json!([[8.0], [10.0]])));
        assert_eq!(headers["x-torchfn-batch-size"], "3");
        let (status, body, _) = b.join().unwrap();
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["type"], "BadRequestException");
        assert!(body["message"]
            .as_str()
            .unwrap()
            .contains("the model cannot take this input"));
    });
}

#[test]
fn a_full_queue_answers_503_at_once_and_loses_nothing_accepted() {
    let (server, _dir, _serial) = slow_server("");
    std::thread::scope(|s| {
        let before = passes(&server);
        let busy = s.spawn(|| server.predict("slow", json!({"data": [BUSY, 1]}).to_string()));
        wait_until("the busy pass to start", || passes(&server) > before);
        let queued: Vec<_> = (1..=3)
            .map(|v| {
                let server = &server;
                s.spawn(move || server.predict("slow", json!({"data": [0, v]}).to_string()))
            })
            .collect();
        wait_until("three queued requests", || pending(&server) == 3);
        let (status, body, _) = server.predict("slow", json!({"data": [0, 9]}).to_string());
        // At once: while the busy pass still runs, not after the queue drained.
        assert!(!busy.is_finished(), "503 was not immediate");
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["type"], "ServiceUnavailableException");
        assert!(body["message"]
            .as_str()
            .unwrap()
            .contains("job queue is full"));
        assert_eq!(busy.join().unwrap().0, 200);
        for (v, h) in (1..=3).zip(queued) {
            let (status, body, _) = h.join().unwrap();
            assert_eq!((status, body), (200, json!([f64::from(v) * 2.0])));
        }
    });
}

#[test]
fn a_caller_that_went_away_costs_no_forward_pass() {
    let (server, _dir, _serial) = slow_server("");
    let abandoned = |server: &Server| {
        sample(
            &server.metrics_text(),
            "torchfn_requests_abandoned_total",
            &[("model_name", "slow")],
        )
    };
    std::thread::scope(|s| {
        let before = passes(&server);
        let busy = s.spawn(|| server.predict("slow", json!({"data": [BUSY, 1]}).to_string()));
        wait_until("the busy pass to start", || passes(&server) > before);
        let impatient = reqwest::blocking::Client::builder()
            .timeout(Duration::from_millis(300))
            .build()
            .unwrap();
        let gone = impatient
            .post(format!("{}/predictions/slow", server.inference))
            .body(json!({"data": [0, 5]}).to_string())
            .send();
        assert!(gone.is_err(), "the impatient client should have timed out");
        assert_eq!(busy.join().unwrap().0, 200);
    });
    let before = passes(&server);
    let (status, _, _) = server.predict("slow", json!({"data": [0, 2]}).to_string());
    assert_eq!(status, 200);
    // Only the follow-up request cost a pass; the abandoned one was skipped.
    assert_eq!(passes(&server) - before, 1.0);
    assert_eq!(abandoned(&server), 1.0);
}

#[test]
fn the_response_timeout_bounds_a_request() {
    let (server, _dir, _serial) = slow_server("default_response_timeout=1\n");
    let started = Instant::now();
    // A pass of about 30 s on an idle machine (longer on a busy one): the ceilings below are
    // a third of it, so they hold however slow the machine is, and still prove that neither
    // answer waited for the pass.
    let (status, body, _) = server.predict("slow", json!({"data": [20 * BUSY, 1]}).to_string());
    let took = started.elapsed();
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["type"], "InternalServerException");
    assert!(body["message"]
        .as_str()
        .unwrap()
        .contains("response timeout"));
    assert!(took < Duration::from_secs(10), "answered after {took:?}");
    // The pass cannot be cancelled and runs on for seconds; the next request detaches that
    // worker and a replacement answers it. On a busy machine the replacement's start (its
    // first pass shares the CPUs with the stuck one) can itself outlast the 1 s timeout, so a
    // request that times out while it starts is asked again: the answer must still come long
    // before the stuck pass ends.
    let started = Instant::now();
    let answer = loop {
        let (status, body, _) = server.predict("slow", json!({"data": [0, 4]}).to_string());
        let timed_out = status == 500
            && body["message"]
                .as_str()
                .is_some_and(|m| m.contains("response timeout"));
        if !timed_out || started.elapsed() >= Duration::from_secs(10) {
            break (status, body);
        }
    };
    assert_eq!((answer.0, &answer.1), (200, &json!([8.0])));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "answered after {:?}: the stuck worker was not replaced",
        started.elapsed()
    );
    let text = server.metrics_text();
    assert!(
        server::sample(
            &text,
            "torchfn_stuck_workers_total",
            &[("model_name", "slow")]
        ) >= 1.0,
        "{text}"
    );
}

#[test]
fn sigterm_answers_requests_in_flight_and_queued_then_exits() {
    let (mut server, _dir, _serial) = slow_server("");
    let addr = server.inference.trim_start_matches("http://").to_string();
    std::thread::scope(|s| {
        let before = passes(&server);
        let busy = s.spawn(|| server.predict("slow", json!({"data": [BUSY, 1]}).to_string()));
        wait_until("the busy pass to start", || passes(&server) > before);
        let queued = s.spawn(|| server.predict("slow", json!({"data": [0, 3]}).to_string()));
        wait_until("a queued request", || pending(&server) == 1);
        common::signal::process(&server.child, common::signal::Signal::TERM).unwrap();
        // The listener closes at once: a new client is refused...
        wait_until("the listener to close", || {
            std::net::TcpStream::connect(&addr).is_err()
        });
        // ...while the request being computed and the one queued behind it are answered.
        let (status, body, _) = busy.join().unwrap();
        assert_eq!((status, body), (200, json!([2.0])));
        let (status, body, _) = queued.join().unwrap();
        assert_eq!((status, body), (200, json!([6.0])));
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "still running after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "{exit:?}");
}

#[test]
fn server_timing_says_where_a_prediction_spent_its_time_when_asked() {
    let (server, _dir, _serial) = slow_server("");
    // Not asked: no Server-Timing.
    let (status, _, headers) = server.predict("slow", json!({"data": [0, 1]}).to_string());
    assert_eq!(status, 200);
    assert!(headers.get("server-timing").is_none());
    // Asked: every phase in order, the forward pass (about a tenth of a second of work)
    // most of the total, and the total inside what the client waited.
    let sent = Instant::now();
    let r = server
        .client
        .post(format!("{}/predictions/slow", server.inference))
        .header("content-type", "application/json")
        .header("x-torchfn-timing", "1")
        .body(json!({"data": [BUSY / 10, 2]}).to_string())
        .send()
        .unwrap();
    let waited_ms = sent.elapsed().as_secs_f64() * 1e3;
    assert_eq!(r.status(), 200);
    let timing = r.headers()["server-timing"].to_str().unwrap().to_string();
    assert_eq!(r.json::<Value>().unwrap(), json!([4.0]));
    let phases: Vec<(String, f64)> = timing
        .split(", ")
        .map(|p| {
            let (name, ms) = p.split_once(";dur=").unwrap();
            (name.to_string(), ms.parse().unwrap())
        })
        .collect();
    let names: Vec<&str> = phases.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "route", "read", "decode", "queue", "batch", "pre", "forward", "post", "wake",
            "encode", "total"
        ],
        "{timing}"
    );
    let ms = |name: &str| phases.iter().find(|(n, _)| n == name).unwrap().1;
    let parts: f64 = phases[..10].iter().map(|(_, v)| v).sum();
    assert!(ms("forward") > 0.5 * ms("total"), "{timing}");
    assert!(parts <= ms("total") + 0.01, "{timing}");
    assert!(
        ms("total") <= waited_ms,
        "{timing}, client waited {waited_ms} ms"
    );
}
