//! A `torchfn-local` process for tests: started with flags, its printed addresses read,
//! its stderr kept in a file (printed when a test fails), killed on drop.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The `torchfn-local` binary cargo built beside the running test binary (tests of the
/// `torchfn-local` package, or a `--workspace` run, have it built first).
pub fn local_bin() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    // <target>/<profile>/deps/<test>-<hash>
    let bin = exe
        .parent()
        .and_then(std::path::Path::parent)
        .unwrap()
        .join("torchfn-local");
    assert!(
        bin.exists(),
        "{} is missing: run the test through `cargo test -p torchfn-local`",
        bin.display()
    );
    bin
}

/// A running emulator, killed on drop.
pub struct Server {
    pub child: Child,
    pub inference: String,
    pub management: String,
    pub metrics: String,
    pub client: reqwest::blocking::Client,
    pub log: std::path::PathBuf,
    _logdir: tempfile::TempDir,
}

impl Server {
    pub fn start(args: &[&str]) -> Server {
        Self::start_with_env(args, &[])
    }

    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Server {
        let logdir = tempfile::tempdir().unwrap();
        let log = logdir.path().join("stderr.log");
        let mut cmd = Command::new(local_bin());
        // Its working folder is its own (key_file.json lands there, not in the repository).
        cmd.args(args)
            .current_dir(logdir.path())
            .env_remove("TS_CONFIG_FILE")
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("torchfn-local did not start");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut addrs = std::collections::HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while addrs.len() < 3 {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(left).unwrap_or_else(|_| {
                panic!(
                    "torchfn-local printed no addresses; its log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            });
            if let Some((what, addr)) = line.split_once(" API bind to: ") {
                // A listener on all interfaces is reached on loopback.
                addrs.insert(what.to_string(), addr.replace("0.0.0.0", "127.0.0.1"));
            }
        }
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        Server {
            child,
            inference: addrs["Inference"].clone(),
            management: addrs["Management"].clone(),
            metrics: addrs["Metrics"].clone(),
            client,
            log,
            _logdir: logdir,
        }
    }

    /// Waits for /ping to say Healthy.
    pub fn wait_healthy(self) -> Self {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(r) = self.client.get(format!("{}/ping", self.inference)).send() {
                if r.status() == 200 {
                    let body: Value = r.json().unwrap();
                    assert_eq!(body, json!({"status": "Healthy"}));
                    return self;
                }
                assert_eq!(r.status(), 500, "ping before ready must be 500");
                let body: Value = r.json().unwrap();
                assert_eq!(body, json!({"status": "Unhealthy"}));
            }
            assert!(
                Instant::now() < deadline,
                "never healthy; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the server's log holds `needle` (a bounded poll of its log file).
    pub fn wait_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let log = self.log();
            if log.contains(needle) {
                return log;
            }
            assert!(Instant::now() < deadline, "`{needle}` never logged:\n{log}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The server's working folder (where it writes key_file.json).
    pub fn dir(&self) -> &std::path::Path {
        self._logdir.path()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn predict(
        &self,
        path: &str,
        body: impl Into<reqwest::blocking::Body>,
    ) -> (u16, Value, reqwest::header::HeaderMap) {
        let r = self
            .client
            .post(format!("{}/predictions/{path}", self.inference))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .unwrap();
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.text().unwrap();
        let value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("response is not JSON ({e}): {text}"));
        (status, value, headers)
    }

    pub fn get(&self, url: String) -> (u16, Value) {
        let r = self.client.get(url).send().unwrap();
        let status = r.status().as_u16();
        (status, r.json().unwrap())
    }

    pub fn metrics_text(&self) -> String {
        self.client
            .get(format!("{}/metrics", self.metrics))
            .send()
            .unwrap()
            .text()
            .unwrap()
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        crate::signal::process(&self.child, crate::signal::Signal::TERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("torchfn-local log:\n{}", self.log());
        }
    }
}

/// One sample's value (summed over matching label sets) from Prometheus text.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}
