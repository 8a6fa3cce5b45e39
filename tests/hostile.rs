//! Hostile clients against `torchfn-local` over real TCP on loopback: bodies over
//! `max_request_size` (413 without reading them), slow-loris headers and bodies (closed or
//! 408 after the configured timeouts), header floods (431), deeply nested JSON, NaN and
//! infinite numbers, thousands of instances, unknown routes and methods. Throughout, another
//! client's predictions are all answered correctly.

#![allow(clippy::unwrap_used)]

use torchfn_test_support::{self as common, server};

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{assert_json_close, fixtures, reference};
use serde_json::{json, Value};
use server::Server;

/// The seed classifier with 1 s header and body timeouts and a 1 MB request limit.
fn server() -> Server {
    let fx = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.properties");
    std::fs::write(
        &config,
        "inference_address=http://127.0.0.1:0\nmanagement_address=http://127.0.0.1:0\n\
         metrics_address=http://127.0.0.1:0\nmax_request_size=1000000\n",
    )
    .unwrap();
    let server = Server::start_with_env(
        &[
            "--model-store",
            fx.join("store").to_str().unwrap(),
            "--models",
            "classifier=classifier.mar",
            "--handler",
            "classifier=classifier",
            "--ts-config",
            config.to_str().unwrap(),
        ],
        &[
            ("TORCHFN_HEADER_TIMEOUT_S", "1"),
            ("TORCHFN_BODY_TIMEOUT_S", "1"),
        ],
    )
    .wait_healthy();
    drop(dir);
    server
}

fn addr(server: &Server) -> String {
    server.inference.trim_start_matches("http://").to_string()
}

/// Sends raw bytes, then reads until the server answers or closes (at most `wait`).
fn raw(server: &Server, request: &[u8], wait: Duration) -> (Option<u16>, String, Duration) {
    let started = Instant::now();
    let mut s = TcpStream::connect(addr(server)).unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    let _ = s.write_all(request);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if let Some(end) = find(&buf, b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    let len = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        break;
                    }
                }
            }
            Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|t| t.get(..3))
        .and_then(|c| c.parse().ok());
    (status, text, started.elapsed())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn body_of(text: &str) -> Value {
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    serde_json::from_str(body).unwrap_or(Value::Null)
}

/// Runs `attack` while another client predicts in a loop; every one of its predictions must
/// be answered 200 with the right output.
fn while_serving(server: &Server, attack: impl FnOnce()) {
    let reference = reference();
    let body = json!({"features": reference["seed_features"]}).to_string();
    let want = reference["classifier_single"].clone();
    let stop = AtomicBool::new(false);
    let answered = AtomicUsize::new(0);
    std::thread::scope(|s| {
        let client = s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let (status, got, _) = server.predict("classifier", body.clone());
                assert_eq!(status, 200, "{got}");
                assert_json_close(&got, &want, 1e-5, "prediction during the attack");
                answered.fetch_add(1, Ordering::Relaxed);
            }
        });
        attack();
        stop.store(true, Ordering::Relaxed);
        client.join().unwrap();
    });
    assert!(answered.load(Ordering::Relaxed) > 0);
}

#[test]
fn oversized_bodies_are_refused_without_being_read() {
    let server = server();
    while_serving(&server, || {
        // A declared length over the limit: 413 at once, the body never sent.
        let head = b"POST /predictions/classifier HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000000\r\n\r\n{\"features\"";
        let (status, text, took) = raw(&server, head, Duration::from_secs(5));
        assert_eq!(status, Some(413), "{text}");
        assert_eq!(body_of(&text)["code"], 413, "{text}");
        assert!(took < Duration::from_secs(2), "{took:?}");
        // Chunked, no length: refused once the limit is passed, not after 20 MB.
        let mut s = TcpStream::connect(addr(&server)).unwrap();
        s.write_all(b"POST /predictions/classifier HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
        // Read on another thread while writing, so the answer is taken before the server's
        // close resets the connection.
        let mut reader = s.try_clone().unwrap();
        reader
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let answer = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            while let Ok(n) = reader.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                if find(&buf, b"\r\n\r\n").is_some() {
                    break;
                }
            }
            String::from_utf8_lossy(&buf).to_string()
        });
        s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        let chunk = format!("10000\r\n{}\r\n", "1".repeat(0x10000));
        let mut sent = 0usize;
        while sent < 20_000_000 {
            if s.write_all(chunk.as_bytes()).is_err() {
                break;
            }
            sent += 0x10000;
        }
        let text = answer.join().unwrap();
        assert!(
            text.starts_with("HTTP/1.1 413"),
            "{}",
            &text[..text.len().min(200)]
        );
        assert!(
            sent < 20_000_000,
            "the server read 20 MB of a body over its 1 MB limit"
        );
    });
}

