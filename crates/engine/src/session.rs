//! The libtorch seam: a TorchScript module loaded once per model version on its device, in
//! eval and no-grad mode. Every libtorch failure comes back as a `SessionError` value.

use std::path::Path;
use std::time::{Duration, Instant};

use tch::{CModule, Device, IValue, Kind, Tensor};

use torchfn_archive::model_config::DeviceType;
use torchfn_archive::settings::{DevicePreference, Precision};

/// A failure inside libtorch or around it.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("{0}")]
    Shape(String),
    #[error(
        "the model returned {got} rows for a batch of {sent}: number of batch response mismatched"
    )]
    BatchMismatch { sent: usize, got: usize },
    #[error("the model returned {0}, where this handler needs one tensor")]
    Output(&'static str),
    /// The model's output has a form the handler cannot answer with.
    #[error("{0}")]
    OutputForm(String),
    /// An instance the worker could not turn into model input (a corrupt image, say): the
    /// client's error (400).
    #[error("{0}")]
    Input(String),
    /// The model calls an operator this libtorch does not have.
    #[error("{0}")]
    Operator(String),
}

impl SessionError {
    /// The first line of a libtorch message (its backtraces are for the log, not clients).
    pub fn summary(&self) -> String {
        let text = self.to_string();
        text.lines().next().unwrap_or("").trim().to_string()
    }
}

/// What the model's first weight says about its input, used to tell a client that its
/// instance has the wrong size after a forward pass rejected it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputHint {
    /// Dimension counted from the end (1 = last) whose size the first layer fixes.
    pub dim_from_end: usize,
    pub size: i64,
}

/// A loaded TorchScript model.
pub struct Session {
    module: CModule,
    device: Device,
    precision: Precision,
    hint: Option<InputHint>,
}

pub use crate::libtorch::{cuda_available, load_cuda_backend, nvidia_gpu_present};

/// The device a model runs on, from the server's preference and the model's own
/// `deviceType` (model-config YAML). CUDA is used only when libtorch sees a GPU.
pub fn choose_device(pref: DevicePreference, model_device_type: Option<DeviceType>) -> Device {
    let cuda = match pref {
        DevicePreference::Cpu => false,
        DevicePreference::Auto if model_device_type == Some(DeviceType::Cpu) => false,
        _ => cuda_available(),
    };
    match pref {
        DevicePreference::Cpu => Device::Cpu,
        DevicePreference::Cuda(i) if cuda && (i as i64) < tch::Cuda::device_count() => {
            Device::Cuda(i)
        }
        DevicePreference::Cuda(i) => {
            tracing::warn!(
                device = i,
                "CUDA device requested but not available; using the CPU"
            );
            Device::Cpu
        }
        DevicePreference::Auto if model_device_type == Some(DeviceType::Cpu) => Device::Cpu,
        DevicePreference::Auto if cuda => Device::Cuda(0),
        DevicePreference::Auto => Device::Cpu,
    }
}

impl Session {
    /// Loads a TorchScript file on `device` in float32.
    pub fn load(path: &Path, device: Device) -> Result<Self, SessionError> {
        Self::load_with(path, device, Precision::Fp32)
    }

