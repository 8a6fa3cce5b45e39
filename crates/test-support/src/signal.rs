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
