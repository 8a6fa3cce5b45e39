//! The Python backend against TorchServe's real worker (`ts/model_service_worker.py` from the
//! project venv's `torchserve` package): a handler in a model folder made here, batches,
//! a crash, a hang past the response timeout, a handler error, a failed load, and a Python
//! without the package.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use torchfn_python::{
    Backend, Failure, Input, Pool, PoolConfig, Request, WorkerConfig, WorkerError,
};

const HANDLER: &str = r#"
import json, os, time

def handle(data, context):
    if data is None:  # initialize
        return None
    out = []
    for row in data:
        body = row.get("body")
        if isinstance(body, (bytes, bytearray)):
            body = body.decode()
        if body == "crash":
            os._exit(3)
        if body == "hang":
            time.sleep(3600)
        if body == "fail":
            raise ValueError("bad input")
        out.append({"echo": body, "batch": len(data), "pid": os.getpid(),
                    "model": context.model_name})
    return out
"#;

fn model_dir(handler_file: &str, handler_text: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("MAR-INF")).unwrap();
    std::fs::write(
        dir.path().join("MAR-INF/MANIFEST.json"),
        format!(
            r#"{{"runtime": "python", "model": {{"modelName": "echo", "handler": "{handler_file}", "modelVersion": "1.0"}}, "archiverVersion": "0.12.0"}}"#
        ),
    )
    .unwrap();
    std::fs::write(dir.path().join(handler_file), handler_text).unwrap();
    dir
}

fn config(dir: &Path, handler: &str, batch_size: usize) -> WorkerConfig {
    WorkerConfig {
        python: torchfn_test_support::venv_python(),
        model_name: "echo".into(),
        model_dir: dir.to_path_buf(),
        handler: handler.into(),
        batch_size,
        gpu: None,
        envelope: String::new(),
        limit_max_image_pixels: true,
        startup_timeout: Duration::from_secs(120),
        port: 9000,
        env: Vec::new(),
        metrics_config: None,
        metrics: None,
    }
}

fn pool(dir: &Path, workers: usize, batch_size: usize, delay: Duration, timeout: Duration) -> Pool {
    let backend = Backend::find(&torchfn_test_support::venv_python()).expect("the venv has ts");
    Pool::start(
        backend,
        PoolConfig {
            worker: config(dir, "echo_handler.py", batch_size),
            workers,
            max_batch_delay: delay,
            queue_size: 100,
            response_timeout: timeout,
            max_retry_timeout: Duration::from_secs(300),
        },
    )
    .expect("the pool starts")
}

fn request(id: &str, body: &str) -> Request {
    Request {
        id: id.into(),
        headers: vec![("content-type".into(), b"text/plain".to_vec())],
        inputs: vec![Input {
            name: "body".into(),
            content_type: "text/plain".into(),
            value: body.as_bytes().to_vec(),
        }],
    }
}

fn answer(pool: &Pool, id: &str, body: &str) -> Result<serde_json::Value, Failure> {
    let rx = pool.submit(request(id, body))?;
    let outcome = rx.blocking_recv().expect("every request is answered");
    let response = outcome.result?;
    assert_eq!(response.request_id, id);
    assert_eq!(response.status, 200);
    Ok(serde_json::from_slice(&response.body).expect("the handler's JSON"))
}

#[test]
fn the_real_worker_answers_a_batch_each_request_its_own_answer() {
    let dir = model_dir("echo_handler.py", HANDLER);
    // A batch closes when it is full, so a long delay costs nothing here.
    let pool = pool(
        dir.path(),
        1,
        3,
        Duration::from_secs(30),
        Duration::from_secs(60),
    );
    assert_eq!(pool.live_workers(), 1);
    let rxs: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|b| pool.submit(request(&format!("id-{b}"), b)).unwrap())
        .collect();
    for (b, rx) in ["a", "b", "c"].iter().zip(rxs) {
        let outcome = rx.blocking_recv().unwrap();
        assert_eq!(outcome.batch_size, 3);
        let response = outcome.result.unwrap();
        assert_eq!(response.request_id, format!("id-{b}"));
        // TorchServe's json.dumps(value, indent=2), byte for byte.
        let text = String::from_utf8(response.body).unwrap();
        assert!(text.starts_with("{\n  \"echo\": "), "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["echo"], *b);
        assert_eq!(v["batch"], 3);
        assert_eq!(v["model"], "echo");
    }
}