    /// Loads a TorchScript file on `device`; reduced `precision` applies on CUDA only.
    pub fn load_with(
        path: &Path,
        device: Device,
        precision: Precision,
    ) -> Result<Self, SessionError> {
        let started = Instant::now();
        let mut module = load_module(path, device)?;
        module.set_eval();
        let precision = if device.is_cuda() {
            precision
        } else {
            if precision != Precision::Fp32 {
                tracing::warn!(
                    ?precision,
                    "reduced precision applies to CUDA only; running float32 on the CPU"
                );
            }
            Precision::Fp32
        };
        if precision == Precision::Bf16 {
            module.to(device, Kind::BFloat16, false);
        }
        let hint = input_hint(&module);
        tracing::info!(
            path = %path.display(),
            ?device,
            ?precision,
            ?hint,
            load_ms = started.elapsed().as_secs_f64() * 1e3,
            "TorchScript module loaded"
        );
        Ok(Self {
            module,
            device,
            precision,
            hint,
        })
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    pub fn input_hint(&self) -> Option<InputHint> {
        self.hint
    }

    /// One forward pass without autograd over any positional inputs, returning whatever
    /// the model returns. Call it from a model worker thread only.
    ///
    /// Reduced precision (CUDA only): `bf16` casts the floating-point inputs to bfloat16 for
    /// the bfloat16 weights; `fp16` runs the pass under CUDA autocast (float16 where libtorch
    /// deems it safe, the weights kept in float32). Either way, floating-point outputs come
    /// back as float32, so handlers and clients see the same kinds as at full precision.
    pub fn run(&self, inputs: &[IValue]) -> Result<IValue, SessionError> {
        let _guard = tch::no_grad_guard();
        match self.precision {
            Precision::Fp32 => Ok(self.module.forward_is(inputs)?),
            Precision::Bf16 => {
                let inputs = inputs
                    .iter()
                    .map(|v| with_float_kind(v, Kind::BFloat16))
                    .collect::<Result<Vec<_>, _>>()?;
                with_float_kind(&self.module.forward_is(&inputs)?, Kind::Float)
            }
            Precision::Fp16 => {
                let out = tch::autocast(true, || self.module.forward_is(inputs))?;
                with_float_kind(&out, Kind::Float)
            }
        }
    }

    /// One forward pass without autograd. Call it from a model worker thread only.
    pub fn forward(&self, input: &Tensor) -> Result<Tensor, SessionError> {
        match self.run(&[IValue::Tensor(input.shallow_clone())])? {
            IValue::Tensor(t) => Ok(t),
            IValue::Tuple(_) => Err(SessionError::Output("a tuple")),
            IValue::GenericDict(_) => Err(SessionError::Output("a dict")),
            IValue::TensorList(_) | IValue::GenericList(_) => Err(SessionError::Output("a list")),
            _ => Err(SessionError::Output("a non-tensor value")),
        }
    }

    /// Runs two passes on a zero instance of the hinted size (the first pass of a TorchScript
    /// module profiles it, the second runs the optimised graph), so the first request does
    /// not pay for that, and returns the second pass's time. `None` when the model gives no
    /// hint of its input or the pass fails (a model may refuse zeros; its first request will
    /// tell the client).
    pub fn warm_up(&self) -> Option<Duration> {
        let hint = self.hint.filter(|h| h.dim_from_end == 1)?;
        let input = Tensor::f_zeros([1, hint.size], (Kind::Float, self.device)).ok()?;
        let mut took = Duration::ZERO;
        for _ in 0..2 {
            let started = Instant::now();
            if let Err(e) = self.forward(&input) {
                tracing::debug!(error = %e.summary(), "warm-up pass failed");
                return None;
            }
            took = started.elapsed();
        }
        Some(took)
    }

    /// Whether `shape` (one instance, without the batch dimension) contradicts the hint.
    pub fn rejects_shape(&self, shape: &[i64]) -> Option<String> {
        let hint = self.hint?;
        let got = shape.len().checked_sub(hint.dim_from_end).map(|i| shape[i]);
        match got {
            Some(n) if n == hint.size => None,
            Some(n) if hint.dim_from_end == 1 => Some(format!(
                "the instance has {n} values; the model takes {}",
                hint.size
            )),
            Some(n) => Some(format!(
                "dimension -{} of the instance is {n}; the model takes {}",
                hint.dim_from_end, hint.size
            )),
            None => Some(format!(
                "the instance has shape {shape:?}; the model takes at least {} dimensions",
                hint.dim_from_end
            )),
        }
    }
}

/// `value` with every floating-point tensor in it (nested in tuples, lists and dicts too)
/// converted to `kind`; other tensors and values as they are.
fn with_float_kind(value: &IValue, kind: Kind) -> Result<IValue, SessionError> {
    let tensor = |t: &Tensor| -> Result<Tensor, SessionError> {
        Ok(
            if t.defined() && t.f_is_floating_point()? && t.f_kind()? != kind {
                t.f_to_kind(kind)?
            } else {
                t.shallow_clone()
            },
        )
    };
    let all = |values: &[IValue]| -> Result<Vec<IValue>, SessionError> {
        values.iter().map(|v| with_float_kind(v, kind)).collect()
    };
    Ok(match value {
        IValue::Tensor(t) => IValue::Tensor(tensor(t)?),
        IValue::TensorList(ts) => {
            IValue::TensorList(ts.iter().map(tensor).collect::<Result<_, _>>()?)
        }
        IValue::Tuple(vs) => IValue::Tuple(all(vs)?),
        IValue::GenericList(vs) => IValue::GenericList(all(vs)?),
        IValue::GenericDict(kvs) => IValue::GenericDict(
            kvs.iter()
                .map(|(k, v)| Ok((with_float_kind(k, kind)?, with_float_kind(v, kind)?)))
                .collect::<Result<_, SessionError>>()?,
        ),
        IValue::None => IValue::None,
        IValue::Double(x) => IValue::Double(*x),
        IValue::Int(x) => IValue::Int(*x),
        IValue::Bool(x) => IValue::Bool(*x),
        IValue::IntList(x) => IValue::IntList(x.clone()),
        IValue::DoubleList(x) => IValue::DoubleList(x.clone()),
        IValue::BoolList(x) => IValue::BoolList(x.clone()),
        IValue::String(x) => IValue::String(x.clone()),
        IValue::StringList(x) => IValue::StringList(x.clone()),
        IValue::Device(d) => IValue::Device(*d),
        _ => {
            return Err(SessionError::OutputForm(
                "a TorchScript object, which reduced precision cannot convert".into(),
            ))
        }
    })
}

/// Loads a TorchScript file. A module that calls torchvision's operators (`torchvision::nms`,
/// `torchvision::roi_align`, ... in scripted detectors) gets torchvision's operator library
/// loaded first; any other operator libtorch lacks is named in the error.
fn load_module(path: &Path, device: Device) -> Result<CModule, SessionError> {
    let err = match CModule::load_on_device(path, device) {
        Ok(m) => return Ok(m),
        Err(e) => e,
    };
    let text = err.to_string();
    let Some(op) = missing_operator(&text) else {
        return Err(err.into());
    };
    if op.starts_with("torchvision::") {
        return match crate::torchvision::load_ops() {
            Ok(()) => Ok(CModule::load_on_device(path, device)?),
            Err(why) => Err(SessionError::Operator(format!(
                "the model calls `{op}`, which is not part of libtorch but of torchvision's \
                 operator library, and that could not be loaded: {why}"
            ))),
        };
    }
    Err(SessionError::Operator(format!(
        "the model calls `{op}`, an operator this libtorch does not provide (a custom \
         operator library the model was built with); torchfn loads torchvision's operators, \
         no others"
    )))
}

/// The operator named in libtorch's "Unknown builtin op: ns::name" load error.
fn missing_operator(text: &str) -> Option<String> {
    let rest = text.split("Unknown builtin op: ").nth(1)?;
    let op: String = rest
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':' || *c == '.')
        .collect();
    let op = op.trim_end_matches('.').to_string();
    (!op.is_empty()).then_some(op)
}

