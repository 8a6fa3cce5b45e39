//! The libtorch library itself: whether an NVIDIA GPU is there and libtorch's CUDA backend,
//! loaded on demand. Below both `session` and `torchvision`, which use it.

use std::path::Path;
use std::time::Instant;

/// Whether this machine shows an NVIDIA GPU to the process (driver device nodes or the
/// driver's /proc entry), checked without loading any CUDA library.
pub fn nvidia_gpu_present() -> bool {
    Path::new("/dev/nvidiactl").exists() || Path::new("/proc/driver/nvidia/version").exists()
}

/// Loads libtorch's CUDA backend (`libtorch_cuda.so`, beside `libtorch_cpu.so`) into the
/// process once. torchfn's binaries do not link it, so CPU-only machines never pay its
/// start-up time and memory; its static initialisers register the CUDA backend with
/// libtorch when it loads. Returns whether the backend is loaded.
pub fn load_cuda_backend() -> bool {
    static LOADED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *LOADED.get_or_init(|| {
        let started = Instant::now();
        // SAFETY: libtorch_cuda.so is the CUDA half of the libtorch this binary links (same
        // folder, found through the binary's rpath); loading it runs libtorch's own static
        // initialisers, which register the CUDA backend and have no other preconditions. The
        // library is never unloaded (leaked below), so no symbol outlives it.
        #[allow(unsafe_code)]
        let lib = unsafe { libloading::Library::new("libtorch_cuda.so") };
        match lib {
            Ok(lib) => {
                std::mem::forget(lib);
                tracing::info!(
                    load_ms = started.elapsed().as_secs_f64() * 1e3,
                    "libtorch CUDA backend loaded"
                );
                true
            }
            Err(e) => {
                tracing::info!(error = %e, "libtorch CUDA backend not available; using the CPU");
                false
            }
        }
    })
}

/// Whether CUDA can be used: a GPU is present, libtorch's CUDA backend loads, and libtorch
/// then sees a device. Nothing CUDA is loaded on a machine without an NVIDIA GPU.
/// A machine whose NVIDIA device nodes exist but where CUDA cannot start (no driver library
/// in the container, a driver too old for the CUDA runtime) says so once, as a warning: the
/// models then run on the CPU, which an operator who asked for a GPU wants to know.
pub fn cuda_available() -> bool {
    if !nvidia_gpu_present() {
        return false;
    }
    let backend = load_cuda_backend();
    let usable = backend && tch::Cuda::is_available();
    if !usable {
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| {
            tracing::warn!(
                cuda_backend_loaded = backend,
                "an NVIDIA GPU is present but CUDA cannot be used (no driver library, or a \
                 driver older than libtorch's CUDA runtime); running on the CPU"
            );
        });
    }
    usable
}
