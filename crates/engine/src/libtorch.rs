//! The libtorch library itself: whether an NVIDIA GPU is there and libtorch's CUDA backend,
//! loaded on demand; and the two tensor calls on every forward pass's path that tch makes
//! dearer than they need be (a tensor from bytes, a tensor's sizes). Below both `session`
//! and `torchvision`, which use it.

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

/// A CPU tensor of `kind` and shape `dims` holding `data` (exactly that many elements' bytes,
/// checked), made in one libtorch call plus a copy. tch's `from_data_size` fills a new tensor
/// with zeros first (`torch::zeros`, a second dispatched operator) and then copies over them:
/// 3% of the instructions of a one-instance request to the seed model.
pub fn host_tensor(
    data: &[u8],
    dims: &[i64],
    kind: tch::Kind,
) -> Result<tch::Tensor, tch::TchError> {
    let bytes = dims.iter().try_fold(kind.elt_size_in_bytes(), |n, &d| {
        n.checked_mul(usize::try_from(d).ok()?)
    });
    if bytes != Some(data.len()) {
        return Err(tch::TchError::Shape(format!(
            "{} bytes of input do not make a {kind:?} tensor of shape {dims:?}",
            data.len()
        )));
    }
    let t = tch::Tensor::f_empty(dims, (kind, tch::Device::Cpu))?;
    if !data.is_empty() {
        let dst = t.data_ptr().cast::<u8>();
        // SAFETY: `t` was just made by `empty` on the CPU with `dims` and `kind`: one
        // contiguous, uninitialised buffer of exactly `data.len()` bytes (checked above) that
        // nothing else refers to yet, and not null since it is not empty. `data` is a distinct
        // Rust slice, so the two do not overlap.
        #[allow(unsafe_code)]
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len());
        }
    }
    Ok(t)
}

/// A defined tensor's sizes, with libtorch's error as a value (a nested tensor has none).
/// tch's `size` panics on that error; asking libtorch for the sizes as a tensor
/// (`_shape_as_tensor`) returns it but costs two dispatched operators and an allocation per
/// call, on every forward pass.
pub fn sizes(t: &tch::Tensor) -> Result<Vec<i64>, tch::TchError> {
    // `dim` does not fail on a defined tensor.
    let rank = t.dim();
    let mut dims = vec![0i64; rank];
    // SAFETY: `t` is a live tensor for the whole call (borrowed), and `dims` has `t.dim()`
    // slots, as many as `at_shape` writes. `at_shape` does not modify the tensor (the
    // pointer is `*mut` only in its signature) and catches libtorch's exception, leaving
    // the message in torch-sys's last-error slot, which `last_error` reads and clears.
    #[allow(unsafe_code)]
    unsafe {
        torch_sys::at_shape(t.as_ptr().cast_mut(), dims.as_mut_ptr());
    }
    last_error()?;
    Ok(dims)
}

/// The error libtorch left from the last torch-sys call on this thread, cleared.
fn last_error() -> Result<(), tch::TchError> {
    extern "C" {
        fn free(ptr: *mut std::ffi::c_void);
    }
    // SAFETY: `get_and_reset_last_err` returns null or a NUL-terminated copy of the message,
    // made with `strdup`, which the caller owns: it is read once and given back to `free`
    // (the same `malloc` family: the process has one, mimalloc's, or glibc's).
    #[allow(unsafe_code)]
    unsafe {
        let msg = torch_sys::get_and_reset_last_err();
        if msg.is_null() {
            return Ok(());
        }
        let text = std::ffi::CStr::from_ptr(msg).to_string_lossy().into_owned();
        free(msg.cast());
        Err(tch::TchError::Torch(text))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tch::{Kind, Tensor};

    #[test]
    fn host_tensor_holds_the_bytes_and_checks_their_count() {
        let values = [1.5f32, -2.0, 3.25, 0.0, 7.0, -0.5];
        let t = host_tensor(bytemuck::cast_slice(&values), &[2, 3], Kind::Float).unwrap();
        assert_eq!(sizes(&t).unwrap(), vec![2, 3]);
        let mut back = [0f32; 6];
        t.f_copy_data(&mut back, 6).unwrap();
        assert_eq!(back, values);
        let ints = [1i64, 2, 3];
        let t = host_tensor(bytemuck::cast_slice(&ints), &[3], Kind::Int64).unwrap();
        assert_eq!(Vec::<i64>::try_from(&t).unwrap(), ints);
        assert!(host_tensor(&[], &[0, 4], Kind::Float).is_ok());
        for (bytes, dims) in [(8, vec![3]), (12, vec![2, 2]), (4, vec![-1])] {
            let err = host_tensor(&vec![0u8; bytes], &dims, Kind::Float).unwrap_err();
            assert!(matches!(err, tch::TchError::Shape(_)), "{err}");
        }
    }

    #[test]
    fn sizes_of_a_nested_tensor_are_an_error_not_a_panic() {
        let padded = Tensor::zeros([2, 3, 4], (Kind::Float, tch::Device::Cpu));
        let shapes = Tensor::from_slice2(&[[3i64, 4], [2, 4]]);
        let nested = Tensor::f_internal_nested_from_padded(&padded, &shapes, false).unwrap();
        let err = sizes(&nested).unwrap_err();
        assert!(err.to_string().contains("sizes"), "{err}");
        // The error was taken: the next call on this thread starts clean.
        assert_eq!(sizes(&padded).unwrap(), vec![2, 3, 4]);
        assert_eq!(sizes(&Tensor::from(1.0f32)).unwrap(), Vec::<i64>::new());
    }
}
