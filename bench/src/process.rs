//! A server process started by the benchmark: its output lines, timestamped as they arrive
//! (the phases of a cold start are read from them), and a clean stop.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rustix::process::{kill_process, kill_process_group, Pid, Signal};

/// One line a server printed, and when the benchmark read it.
#[derive(Debug)]
pub struct Line {
    pub at: Instant,
    pub stdout: bool,
    pub text: String,
}

/// Picks the lines worth sending to the benchmark (the rest are only kept in the tail).
pub type Filter = fn(&str) -> bool;

pub struct Spawned {
    child: Child,
    /// Taken just before the process was created.
    pub started: Instant,
    lines: Receiver<Line>,
    tail: Arc<Mutex<VecDeque<String>>>,
    /// Whether the process leads its own process group (stopped as a group).
    group: bool,
}

const TAIL_LINES: usize = 60;

impl Spawned {
    /// Starts `cmd` with its output piped and drained by two threads. With `group`, the
    /// process leads a new process group, so that it and its children stop together.
    pub fn spawn(mut cmd: Command, filter: Filter, group: bool) -> anyhow::Result<Self> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if group {
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("could not start {:?}", cmd.get_program()))?;
        let (tx, rx) = mpsc::channel();
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        if let Some(out) = child.stdout.take() {
            drain(out, true, tx.clone(), tail.clone(), filter);
        }
        if let Some(err) = child.stderr.take() {
            drain(err, false, tx, tail.clone(), filter);
        }
        Ok(Self {
            child,
            started,
            lines: rx,
            tail,
            group,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next line that passed the filter, waiting at most `timeout`.
    pub fn next_line(&self, timeout: Duration) -> Option<Line> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// The exit status, if the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The last lines the process printed, for error messages.
    pub fn tail(&self) -> String {
        self.tail
            .lock()
            .map(|t| t.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }

    /// SIGTERM (to the whole group when there is one), then SIGKILL after `grace`; returns
    /// once the process (and its group) is gone.
    pub fn stop(&mut self, grace: Duration) {
        let pid = self.child.id();
        if self.exited().is_none() {
            signal(Signal::TERM, pid, self.group);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && !self.gone(pid) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if !self.gone(pid) {
            signal(Signal::KILL, pid, self.group);
            let _ = self.child.kill();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && !self.gone(pid) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.wait();
    }

    fn gone(&mut self, pid: u32) -> bool {
        let exited = self.exited().is_some();
        exited && (!self.group || crate::machine::group_members(pid).is_empty())
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let pid = self.child.id();
        if !self.gone(pid) {
            self.stop(Duration::from_secs(5));
        }
    }
}

/// Sends `sig` to `pid`, or to the process group `pid` leads when `group` (one this benchmark
/// created). kill(2) through rustix: a minimal Debian has no kill(1), and the workspace
/// forbids unsafe code.
fn signal(sig: Signal, pid: u32, group: bool) {
    let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) else {
        return;
    };
    let _ = if group {
        kill_process_group(pid, sig)
    } else {
        kill_process(pid, sig)
    };
}

fn drain(
    stream: impl Read + Send + 'static,
    stdout: bool,
    tx: Sender<Line>,
    tail: Arc<Mutex<VecDeque<String>>>,
    filter: Filter,
) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let at = Instant::now();
            let text = String::from_utf8_lossy(&buf).trim_end().to_string();
            if filter(&text) {
                let _ = tx.send(Line {
                    at,
                    stdout,
                    text: text.clone(),
                });
            }
            if let Ok(mut t) = tail.lock() {
                if t.len() == TAIL_LINES {
                    t.pop_front();
                }
                t.push_back(text);
            }
        }
    });
}
