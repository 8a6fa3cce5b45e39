//! The libtorch floor: the model's forward pass in this process through torchfn's own
//! `Session` (no HTTP, no queue, no JSON), timed one call at a time. On a GPU each call
//! includes what serving adds around the pass: the batch's copy from pinned host memory to
//! the device and the output's copy back, which also waits for the pass to finish.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tch::{Device, Kind, Tensor};
use torchfn_archive::settings::Precision;
use torchfn_engine::handler::to_device;
use torchfn_engine::session::{set_threads, warm_up_and_pick_threads, Session};

use crate::load::percentile;

#[derive(Clone, Debug, Serialize)]
pub struct FloorResult {
    pub model: String,
    pub batch: usize,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// fp32, or the reduced precision the pass ran in (CUDA only).
    pub precision: String,
    pub iterations: usize,
    /// The first forward after loading (libtorch's JIT profiles and optimises it).
    pub first_forward_us: f64,
    pub median_us: f64,
    pub p99_us: f64,
    /// Median per instance (median over batch).
    pub per_instance_us: f64,
}

/// Times `Session::forward` on a `[batch, features]` input until `budget` is spent (at
/// least 20 calls, at most 200,000), after a warm-up of a tenth of the budget.
pub fn measure(
    model: &str,
    path: &Path,
    features: i64,
    batch: usize,
    budget: Duration,
    device: Device,
    precision: Precision,
) -> anyhow::Result<FloorResult> {
    let passes = Passes::load(path, features, batch, device, precision)?;
    set_threads(passes.threads);
    let pass = || passes.pass();
    let t = Instant::now();
    let _first = pass().with_context(|| format!("forward of {model} failed"))?;
    let first_forward_us = t.elapsed().as_secs_f64() * 1e6;

    let warm_until = Instant::now() + budget / 10;
    let mut warm = 0;
    while warm < 5 || Instant::now() < warm_until {
        let _out = pass()?;
        warm += 1;
    }
    let mut times = Vec::new();
    let until = Instant::now() + budget;
    while (times.len() < 20 || Instant::now() < until) && times.len() < 200_000 {
        let t = Instant::now();
        let out = pass()?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
        drop(out);
    }
    times.sort_by(f64::total_cmp);
    let median = percentile(&times, 0.5);
    Ok(FloorResult {
        model: model.to_string(),
        batch,
        device: device_name(device),
        precision: format!("{:?}", passes.session.precision()).to_lowercase(),
        iterations: times.len(),
        first_forward_us,
        median_us: median,
        p99_us: percentile(&times, 0.99),
        per_instance_us: median / batch as f64,
    })
}

/// `cpu` or `cuda:N`, as torchfn's `--device` takes it.
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".into(),
    }
}

/// A model loaded for floor passes: its intra-op threads picked as a model's only worker
/// gets them, a random `[batch, features]` input. [`measure`] times single passes; as one side
/// of a comparison taking turns ([`crate::turns`]), each window is a run of passes on the
/// calling thread.
pub struct Passes {
    session: Session,
    input: Tensor,
    device: Device,
    batch: usize,
    threads: usize,
}

impl Passes {
    pub fn load(
        path: &Path,
        features: i64,
        batch: usize,
        device: Device,
        precision: Precision,
    ) -> anyhow::Result<Self> {
        let session = Session::load_with(path, device, precision)
            .with_context(|| format!("could not load {}", path.display()))?;
        // The same intra-op thread policy as a model's only worker.
        let (threads, _) = warm_up_and_pick_threads(&session, 1, batch, 0);
        let input = Tensor::randn([batch as i64, features], (Kind::Float, Device::Cpu));
        Ok(Self {
            session,
            input,
            device,
            batch,
            threads,
        })
    }

    /// One pass as a served batch makes it: host batch → device → forward → host.
    fn pass(&self) -> anyhow::Result<Tensor> {
        let out = self
            .session
            .forward(&to_device(self.input.shallow_clone(), self.device)?)?;
        Ok(out.f_to_device(Device::Cpu)?)
    }

    /// Instances per second over `window` of passes, after `warmup` of them; at least one
    /// pass each.
    pub fn window(&self, warmup: Duration, window: Duration) -> anyhow::Result<f64> {
        set_threads(self.threads);
        let until = Instant::now() + warmup;
        let _ = self.pass()?;
        while Instant::now() < until {
            let _ = self.pass()?;
        }
        let started = Instant::now();
        let mut passes = 0usize;
        while passes == 0 || started.elapsed() < window {
            let _ = self.pass()?;
            passes += 1;
        }
        Ok((passes * self.batch) as f64 / started.elapsed().as_secs_f64())
    }
}