#[test]
fn a_crashed_or_hung_worker_fails_its_batch_and_is_replaced() {
    let dir = model_dir("echo_handler.py", HANDLER);
    let pool = pool(dir.path(), 1, 1, Duration::ZERO, Duration::from_secs(3));
    let first_pid = answer(&pool, "1", "ok").unwrap()["pid"].clone();

    let err = answer(&pool, "2", "crash").unwrap_err();
    assert_eq!(
        err,
        Failure {
            status: 500,
            message: "Worker died.".into()
        }
    );
    let second_pid = answer(&pool, "3", "ok").unwrap()["pid"].clone();
    assert_ne!(
        first_pid, second_pid,
        "a new process serves after the crash"
    );

    let started = Instant::now();
    let err = answer(&pool, "4", "hang").unwrap_err();
    assert_eq!(err.status, 500);
    assert!(started.elapsed() >= Duration::from_secs(3));
    let third_pid = answer(&pool, "5", "ok").unwrap()["pid"].clone();
    assert_ne!(second_pid, third_pid, "the hung process was replaced");

    // A handler's exception is the batch's 503; the worker stays.
    let err = answer(&pool, "6", "fail").unwrap_err();
    assert_eq!(
        err,
        Failure {
            status: 503,
            message: "Prediction failed".into()
        }
    );
    assert_eq!(answer(&pool, "7", "ok").unwrap()["pid"], third_pid);
}

#[test]
fn a_hung_request_leaves_the_other_workers_serving() {
    let dir = model_dir("echo_handler.py", HANDLER);
    let pool = pool(dir.path(), 2, 1, Duration::ZERO, Duration::from_secs(8));
    let hung = pool.submit(request("h", "hang")).unwrap();
    // The other worker answers while the first one hangs.
    for i in 0..3 {
        answer(&pool, &format!("ok-{i}"), "ok").unwrap();
    }
    // Closing waits for the hung batch's time-out: it is answered, not dropped.
    drop(pool);
    let outcome = hung.blocking_recv().unwrap();
    assert_eq!(
        outcome.result.unwrap_err(),
        Failure {
            status: 500,
            message: "Worker died.".into()
        }
    );
}

#[test]
fn a_load_that_fails_says_why() {
    let dir = model_dir("echo_handler.py", "import a_module_that_is_not_installed\n");
    let backend = Backend::find(&torchfn_test_support::venv_python()).unwrap();
    let err = Pool::start(
        backend,
        PoolConfig {
            worker: config(dir.path(), "echo_handler.py", 1),
            workers: 1,
            max_batch_delay: Duration::ZERO,
            queue_size: 10,
            response_timeout: Duration::from_secs(10),
            max_retry_timeout: Duration::from_secs(300),
        },
    )
    .err()
    .expect("the load fails");
    let text = err.to_string();
    assert!(text.contains("a_module_that_is_not_installed"), "{text}");
}

#[test]
fn a_python_without_torchserve_is_named_with_the_fix() {
    let err = Backend::find(Path::new("/nonexistent/python3")).unwrap_err();
    assert!(matches!(err, WorkerError::NoPython { .. }), "{err}");
    assert!(err.to_string().contains("TORCHFN_PYTHON"), "{err}");

    // An interpreter that runs but has no `ts`: a venv of its own without packages.
    let venv = tempfile::tempdir().unwrap();
    let base = PathBuf::from("python3");
    let made = std::process::Command::new(&base)
        .args(["-m", "venv", "--without-pip"])
        .arg(venv.path())
        .status()
        .unwrap();
    assert!(made.success());
    let err = Backend::find(&venv.path().join("bin/python")).unwrap_err();
    assert!(matches!(err, WorkerError::NoTorchServe { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("pip install torchserve"), "{text}");
    assert!(text.contains("No module named 'ts'"), "{text}");
}
