//! Shared by torchfn's integration tests (a dev-dependency of every package that has some):
//! the fixtures made by real PyTorch and the real torch-model-archiver (`tests/fixtures/make_fixtures.py`, and for the built-in handlers
//! `tests/fixtures/make_handler_fixtures.py`), each built once per script version into
//! `target/fixtures-<hash>` / `target/handler-fixtures-<hash>` and reused by every test binary.

#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

pub mod archive;
pub mod moto;
pub mod runtime_api;
pub mod server;
pub mod signal;

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The package whose tests run: cargo's `CARGO_MANIFEST_DIR` read when the test runs (cargo
/// sets it), not when it was built. `scripts/test` judges freshness by content, so a test
/// binary built in another clone of the repository is reused, and a path baked in at build
/// time names that clone.
pub fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// The repository root: the first folder above the running package that holds `scripts/setup`.
pub fn repo_root() -> PathBuf {
    manifest_dir()
        .ancestors()
        .find(|d| d.join("scripts/setup").exists())
        .unwrap()
        .to_path_buf()
}

/// A command for a tool that runs cargo (cargo itself, cargo-lambda, SAM), without the
/// variables cargo sets for this test process (`CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, ...).
/// Build scripts read some of them (ring's reads `CARGO_MANIFEST_DIR`): passed on, they would
/// make the inner build's dependencies differ from the outer one's, and each would rebuild
/// what the other built, in every clean clone.
pub fn cargo_tool(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let per_package = [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_BIN_",
            "CARGO_CRATE_",
        ]
        .iter()
        .any(|prefix| key.starts_with(prefix))
            || matches!(
                key,
                "CARGO_PRIMARY_PACKAGE" | "CARGO_TARGET_TMPDIR" | "CARGO_RUSTC_CURRENT_DIR"
            );
        if per_package {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// One HTTP request head (up to the blank line) read from a proxy's client, byte by byte so
/// nothing after it is consumed; `None` when the client closed first.
pub fn read_request_head(client: &mut impl std::io::Read) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match client.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    Some(head)
}

/// `tests/fixtures/small`: the few tiny archives checked in (made by
/// `tests/fixtures/make_small_fixtures` from one run of `make_fixtures.py`), for tests that
/// should run without the Python venv or libtorch: the same layout as [`fixtures`]
/// (`formats/…`, `store/classifier.mar`, `store/scripted.mar`, `store/conv.mar`,
/// `v2/classifier.mar`, `eager/eager.mar`, `models/model_scripted.pt`).
pub fn small_fixtures() -> PathBuf {
    repo_root().join("tests/fixtures/small")
}

/// Runs `bin --help` and asserts that it succeeds and names every one of `names` (a
/// function's settings and their environment variables).
pub fn assert_help_lists(bin: &str, names: &[&str]) {
    let help = Command::new(bin).arg("--help").output().unwrap();
    assert!(help.status.success());
    let text = String::from_utf8(help.stdout).unwrap();
    for name in names {
        assert!(text.contains(name), "{name} not in:\n{text}");
    }
}

/// The folder holding the fixtures, made on first use.
pub fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| make_fixtures("make_fixtures.py", "fixtures"))
}

/// The folder holding the built-in handlers' fixtures (images, MARs for image_classifier,
/// image_segmenter, object_detector, text_classifier and base_handler output cases, .npy
/// inputs), made on first use by `tests/fixtures/make_handler_fixtures.py`.
pub fn handler_fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| make_fixtures("make_handler_fixtures.py", "handler-fixtures"))
}

/// A command from one of the tool venvs `scripts/setup` makes beside the project's
/// (`venv-sam-1.170.0`, `venv-schemathesis-4.32.5`): `<cache>/<venv>/bin/<command>`.
pub fn tool(venv: &str, command: &str) -> PathBuf {
    let path = venv_python()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .with_file_name(venv)
        .join("bin")
        .join(command);
    assert!(
        path.exists(),
        "{} is missing: run scripts/setup",
        path.display()
    );
    path
}

