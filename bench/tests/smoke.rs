//! Runs `torchfn-bench --quick --litserve --against` (the build against itself) on the
//! emulator of this build (target/debug, built here when missing) and checks that the JSON it
//! writes has every section, with sane values. LitServe (about 15 s of the run) is installed
//! into the venv with pip on first use. No timing is asserted: CI machines vary; the figures
//! are for reading, not gating.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// `torchfn-local` beside this build's binaries, built with cargo when missing.
fn torchfn_local() -> PathBuf {
    let bench = Path::new(env!("CARGO_BIN_EXE_torchfn-bench"));
    let dir = bench.parent().unwrap();
    let local = dir.join("torchfn-local");
    if !local.exists() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", "torchfn-local"]);
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("could not run cargo");
        assert!(status.success(), "cargo build -p torchfn-local failed");
    }
    assert!(local.exists(), "{} is missing", local.display());
    local
}

fn num(v: &Value, key: &str) -> f64 {
    v.get(key)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("`{key}` is not a number in {v}"))
}

fn array<'a>(v: &'a Value, key: &str) -> &'a Vec<Value> {
    v.get(key)
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("`{key}` is not an array"))
}

#[test]
fn quick_run_writes_every_section() {
    let local = torchfn_local();
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("results.json");
    let run = Command::new(env!("CARGO_BIN_EXE_torchfn-bench"))
        .arg("--quick")
        .arg("--litserve")
        .arg("--torchfn-local")
        .arg(&local)
        // The build against itself: both serve and take turns.
        .arg("--against")
        .arg(&local)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "torchfn-bench --quick failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        stdout.contains("targets (issues 3, 4 and 18)"),
        "no table:\n{stdout}"
    );
    // What the measured CPU per answer allows the seed's concurrency-16 ratio.
    let bound = stdout
        .lines()
        .find(|l| l.starts_with("  seed c16 batching on: "))
        .unwrap_or_else(|| panic!("no CPU bound for seed c16:\n{stdout}"));
    assert!(
        bound.contains("against the HTTP floor's")
            && bound.contains("with every CPU busy (measured "),
        "{bound}"
    );
    // --quick makes and loads no real-size model.
    assert!(
        stdout.contains("real-size models: not run (--quick"),
        "{stdout}"
    );
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();

    assert_eq!(r["machine"]["device"], "cpu");
    assert!(num(&r["machine"], "nproc") >= 1.0);
    assert_eq!(r["settings"]["mode"], "quick");

    let floor = array(&r, "floor");
    assert_eq!(floor.len(), 4, "seed and wide at batch 1 and 32");
    for f in floor {
        assert!(num(f, "median_us") > 0.0, "{f}");
        assert!(num(f, "iterations") >= 20.0, "{f}");
    }

    let points = array(&r, "http_floor")
        .iter()
        .chain(array(&r, "torchfn"))
        .collect::<Vec<_>>();
    assert_eq!(
        array(&r, "torchfn").len(),
        8,
        "2 models × batching off/on × concurrency 1/16"
    );
    for p in points {
        assert_eq!(num(p, "errors"), 0.0, "errors at {p}");
        assert!(num(p, "requests") > 0.0, "{p}");
        assert!(num(p, "throughput_rps") > 0.0, "{p}");
        assert!(
            num(p, "p50_us") > 0.0 && num(p, "p50_us") <= num(p, "p99_us"),
            "{p}"
        );
    }
    for p in array(&r, "torchfn") {
        assert!(
            num(p, "mean_batch_size") >= 1.0,
            "torchfn's headers read: {p}"
        );
    }
    // --against: per model and concurrency, rounds in which both builds answered.
    let against = array(&r, "against");
    assert_eq!(against.len(), 4, "2 models × concurrency 1/16");
    for t in against {
        let rounds = array(t, "rounds");
        assert_eq!(rounds.len(), 3, "{t}");
        for pair in rounds {
            assert!(
                pair[0].as_f64() > Some(0.0) && pair[1].as_f64() > Some(0.0),
                "{t}"
            );
        }
    }
    assert!(
        stdout.contains("\nagainst "),
        "no --against section:\n{stdout}"
    );
    // The throughput targets' floors taking turns with torchfn: at concurrency 1 and 16 only
    // the seed's c16 target has one, and its verdict is judged on the turns.
    let floor_turns = array(&r, "floor_turns");
    assert_eq!(floor_turns.len(), 1, "seed c16 only: {floor_turns:?}");
    let t = &floor_turns[0];
    assert!(
        t["model"] == "seed"
            && t["concurrency"] == 16
            && t["other"] == "HTTP floor (torchfn stack)",
        "{t}"
    );
    let rounds = array(t, "rounds");
    assert_eq!(rounds.len(), 3, "{t}");
    assert!(
        rounds
            .iter()
            .all(|p| p[0].as_f64() > Some(0.0) && p[1].as_f64() > Some(0.0)),
        "{t}"
    );
    let c16 = stdout
        .lines()
        .find(|l| l.contains("seed c16 throughput ≥ 80% of the HTTP floor"))
        .unwrap_or_default();
    assert!(
        c16.contains("taking turns (median of 3 rounds, ") && c16.contains("one after the other "),
        "the seed c16 target is not judged on the turns: `{c16}`"
    );
    assert!(
        stdout.contains("\nthe throughput targets' floors taking turns with torchfn"),
        "no floor turns section:\n{stdout}"
    );
    // The seed archive's own handler.py through the Python backend, batching on.
    let python = array(&r, "python_backend");
    assert_eq!(python.len(), 2, "concurrency 1/16");
    for p in python {
        assert_eq!(num(p, "errors"), 0.0, "errors at {p}");
        assert!(num(p, "throughput_rps") > 0.0, "{p}");
        assert!(num(p, "mean_batch_size") >= 1.0, "{p}");
    }

    let cold = array(&r, "cold_start");
    assert_eq!(cold.len(), 1);
    let c = &cold[0];
    let total = num(c, "total_ms");
    assert!(total > 0.0);
    assert!(
        num(c, "spawn_to_bind_ms") > 0.0 && num(c, "spawn_to_bind_ms") <= total,
        "{c}"
    );
    assert!(num(c, "bind_to_model_loaded_ms") >= 0.0, "{c}");
    assert!(c["model_loaded_fields"].get("load_ms").is_some(), "{c}");

    let rss = array(&r, "torchfn_rss");
    assert_eq!(rss.len(), 4);
    for x in rss {
        assert!(num(x, "peak_rss_kib") > 10_000.0, "{x}");
    }

    assert!(r["torchserve"].is_null());
    assert_eq!(r["torchserve_skipped"], "--quick");
    // LitServe, both models, batching off and on: each server answers what torchfn answers
    // before its load. It may be skipped only where pip cannot install it.
    let litserve = &r["litserve"];
    if litserve.is_null() {
        let why = r["litserve_skipped"].as_str().unwrap();
        assert!(why.starts_with("pip could not install"), "LitServe: {why}");
    } else {
        let checks = array(litserve, "answer_checks");
        assert_eq!(checks.len(), 4, "2 models × batching off/on");
        for c in checks {
            assert_eq!(c["same"], true, "{c}");
        }
        let points = array(litserve, "points");
        assert_eq!(
            points.len(),
            8,
            "2 models × batching off/on × concurrency 1/16"
        );
        for p in points {
            assert_eq!(num(p, "errors"), 0.0, "errors at {p}");
            assert!(num(p, "throughput_rps") > 0.0, "{p}");
        }
        assert!(num(litserve, "rss_total_kib") > 10_000.0, "{litserve}");
    }
    assert!(r["large"].is_null());
    assert!(r["large_skipped"]
        .as_str()
        .is_some_and(|s| s.starts_with("--quick")));
    // The functions' figures: the model function's cold start from a local S3 server, and
    // the large archive fetched from both local S3 servers.
    let functions = &r["functions"];
    assert!(
        functions.is_object(),
        "no functions section: {}",
        r["functions_skipped"]
    );
    for c in array(functions, "cold_start") {
        assert!(
            num(c, "total_ms") >= num(c, "ready_ms") && num(c, "ready_ms") > 0.0,
            "{c}"
        );
    }
    let series = array(functions, "fetch");
    let servers: Vec<&str> = series
        .iter()
        .map(|s| s["server"].as_str().unwrap())
        .collect();
    assert_eq!(servers, ["s3s-fs", "moto_server"]);
    for s in series {
        assert!(num(s, "archive_bytes") > 1e6, "{s}");
        assert!(
            num(s, "raw_get_mb_s") > 0.0 && num(s, "fetch_unpack_mb_s") > 0.0,
            "{s}"
        );
    }

    // Where the time goes: torchfn's Server-Timing phases at concurrency 1 and 16, per
    // model and batching, each with its total and the client's view.
    let breakdown = array(&r, "breakdown");
    assert_eq!(
        breakdown.len(),
        8,
        "2 models × batching off/on × concurrency 1/16"
    );
    for b in breakdown {
        let phases: Vec<&str> = array(b, "phases_us")
            .iter()
            .map(|p| p[0].as_str().unwrap())
            .collect();
        assert_eq!(phases.first(), Some(&"route"), "{b}");
        assert_eq!(phases.last(), Some(&"total"), "{b}");
        assert!(num(b, "client_mean_us") > 0.0, "{b}");
    }
    // Both HTTP floors, and the CPU each torchfn point cost the server.
    let floors: Vec<&str> = array(&r, "http_floor")
        .iter()
        .map(|p| p["server"].as_str().unwrap())
        .collect();
    assert!(
        floors.contains(&"http-floor") && floors.contains(&"axum-floor"),
        "{floors:?}"
    );
    for p in array(&r, "torchfn") {
        assert!(num(p, "server_cpu_us_per_request") > 0.0, "{p}");
    }

    let targets = array(&r, "targets");
    assert_eq!(targets.len(), 12);
    for t in targets {
        assert!(t["target"].is_string() && t["measured"].is_string(), "{t}");
    }
}
