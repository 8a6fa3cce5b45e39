//! `torchfn-load-floor`: the libtorch half of a real-size model's cold-start floor. A fresh
//! process that loads one TorchScript file with libtorch (tch, from the file, on the CPU), runs
//! one forward pass without autograd on a float32 input of ones, and exits. The benchmark
//! times it from spawn to exit and adds one plain GET of the archive: what no server can beat.
//!
//!     torchfn-load-floor MODEL.pt 1,3,224,224
//!
//! Prints one line: `load_ms=… forward_ms=… peak_rss_kib=… threads=…` (VmHWM at exit, and
//! libtorch's intra-op threads, its default: as many as torchfn gives one model worker).

use std::time::Instant;

use anyhow::Context;
use tch::{CModule, Device, Kind, Tensor};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(path), Some(shape)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: torchfn-load-floor MODEL.pt SHAPE (e.g. 1,3,224,224)");
    };
    let shape = shape
        .split(',')
        .map(|d| d.trim().parse::<i64>())
        .collect::<Result<Vec<_>, _>>()
        .context("SHAPE: comma-separated sizes")?;
    let started = Instant::now();
    let mut module = CModule::load_on_device(&path, Device::Cpu)
        .with_context(|| format!("could not load {path}"))?;
    module.set_eval();
    let load_ms = started.elapsed().as_secs_f64() * 1e3;
    let started = Instant::now();
    let out =
        tch::no_grad(|| module.forward_ts(&[Tensor::ones(shape, (Kind::Float, Device::Cpu))]))
            .context("forward failed")?;
    let forward_ms = started.elapsed().as_secs_f64() * 1e3;
    anyhow::ensure!(out.numel() > 0, "the model returned an empty tensor");
    let peak = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    println!(
        "load_ms={load_ms:.1} forward_ms={forward_ms:.1} peak_rss_kib={peak} threads={}",
        tch::get_num_threads()
    );
    Ok(())
}
