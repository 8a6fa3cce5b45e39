//! Signals for the processes a test started, sent with kill(2) through rustix: a minimal
//! Debian has no kill(1) (it comes with procps), and the workspace forbids unsafe code.

use std::process::Child;

pub use rustix::process::Signal;
use rustix::process::{kill_process, kill_process_group, Pid};

/// Sends `sig` to `child`.
pub fn process(child: &Child, sig: Signal) -> std::io::Result<()> {
    Ok(kill_process(Pid::from_child(child), sig)?)
}

/// Sends `sig` to the process group `child` leads (it was started with `process_group(0)`).
pub fn group(child: &Child, sig: Signal) -> std::io::Result<()> {
    Ok(kill_process_group(Pid::from_child(child), sig)?)
}

/// Sends `sig` to process group `pgid` (a child's id, for a child started with
/// `process_group(0)` and since handed to another thread).
pub fn group_by_id(pgid: u32, sig: Signal) -> std::io::Result<()> {
    let pid = i32::try_from(pgid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| std::io::Error::other(format!("{pgid} is not a process id")))?;
    Ok(kill_process_group(pid, sig)?)
}

/// Whether process group `pgid` still has a process that has not exited (zombies, which
/// only wait to be reaped, do not count), read from /proc.
pub fn group_running(pgid: u32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|entry| {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            return false;
        };
        // `pid (comm) state ppid pgrp ...`; comm may hold spaces and parentheses.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            return false;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next();
        let pgrp = fields.nth(1).and_then(|f| f.parse::<u32>().ok());
        pgrp == Some(pgid) && state != Some("Z")
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::process::CommandExt;

    #[test]
    fn a_group_runs_until_its_process_ends() {
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .process_group(0)
            .spawn()
            .unwrap();
        let pgid = child.id();
        assert!(group_running(pgid));
        group(&child, Signal::KILL).unwrap();
        // Killed but not yet reaped (a zombie) or reaped: either way no longer running.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while group_running(pgid) {
            assert!(
                std::time::Instant::now() < deadline,
                "group {pgid} still runs"
            );
            std::thread::yield_now();
        }
        child.wait().unwrap();
        assert!(!group_running(pgid));
    }
}