#[test]
fn slow_clients_are_cut_off_and_others_served() {
    let server = server();
    while_serving(&server, || {
        // Slow loris: headers one byte at a time, never finished. Closed after the 1 s header
        // timeout.
        let started = Instant::now();
        let mut slow: Vec<TcpStream> = (0..20)
            .map(|_| {
                let mut s = TcpStream::connect(addr(&server)).unwrap();
                s.write_all(b"POST /predictions/classifier HTTP/1.1\r\nHost: x\r\n")
                    .unwrap();
                s
            })
            .collect();
        let mut closed = vec![false; slow.len()];
        while closed.iter().any(|c| !c) && started.elapsed() < Duration::from_secs(6) {
            for (s, c) in slow.iter_mut().zip(closed.iter_mut()) {
                if !*c && s.write_all(b"X").is_err() {
                    *c = true;
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        assert!(
            closed.iter().all(|c| *c),
            "slow-loris connections still open after {:?}",
            started.elapsed()
        );
        // A body that stops arriving: 408 after the 1 s body timeout.
        let head = b"POST /predictions/classifier HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"features\": [";
        let (status, text, took) = raw(&server, head, Duration::from_secs(5));
        assert_eq!(status, Some(408), "{text}");
        assert!(took < Duration::from_secs(4), "{took:?}");
    });
}

#[test]
fn malformed_and_oversized_requests_get_clear_errors() {
    let server = server();
    while_serving(&server, || {
        let predict = |body: String| server.predict("classifier", body);
        let nested = format!(
            "{{\"features\": {}1{}}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        for (body, needle) in [
            (nested, "not valid JSON"),
            ("{\"features\": [NaN, 1]}".to_string(), "not valid JSON"),
            ("{\"features\": [1e999]}".to_string(), "not valid JSON"),
            ("{\"features\": [Infinity]}".to_string(), "not valid JSON"),
            (
                "{\"features\": [3.5e38, 1e39]}".to_string(),
                "outside the float32 range",
            ),
            (
                json!({"instances": vec![json!({"features": vec![0.1; 10]}); 5000]}).to_string(),
                "the limit is 1000",
            ),
        ] {
            let (status, got, _) = predict(body);
            assert_eq!(status, 400, "{got}");
            assert_eq!(got["code"], 400);
            assert_eq!(got["type"], "BadRequestException");
            let message = got["message"].as_str().unwrap();
            assert!(message.contains(needle), "{needle:?} not in {message:?}");
        }
        // Unknown routes and methods.
        for (method, path, status) in [
            ("GET", "/nope", 404),
            ("GET", "/predictions", 404),
            ("DELETE", "/ping/x", 404),
            ("PATCH", "/v2/health/live", 405),
        ] {
            let req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
            let (got, text, _) = raw(&server, req.as_bytes(), Duration::from_secs(5));
            assert_eq!(got, Some(status), "{method} {path}: {text}");
            assert_eq!(body_of(&text)["code"], status, "{text}");
        }
        // Header floods: too many headers, or one huge header.
        let many: String = (0..150).map(|i| format!("X-Flood-{i}: {i}\r\n")).collect();
        let req = format!("GET /ping HTTP/1.1\r\nHost: x\r\n{many}\r\n");
        let (got, text, _) = raw(&server, req.as_bytes(), Duration::from_secs(5));
        assert_eq!(got, Some(431), "{text}");
        let req = format!(
            "GET /ping HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "a".repeat(200_000)
        );
        let (got, text, _) = raw(&server, req.as_bytes(), Duration::from_secs(5));
        assert_eq!(got, Some(431), "{}", &text[..text.len().min(200)]);
    });
}
