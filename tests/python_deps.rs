//! The set-up installs every Python module the project's scripts import: `scripts/python-deps
//! check-imports` reads every `.py` file of the repository (fixture scripts, the converter, the
//! benchmark's handlers, the fuzz corpus script) and fails when one imports a module that
//! `scripts/python-requirements.txt` does not name after `# import:`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo_root() -> PathBuf {
    // The package's folder as cargo gives it when the test runs (see test-support's
    // `manifest_dir`: a binary built in another clone may be reused).
    PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("run by cargo test"))
        .ancestors()
        .find(|d| d.join("scripts/setup").exists())
        .expect("the repository root holds scripts/setup")
        .to_path_buf()
}

fn check_imports(requirements: &Path) -> Output {
    let root = repo_root();
    Command::new("python3")
        .arg(root.join("scripts/python-deps"))
        .arg("check-imports")
        .arg("--requirements")
        .arg(requirements)
        .arg(&root)
        .output()
        .expect("python3 runs scripts/python-deps")
}

#[test]
fn every_imported_module_is_in_the_setup_list() {
    let out = check_imports(&repo_root().join("scripts/python-requirements.txt"));
    assert!(
        out.status.success(),
        "a Python file imports a module scripts/setup does not install:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_list_without_pillow_is_caught() {
    let list = std::fs::read_to_string(repo_root().join("scripts/python-requirements.txt"))
        .expect("the requirements list reads");
    let without: String = list
        .lines()
        .filter(|l| !l.trim_start().starts_with("pillow"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(without, list, "the list names pillow");
    let dir = tempfile::tempdir().expect("a temporary folder");
    let path = dir.path().join("requirements.txt");
    std::fs::write(&path, without).expect("the trimmed list is written");
    let out = check_imports(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a list without pillow passed");
    assert!(
        stderr.contains("PIL is imported by"),
        "the failure names PIL: {stderr}"
    );
}
