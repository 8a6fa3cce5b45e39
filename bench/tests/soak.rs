//! The soak harness in its short form (10 s at concurrency 64 against this build's
//! emulator): every request is accounted for, none is lost, every answer is documented and
//! right, RSS does not grow by 10% once warm. The long form is
//! `target/release/torchfn-soak --seconds 180` (README, "Limits and guarantees").

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

#[test]
fn a_short_soak_loses_nothing() {
    let soak = Path::new(env!("CARGO_BIN_EXE_torchfn-soak"));
    let local = soak.with_file_name("torchfn-local");
    if !local.exists() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "torchfn-local"])
            .status()
            .unwrap();
        assert!(status.success());
    }
    let run = Command::new(soak)
        .args(["--seconds", "10", "--concurrency", "64", "--torchfn-local"])
        .arg(&local)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&run.stdout);
    eprintln!("{out}");
    assert!(
        run.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let line = out
        .lines()
        .find(|l| l.starts_with("lost (no answer)"))
        .unwrap();
    assert_eq!(line.split_whitespace().last(), Some("0"), "{out}");
    let sent: u64 = out
        .lines()
        .find(|l| l.starts_with("requests sent"))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(sent > 1000, "{out}");
}
