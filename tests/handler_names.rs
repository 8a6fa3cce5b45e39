//! One list of handler names (`torchfn_archive::handlers`): the emulator's `--help` and the
//! README name every built-in handler from it, so adding a handler without documenting it
//! fails here.

use std::process::Command;

use torchfn_archive::handlers;

#[test]
fn help_lists_every_builtin_handler() {
    let out = Command::new(env!("CARGO_BIN_EXE_torchfn-local"))
        .arg("--help")
        .output()
        .expect("torchfn-local --help runs");
    assert!(out.status.success());
    // clap wraps long help lines: compare with whitespace collapsed.
    let help: String = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    for name in handlers::names() {
        assert!(
            help.contains(name),
            "--help does not name `{name}`:\n{help}"
        );
    }
}

#[test]
fn readme_names_every_builtin_handler() {
    let readme = std::fs::read_to_string(torchfn_test_support::repo_root().join("README.md"))
        .expect("README.md reads");
    for name in handlers::names() {
        assert!(
            readme.contains(&format!("`{name}`")),
            "README.md does not name the built-in handler `{name}`"
        );
    }
}