/// The first parameter of a module is, for the usual first layers, a weight whose dim 1 is
/// the input size: Linear `[out, in]` (input dim -1), Conv1d `[out, in, k]` (dim -2),
/// Conv2d `[out, in, kh, kw]` (dim -3).
fn input_hint(module: &CModule) -> Option<InputHint> {
    let params = module.named_parameters().ok()?;
    let (_, first) = params.first()?;
    let size = first.size();
    (size.len() >= 2).then(|| InputHint {
        dim_from_end: size.len() - 1,
        size: size[1],
    })
}

/// libtorch intra-op threads for each of `workers` model threads sharing the machine's
/// cores, at least one; `OMP_NUM_THREADS`, when set, instead (see [`configured_threads`]).
pub fn threads_per_worker(workers: usize) -> usize {
    configured_threads().unwrap_or_else(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores / workers.max(1)).max(1)
    })
}

/// The intra-op threads the user asked for each model thread, as PyTorch takes them: a
/// positive whole `OMP_NUM_THREADS`. Anything else is ignored (with a warning once), and the
/// threads are chosen as described in [`warm_up_and_pick_threads`].
pub fn configured_threads() -> Option<usize> {
    static CONFIGURED: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *CONFIGURED.get_or_init(|| {
        let value = std::env::var("OMP_NUM_THREADS").ok()?;
        match value.trim().parse::<usize>() {
            Ok(n) if n > 0 => Some(n),
            _ => {
                tracing::warn!(OMP_NUM_THREADS = %value, "not a positive whole number; ignored");
                None
            }
        }
    })
}

