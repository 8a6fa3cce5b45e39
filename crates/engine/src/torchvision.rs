//! torchvision's operator library, for scripted models that call `torchvision::` operators
//! (detectors call `torchvision::nms` and `torchvision::roi_align`), which libtorch lacks.
//!
//! The library is the `torchvision/_C.so` of the `torchvision` wheel matching the torch wheel
//! whose libtorch this process uses (torchvision 0.28.0 for torch 2.13.0): beside the `torch`
//! folder in the same site-packages, or named by `TORCHFN_TORCHVISION_LIB`. That build links
//! libtorch's CUDA backend and `libtorch_python.so` (so also `libpython`), which are loaded
//! first, by full path, into the global namespace; Python itself is never started. It is
//! loaded once, only when a model needs it.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

/// Loads torchvision's operators into the process (once). The error says what is missing.
pub fn load_ops() -> Result<(), String> {
    static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            let started = Instant::now();
            let result = load();
            match &result {
                Ok(()) => tracing::info!(
                    load_ms = started.elapsed().as_secs_f64() * 1e3,
                    "torchvision operators loaded"
                ),
                Err(e) => tracing::warn!(error = %e, "torchvision operators not available"),
            }
            result
        })
        .clone()
}

fn load() -> Result<(), String> {
    let torch_lib = torch_lib_dir().ok_or("cannot find the folder of libtorch_cpu.so")?;
    let ops = match std::env::var_os("TORCHFN_TORCHVISION_LIB") {
        Some(p) => PathBuf::from(p),
        None => torch_lib.join("../../torchvision/_C.so"),
    };
    if !ops.exists() {
        return Err(format!(
            "{} does not exist: install torchvision==0.28.0 (the build matching torch 2.13.0) \
             beside torch with `pip install --no-deps torchvision==0.28.0`, or set \
             TORCHFN_TORCHVISION_LIB to its _C.so",
            ops.display()
        ));
    }
    if !crate::libtorch::load_cuda_backend() {
        return Err(
            "torchvision's operator library links libtorch's CUDA backend (libtorch_cuda.so), \
             which could not be loaded"
                .into(),
        );
    }
    open(&torch_lib.join("libc10_cuda.so"))?;
    let python = python_lib(&torch_lib)?;
    open(&python)?;
    open(&torch_lib.join("libtorch_python.so"))?;
    open(&ops)
}

/// Opens a shared library into the global namespace and keeps it for the process's life.
fn open(path: &Path) -> Result<(), String> {
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
    // SAFETY: each library is part of the torch/torchvision build this process's libtorch
    // comes from (or the Python runtime those link); loading runs their static initialisers,
    // which register operators with libtorch and have no other preconditions. They are never
    // unloaded (leaked below), so no registered operator outlives its code.
    #[allow(unsafe_code)]
    let lib = unsafe { Library::open(Some(path), RTLD_NOW | RTLD_GLOBAL) };
    match lib {
        Ok(lib) => {
            std::mem::forget(lib);
            Ok(())
        }
        Err(e) => Err(format!("cannot load {}: {e}", path.display())),
    }
}

/// The folder holding the `libtorch_cpu.so` this process has mapped.
fn torch_lib_dir() -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libtorch_cpu.so"))
        .and_then(|p| Path::new(p).parent().map(Path::to_path_buf))
}

/// The `libpython3.X` that `libtorch_python.so` was built for: its version is in the
/// site-packages path (`.../lib/python3.X/site-packages/torch/lib`); `TORCHFN_LIBPYTHON`
/// overrides it. Found by the dynamic loader's usual search.
fn python_lib(torch_lib: &Path) -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("TORCHFN_LIBPYTHON") {
        return Ok(PathBuf::from(p));
    }
    let canonical = torch_lib
        .canonicalize()
        .unwrap_or_else(|_| torch_lib.to_path_buf());
    let version = canonical
        .components()
        .filter_map(|c| c.as_os_str().to_str())
        .find_map(|c| c.strip_prefix("python").filter(|v| v.starts_with('3')))
        .ok_or_else(|| {
            format!(
                "cannot tell which Python {} was built for; set TORCHFN_LIBPYTHON to its \
                 libpython3.X.so",
                torch_lib.display()
            )
        })?
        .to_string();
    let name = format!("libpython{version}.so.1.0");
    let candidates = [
        PathBuf::from(format!("/usr/lib/x86_64-linux-gnu/{name}")),
        PathBuf::from(format!("/usr/lib/aarch64-linux-gnu/{name}")),
        PathBuf::from(format!("/usr/local/lib/{name}")),
        PathBuf::from(format!("/usr/lib64/{name}")),
        PathBuf::from(format!("/usr/lib/{name}")),
    ];
    candidates.into_iter().find(|p| p.exists()).ok_or_else(|| {
        format!(
            "torchvision's operator library needs {name} (through libtorch_python.so), which \
             is not installed; install Python {version}'s shared library (Debian: \
             libpython{version}) or set TORCHFN_LIBPYTHON"
        )
    })
}
