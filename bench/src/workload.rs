//! The two models the benchmark serves and the request each gets, and the fixtures they
//! come from (made by `tests/fixtures/make_fixtures.py` with real PyTorch and the real
//! torch-model-archiver).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use hyper::body::Bytes;
use serde_json::{json, Value};

/// One model under test.
#[derive(Clone, Debug)]
pub struct Workload {
    /// `seed` (the getting-started SimpleClassifier: HTTP overhead dominates) or `wide`
    /// (256 → 4096 → 4096 → 10: compute dominates, batching pays).
    pub label: &'static str,
    /// The name it is served under.
    pub model: &'static str,
    /// Its archive in the fixture store.
    pub mar: &'static str,
    /// The built-in torchfn serves it with, when the manifest names a Python handler.
    pub torchfn_handler: Option<&'static str>,
    /// Its TorchScript file under `models/`, for the in-process floor.
    pub torchscript: &'static str,
    pub features: i64,
    /// The POST body of one prediction.
    pub body: Bytes,
}

impl Workload {
    pub fn path(&self) -> String {
        format!("/predictions/{}", self.model)
    }
}

/// The seed classifier (`{"features": [10 numbers]}`) and the wide MLP (a JSON array of
/// 256 numbers), with the inputs of `reference.json`.
pub fn workloads(fixtures: &Path) -> anyhow::Result<Vec<Workload>> {
    let path = fixtures.join("reference.json");
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(&path)
            .with_context(|| format!("could not read {}", path.display()))?,
    )?;
    let seed = reference
        .get("seed_features")
        .context("reference.json has no seed_features")?;
    let wide = reference
        .get("wide_input")
        .context("reference.json has no wide_input")?;
    Ok(vec![
        Workload {
            label: "seed",
            model: "classifier",
            mar: "classifier.mar",
            torchfn_handler: Some("classifier"),
            torchscript: "model_scripted.pt",
            features: 10,
            body: Bytes::from(serde_json::to_vec(&json!({ "features": seed }))?),
        },
        Workload {
            label: "wide",
            model: "wide",
            mar: "wide.mar",
            torchfn_handler: None,
            torchscript: "wide_scripted.pt",
            features: 256,
            body: Bytes::from(serde_json::to_vec(wide)?),
        },
    ])
}

/// The project's venv (torch, torch-model-archiver): `--venv`, else what `scripts/setup`
/// prints on its last line (it installs the venv when missing).
pub fn venv(repo: &Path, given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(v) = given {
        return Ok(v);
    }
    let out = Command::new(repo.join("scripts/setup"))
        .output()
        .context("could not run scripts/setup")?;
    if !out.status.success() {
        bail!(
            "scripts/setup failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stdout = String::from_utf8(out.stdout)?;
    let last = stdout
        .lines()
        .last()
        .context("scripts/setup printed no venv path")?;
    Ok(PathBuf::from(last.trim()))
}

/// The fixtures, made once per version of the fixture script into
/// `<target>/bench-fixtures-<hash>` (or the folder given).
pub fn fixtures(repo: &Path, target: &Path, venv: &Path) -> anyhow::Result<PathBuf> {
    made_by(repo, target, venv, "make_fixtures.py", "bench-fixtures")
}

/// What `tests/fixtures/<script>` makes, once per version of the script, into
/// `<target>/<prefix>-<hash>`.
pub fn made_by(
    repo: &Path,
    target: &Path,
    venv: &Path,
    script: &str,
    prefix: &str,
) -> anyhow::Result<PathBuf> {
    let script = repo.join("tests/fixtures").join(script);
    let text =
        std::fs::read(&script).with_context(|| format!("could not read {}", script.display()))?;
    let mut h = DefaultHasher::new();
    text.hash(&mut h);
    let dir = target.join(format!("{prefix}-{:016x}", h.finish()));
    if dir.join("reference.json").exists() {
        return Ok(dir);
    }
    std::fs::create_dir_all(target)?;
    // Made beside the final folder and renamed into place, so a run that is cut short
    // leaves no half-made set behind.
    let tmp = target.join(format!("{prefix}.tmp.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    eprintln!(
        "bench: making fixtures with real PyTorch ({}) into {}",
        script.display(),
        dir.display()
    );
    let out = Command::new(venv.join("bin/python"))
        .arg(&script)
        .arg(&tmp)
        .output()
        .context("could not run the fixture script")?;
    if !out.status.success() {
        bail!(
            "{} failed:\n{}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if std::fs::rename(&tmp, &dir).is_err() {
        // Another run finished first; its copy is the same.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    Ok(dir)
}