/// Longest time spent timing one thread count at warm-up (at least one pass is timed).
const THREAD_TIMING_BUDGET: Duration = Duration::from_millis(150);

/// Passes timed per thread count at warm-up (the fastest counts).
const THREAD_TIMING_PASSES: usize = 5;

/// Warms `session` up and picks the intra-op threads each of its `workers` model threads
/// gets, by measurement: `OMP_NUM_THREADS` when set; on a GPU, the fair share; otherwise a
/// batch of `batch_size` rows (at most 64) is timed at one thread and at the fair share of the
/// cores (the cores over this model's workers and `other_workers`, the model threads other
/// models already run), and the faster is kept — one thread unless the fair share is at
/// least 10% faster, since an idle OpenMP team spinning between passes takes a core from
/// the HTTP side. Models whose input cannot be made up (no input hint) get the fair share.
/// The choice and its timings are logged. Runs libtorch: call it from a blocking thread.
/// Returns the threads and the warm pass's time.
pub fn warm_up_and_pick_threads(
    session: &Session,
    workers: usize,
    batch_size: usize,
    other_workers: usize,
) -> (usize, Option<Duration>) {
    let fair_share = threads_per_worker(workers + other_workers);
    set_threads(fair_share);
    let warm = session.warm_up();
    if configured_threads().is_some() || session.device().is_cuda() || fair_share == 1 {
        return (fair_share, warm);
    }
    let Some(hint) = session
        .hint
        .filter(|h| h.dim_from_end == 1 && warm.is_some())
    else {
        return (fair_share, warm);
    };
    let rows = batch_size.clamp(1, 64) as i64;
    let Ok(input) = Tensor::f_zeros([rows, hint.size], (Kind::Float, session.device)) else {
        return (fair_share, warm);
    };
    let timed = |threads| {
        set_threads(threads);
        fastest_pass(session, &input)
    };
    let (Some(one), Some(shared)) = (timed(1), timed(fair_share)) else {
        set_threads(fair_share);
        return (fair_share, warm);
    };
    let threads = if shared.as_secs_f64() <= one.as_secs_f64() * 0.9 {
        fair_share
    } else {
        1
    };
    set_threads(threads);
    tracing::info!(
        threads,
        batch = rows,
        one_thread_us = one.as_micros() as u64,
        fair_share,
        fair_share_us = shared.as_micros() as u64,
        "intra-op threads chosen by timing a batch"
    );
    (threads, warm)
}

/// The fastest of up to [`THREAD_TIMING_PASSES`] forward passes on `input` (one untimed
/// first), within [`THREAD_TIMING_BUDGET`]; `None` when a pass fails.
fn fastest_pass(session: &Session, input: &Tensor) -> Option<Duration> {
    let _ = session.forward(input).ok()?;
    let started = Instant::now();
    let mut best = Duration::MAX;
    for _ in 0..THREAD_TIMING_PASSES {
        let t = Instant::now();
        let _ = session.forward(input).ok()?;
        best = best.min(t.elapsed());
        if started.elapsed() > THREAD_TIMING_BUDGET {
            break;
        }
    }
    Some(best)
}

