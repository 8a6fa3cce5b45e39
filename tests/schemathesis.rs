//! API fuzzing with schemathesis (PyPI, in its own venv made by scripts/setup) against the
//! emulator's own OpenAPI documents (`/api-description` on the inference and management
//! ports): generated requests for every documented operation, bounded in time, find no 5xx
//! and no status the document does not list.

#![allow(clippy::unwrap_used)]

use torchfn_test_support::{self as common, server};

use std::process::Command;

use common::fixtures;
use server::Server;

fn schemathesis() -> std::path::PathBuf {
    common::tool("venv-schemathesis-4.32.5", "st")
}

#[test]
fn generated_requests_find_no_server_errors() {
    let fx = fixtures();
    let server = Server::start(&[
        "--model-store",
        fx.join("store").to_str().unwrap(),
        "--models",
        "classifier=classifier.mar",
        "--handler",
        "classifier=classifier",
        "--ts-config",
        fx.join("config.properties").to_str().unwrap(),
    ])
    .wait_healthy();
    let scratch = tempfile::tempdir().unwrap();
    for base in [&server.inference, &server.management] {
        let out = Command::new(schemathesis())
            .args(["run", &format!("{base}/api-description"), "--url", base])
            .args([
                "--checks",
                "not_a_server_error,status_code_conformance,response_schema_conformance",
                "--phases",
                "examples,coverage,fuzzing",
                "--max-examples",
                "25",
                "--max-time",
                "30",
                "--workers",
                "2",
                "--seed",
                "20261125",
                "--request-timeout",
                "30",
                "--suppress-health-check",
                "all",
            ])
            .args(["--generation-database", "none"])
            .current_dir(scratch.path())
            .env("SCHEMATHESIS_TELEMETRY", "false")
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "schemathesis against {base}:\n{text}");
        let cases = text
            .lines()
            .skip_while(|l| !l.starts_with("Test cases:"))
            .nth(1)
            .unwrap_or("")
            .trim()
            .to_string();
        eprintln!("schemathesis against {base}: {cases}");
        // It tested something.
        assert!(text.contains("passed") || text.contains("Passed"), "{text}");
    }
    // The server is still up and serving.
    let (status, _) = server.get(format!("{}/ping", server.inference));
    assert_eq!(status, 200);
}