/// A path as the `&str` command-line arguments take (test paths are UTF-8).
pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// The project venv's Python, installed by `scripts/setup` when missing.
pub fn venv_python() -> PathBuf {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        let out = Command::new(repo_root().join("scripts/setup"))
            .output()
            .expect("could not run scripts/setup");
        assert!(
            out.status.success(),
            "scripts/setup failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8(out.stdout).unwrap();
        let venv = stdout
            .lines()
            .last()
            .expect("scripts/setup printed no venv path");
        PathBuf::from(venv.trim()).join("bin/python")
    })
    .clone()
}

/// Runs `tests/fixtures/<script> OUT_DIR` once per script content into
/// `<target>/<prefix>-<hash>`, and returns that folder.
fn make_fixtures(script_name: &str, prefix: &str) -> PathBuf {
    let root = repo_root();
    let script = root.join("tests/fixtures").join(script_name);
    let text = std::fs::read(&script).unwrap();
    let mut h = DefaultHasher::new();
    text.hash(&mut h);
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let dir = target.join(format!("{prefix}-{:016x}", h.finish()));
    if dir.join("reference.json").exists() {
        return dir;
    }
    std::fs::create_dir_all(&target).unwrap();
    // Build beside the final folder and rename into place, so a concurrent test process
    // never sees a half-made set.
    let tmp = target.join(format!("{prefix}.tmp.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let status = Command::new(venv_python())
        .arg(&script)
        .arg(&tmp)
        .status()
        .expect("could not run the fixture script");
    assert!(status.success(), "tests/fixtures/{script_name} failed");
    if std::fs::rename(&tmp, &dir).is_err() {
        // Another test process finished first; its copy is the same.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    assert!(dir.join("reference.json").exists());
    dir
}

/// `reference.json`, the outputs Python torch computed for the fixture inputs.
pub fn reference() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The handler fixtures' `reference.json`: what TorchServe 0.12's own handler classes (and
/// Python torch) computed for them.
pub fn handler_reference() -> serde_json::Value {
    let text = std::fs::read_to_string(handler_fixtures().join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Asserts two JSON values are equal, numbers within `tol` relative (absolute below 1).
pub fn assert_json_close(got: &serde_json::Value, want: &serde_json::Value, tol: f64, at: &str) {
    if let Some(diff) = json_diff(got, want, tol, at) {
        panic!("{diff}");
    }
}

/// Whether two JSON values are equal, numbers within `tol` relative (absolute below 1).
pub fn json_close(got: &serde_json::Value, want: &serde_json::Value, tol: f64) -> bool {
    json_diff(got, want, tol, "").is_none()
}

/// The first difference between two JSON values, if any.
fn json_diff(
    got: &serde_json::Value,
    want: &serde_json::Value,
    tol: f64,
    at: &str,
) -> Option<String> {
    use serde_json::Value::*;
    match (got, want) {
        (Number(g), Number(w)) => {
            let (g, w) = (g.as_f64()?, w.as_f64()?);
            let err = (g - w).abs() / w.abs().max(1.0);
            (err > tol).then(|| format!("{at}: got {g}, want {w} (error {err:e} > {tol:e})"))
        }
        (Array(g), Array(w)) => {
            if g.len() != w.len() {
                return Some(format!("{at}: array lengths differ: {got} vs {want}"));
            }
            g.iter()
                .zip(w)
                .enumerate()
                .find_map(|(i, (g, w))| json_diff(g, w, tol, &format!("{at}[{i}]")))
        }
        (Object(g), Object(w)) => {
            let gk: Vec<_> = g.keys().collect();
            let wk: Vec<_> = w.keys().collect();
            if gk != wk {
                return Some(format!("{at}: keys differ: {gk:?} vs {wk:?}"));
            }
            w.iter()
                .find_map(|(k, w)| json_diff(&g[k], w, tol, &format!("{at}.{k}")))
        }
        _ => (got != want).then(|| format!("{at}: got {got}, want {want}")),
    }
}
