//! The machine the benchmark ran on, and what `/proc` says about the processes it started.

use std::collections::BTreeMap;

use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    /// Where the models ran: `cpu`, or the GPU's index, name, memory and driver.
    pub device: String,
    /// CPUs this process may use (what `nproc` prints).
    pub nproc: usize,
    pub cpu_model: String,
    pub memory_gib: f64,
    pub kernel: String,
    /// libtorch's intra-op threads for one model worker.
    pub torch_threads: i32,
    /// `/proc/loadavg` when the run started.
    pub load_average_at_start: String,
    /// Share of all CPUs busy during half a second before the run: other work on the
    /// machine skews every figure.
    pub cpu_busy_before_pct: Option<f64>,
}

pub fn describe(device: tch::Device) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let memory_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| status_field_kib(&m, "MemTotal:"))
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    torchfn_engine::session::set_threads(torchfn_engine::session::threads_per_worker(1));
    Machine {
        device: match device {
            tch::Device::Cuda(i) => format!("cuda:{i} ({})", gpu_name(i)),
            _ if torchfn_engine::session::nvidia_gpu_present() => {
                "cpu (an NVIDIA GPU is present: --device cuda measures on it)".into()
            }
            _ => "cpu".into(),
        },
        nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu_model,
        memory_gib: memory_kib as f64 / (1024.0 * 1024.0),
        kernel,
        torch_threads: tch::get_num_threads(),
        load_average_at_start: load_average(),
        cpu_busy_before_pct: cpu_busy_pct(std::time::Duration::from_millis(500)),
    }
}

/// `nvidia-smi`'s name, memory and driver of GPU `index`, or "unnamed" where it does not
/// answer.
fn gpu_name(index: usize) -> String {
    std::process::Command::new("nvidia-smi")
        .arg(format!("--id={index}"))
        .args([
            "--query-gpu=name,memory.total,driver_version",
            "--format=csv,noheader",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unnamed".into())
}

/// The 1, 5 and 15 minute load averages.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Busy and total jiffies of all CPUs (the `cpu` line of /proc/stat).
fn cpu_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let idle = v.get(3)? + v.get(4).unwrap_or(&0);
    let total: u64 = v.iter().take(8).sum();
    Some((total - idle, total))
}

/// Percentage of all CPUs busy over `sample` (while this process waits).
pub fn cpu_busy_pct(sample: std::time::Duration) -> Option<f64> {
    let (b0, t0) = cpu_jiffies()?;
    std::thread::sleep(sample);
    let (b1, t1) = cpu_jiffies()?;
    (t1 > t0).then(|| 100.0 * (b1 - b0) as f64 / (t1 - t0) as f64)
}

/// A `Name:   123 kB` field of a `/proc` status-like file, in KiB.
fn status_field_kib(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Peak resident set size (VmHWM) of a process, in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status_field_kib(&status, "VmHWM:")
}

/// A process's command name (`/proc/PID/comm`).
pub fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Parent pid and process group of every live process (zombies left out), from
/// `/proc/PID/stat`.
fn process_table() -> BTreeMap<u32, (u32, u32)> {
    let mut table = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return table;
    };
    for entry in dir.filter_map(Result::ok) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The command name is in parentheses and may hold spaces; the fields after it
        // are: state, ppid, pgrp, ...
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.first() == Some(&"Z") {
            continue;
        }
        if let (Some(ppid), Some(pgrp)) = (
            fields.get(1).and_then(|v| v.parse().ok()),
            fields.get(2).and_then(|v| v.parse().ok()),
        ) {
            table.insert(pid, (ppid, pgrp));
        }
    }
    table
}

/// Every descendant of `root` (children, their children, ...), not `root` itself.
pub fn descendants(root: u32) -> Vec<u32> {
    let table = process_table();
    let mut found = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for (&pid, &(ppid, _)) in &table {
            if ppid == p && !found.contains(&pid) {
                found.push(pid);
                frontier.push(pid);
            }
        }
    }
    found
}

/// Processes still alive in process group `pgid`.
pub fn group_members(pgid: u32) -> Vec<u32> {
    process_table()
        .into_iter()
        .filter(|(_, (_, g))| *g == pgid)
        .map(|(pid, _)| pid)
        .collect()
}
