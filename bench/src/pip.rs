//! The peers' Python packages in the project's venv: installed with pip on first use, at the
//! version the benchmark pins.

use std::path::Path;
use std::process::Command;

/// The version of `package` installed in `venv`, if any.
pub fn installed_version(venv: &Path, package: &str) -> Option<String> {
    let out = Command::new(venv.join("bin/python"))
        .args([
            "-c",
            &format!("import importlib.metadata as m; print(m.version('{package}'))"),
        ])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Makes sure `package==version` is installed in `venv`, with pip when it is not; the
/// reason, with pip's last line, when it cannot be.
pub fn ensure(venv: &Path, package: &str, version: &str) -> Result<(), String> {
    if installed_version(venv, package).as_deref() == Some(version) {
        return Ok(());
    }
    eprintln!(
        "bench: installing {package}=={version} into {}",
        venv.display()
    );
    let out = Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .arg(format!("{package}=={version}"))
        .output()
        .map_err(|e| format!("could not run pip: {e}"))?;
    match installed_version(venv, package) {
        Some(v) if v == version => Ok(()),
        found => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let last = stderr.lines().rev().find(|l| !l.trim().is_empty());
            Err(format!(
                "pip could not install {package}=={version} into {} ({}{})",
                venv.display(),
                found.map_or_else(|| "not installed".into(), |v| format!("{v} installed")),
                last.map_or_else(String::new, |l| format!("; pip: {}", l.trim()))
            ))
        }
    }
}