/// Starts libtorch's own one-time set-up on a thread of its own, so that it runs while the
/// archive downloads and unpacks rather than before the first pass: CPU capability
/// detection, the allocator, the dispatcher's first lookups, BLAS and oneDNN initialisation
/// (a small matmul and a small convolution on zeros). Failures are ignored: the model's own
/// load reports anything that matters.
pub fn warm_libtorch_in_background() {
    let spawned = std::thread::Builder::new()
        .name("libtorch-init".into())
        .spawn(|| {
            let started = Instant::now();
            let _guard = tch::no_grad_guard();
            let opts = (Kind::Float, Device::Cpu);
            let done = Tensor::f_zeros([16, 16], opts)
                .and_then(|a| a.f_matmul(&a))
                .and_then(|_| Tensor::f_zeros([1, 3, 16, 16], opts))
                .and_then(|x| {
                    let w = Tensor::f_zeros([4, 3, 3, 3], opts)?;
                    x.f_conv2d(&w, None::<Tensor>, [1, 1], [1, 1], [1, 1], 1)
                })
                .is_ok();
            tracing::debug!(
                done,
                ms = started.elapsed().as_secs_f64() * 1e3,
                "libtorch set up in the background"
            );
        });
    if let Err(e) = spawned {
        tracing::debug!(error = %e, "no thread for libtorch's set-up; it happens on first use");
    }
}

/// Sets libtorch's intra-op threads for the calling thread (OpenMP and MKL keep the count
/// per thread).
pub fn set_threads(threads: usize) {
    tch::set_num_threads(threads.max(1) as i32);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Loading the CUDA backend on demand must not disturb a process that already uses
    /// libtorch, with or without a GPU.
    #[test]
    fn cuda_backend_loads_on_demand() {
        let before = Tensor::from_slice(&[1f32, 2.0])
            .sum(Kind::Float)
            .double_value(&[]);
        let loaded = load_cuda_backend();
        // Where the libtorch in use is a CUDA build (the torch wheel is), it must load.
        let cuda_build = std::env::var("LIBTORCH")
            .is_ok_and(|d| Path::new(&d).join("lib/libtorch_cuda.so").exists());
        assert!(loaded || !cuda_build, "libtorch_cuda.so did not load");
        let gpu = tch::Cuda::is_available();
        assert_eq!(gpu, tch::Cuda::device_count() > 0);
        let after = Tensor::from_slice(&[1f32, 2.0])
            .sum(Kind::Float)
            .double_value(&[]);
        assert_eq!(before, after);
        if !nvidia_gpu_present() {
            assert!(!cuda_available());
            assert_eq!(choose_device(DevicePreference::Auto, None), Device::Cpu);
            assert_eq!(choose_device(DevicePreference::Cuda(0), None), Device::Cpu);
        }
        assert_eq!(choose_device(DevicePreference::Cpu, None), Device::Cpu);
    }

    /// Reduced precision converts every floating-point tensor of a value, however nested,
    /// and nothing else.
    #[test]
    fn float_tensors_change_kind_and_nothing_else_does() {
        let value = IValue::Tuple(vec![
            IValue::Tensor(Tensor::from_slice(&[1.5f32, 2.0])),
            IValue::Tensor(Tensor::from_slice(&[3i64])),
            IValue::GenericDict(vec![(
                IValue::String("scores".into()),
                IValue::TensorList(vec![Tensor::from_slice(&[0.25f64])]),
            )]),
            IValue::Int(7),
        ]);
        let IValue::Tuple(out) = with_float_kind(&value, Kind::BFloat16).unwrap() else {
            panic!("not a tuple");
        };
        let kind = |v: &IValue| match v {
            IValue::Tensor(t) => t.kind(),
            other => panic!("{other:?}"),
        };
        assert_eq!(kind(&out[0]), Kind::BFloat16);
        assert_eq!(kind(&out[1]), Kind::Int64);
        let IValue::GenericDict(kvs) = &out[2] else {
            panic!("not a dict");
        };
        let IValue::TensorList(ts) = &kvs[0].1 else {
            panic!("not a tensor list");
        };
        assert_eq!(ts[0].kind(), Kind::BFloat16);
        assert_eq!(kvs[0].0, IValue::String("scores".into()));
        assert_eq!(out[3], IValue::Int(7));
        // And back: 1.5 and 2.0 are exact in bfloat16.
        let back = with_float_kind(&out[0], Kind::Float).unwrap();
        assert_eq!(back, IValue::Tensor(Tensor::from_slice(&[1.5f32, 2.0])));
    }
}
