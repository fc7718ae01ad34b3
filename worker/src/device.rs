//! Picks the compute device. CUDA needs libtorch_cuda loaded first: rustc's --as-needed drops it
//! from the link, so it is dlopen'ed when a GPU is asked for (docs/toolchain.md); the same binary runs
//! on machines without one.

use tch::Device;
use zerotune_proto::device::DeviceSpec;

use crate::error::{Result, WorkerError};

/// Parses `cpu`, `cuda`, `cuda:N` or `auto` (the first GPU if there is one) and checks the
/// device can be used.
pub fn parse(spec: &str) -> Result<Device> {
    let index = match spec.parse::<DeviceSpec>()? {
        DeviceSpec::Cpu => return Ok(Device::Cpu),
        DeviceSpec::Auto => {
            let _ = load_cuda_backend();
            return Ok(if tch::Cuda::is_available() { Device::Cuda(0) } else { Device::Cpu });
        }
        DeviceSpec::Cuda(index) => index.unwrap_or(0),
    };
    let spec = spec.trim();
    let loaded = load_cuda_backend();
    if !tch::Cuda::is_available() {
        let why = match loaded {
            Err(dlerror) => format!(
                "CUDA is not available: libtorch_cuda.so did not load: {dlerror} (is the libtorch CUDA build on the library path? run with --device cpu otherwise)"
            ),
            Ok(()) => "CUDA is not available: libtorch_cuda.so loaded but sees no GPU (check the driver with nvidia-smi; run with --device cpu otherwise)".into(),
        };
        return Err(WorkerError::Device(spec.into(), why));
    }
    let count = tch::Cuda::device_count() as usize;
    if index >= count {
        return Err(WorkerError::Device(spec.into(), format!("only {count} CUDA device(s) are visible")));
    }
    Ok(Device::Cuda(index))
}

/// The compute capability (major, minor) of GPU `index`, from the CUDA runtime that libtorch_cuda
/// brought in; None when it cannot be asked.
pub fn compute_capability(index: usize) -> Option<(u32, u32)> {
    const MAJOR: i32 = 75; // cudaDevAttrComputeCapabilityMajor
    const MINOR: i32 = 76; // cudaDevAttrComputeCapabilityMinor
    let get: DeviceGetAttribute = cuda_runtime_fn(c"cudaDeviceGetAttribute").ok()?;
    let attribute = |which: i32| {
        let mut value = 0i32;
        // SAFETY: cudaDeviceGetAttribute(int*, cudaDeviceAttr, int) writes one int.
        let status = unsafe { get(&mut value, which, index as i32) };
        (status == 0).then_some(value as u32)
    };
    Some((attribute(MAJOR)?, attribute(MINOR)?))
}

/// Makes GPU `index` the calling thread's current device, as NCCL needs before it creates a
/// communicator (tch has no call for it): cudaSetDevice from the CUDA runtime that libtorch_cuda
/// brought in.
pub fn make_current(index: usize) -> Result<()> {
    let set: SetDevice = cuda_runtime_fn(c"cudaSetDevice").map_err(|why| WorkerError::Device(format!("cuda:{index}"), why))?;
    // SAFETY: cudaSetDevice(int) only selects the device.
    match unsafe { set(index as i32) } {
        0 => Ok(()),
        code => Err(WorkerError::Device(format!("cuda:{index}"), format!("cudaSetDevice failed with CUDA error {code}"))),
    }
}

type DeviceGetAttribute = unsafe extern "C" fn(*mut i32, i32, i32) -> i32;
type SetDevice = unsafe extern "C" fn(i32) -> i32;

/// A function of the CUDA runtime (loaded with libtorch_cuda, whose dependencies are global), cast
/// to `F`, the caller's type for it.
fn cuda_runtime_fn<F: Copy>(name: &std::ffi::CStr) -> std::result::Result<F, String> {
    assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<*mut libc::c_void>(), "a function pointer");
    // SAFETY: dlsym with a NUL-terminated name; a non-null result is the function's address,
    // which the caller's type describes (the CUDA runtime's documented signature).
    unsafe {
        let symbol = libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr());
        if symbol.is_null() {
            return Err(format!(
                "{} was not found: the CUDA runtime is not loaded (is libtorch's CUDA build on the library path?)",
                name.to_string_lossy()
            ));
        }
        Ok(std::mem::transmute_copy::<*mut libc::c_void, F>(&symbol))
    }
}

/// Loads libtorch_cuda; on failure, the loader's reason (`dlerror()`: the missing library or
/// symbol).
fn load_cuda_backend() -> std::result::Result<(), String> {
    // SAFETY: dlopen with a constant, NUL-terminated name; the handle is intentionally leaked so
    // the library stays loaded for the life of the process. dlerror's string is copied at once,
    // before any other dl call can replace it.
    unsafe {
        if !libc::dlopen(c"libtorch_cuda.so".as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL).is_null() {
            return Ok(());
        }
        let error = libc::dlerror();
        Err(if error.is_null() { "unknown dlopen error".into() } else { std::ffi::CStr::from_ptr(error).to_string_lossy().into_owned() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a GPU (CI, the build machines) the error says why: the loader's message when
    /// libtorch_cuda (or a library it needs) did not load.
    #[test]
    fn without_cuda_the_error_says_why() {
        if tch::Cuda::is_available() {
            return;
        }
        let err = parse("cuda").unwrap_err().to_string();
        println!("{err}");
        assert!(err.contains("CUDA is not available"), "{err}");
        if let Err(dlerror) = load_cuda_backend() {
            assert!(err.contains(&format!("did not load: {dlerror}")) && !dlerror.is_empty(), "{err}");
        }
        assert!(parse("cpu").is_ok() && parse("gpu").is_err());
    }

    /// The CUDA runtime's functions are found once it is loaded (here from the libtorch that
    /// setup installed, without a driver: every call fails with a CUDA error, said as such).
    #[test]
    fn the_cuda_runtime_is_asked_through_its_own_functions() {
        if tch::Cuda::is_available() {
            return;
        }
        let runtime = std::path::Path::new(env!("LIBTORCH")).join("../nvidia/cu13/lib/libcudart.so.13");
        if !runtime.exists() {
            return println!("skipped: {} is not there (a libtorch other than setup's)", runtime.display());
        }
        let path = std::ffi::CString::new(runtime.to_string_lossy().as_bytes()).unwrap();
        // SAFETY: dlopen of a path; the handle is kept for the process.
        let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        assert!(!handle.is_null(), "{} did not load", runtime.display());
        assert!(cuda_runtime_fn::<SetDevice>(c"cudaSetDevice").is_ok());
        assert!(cuda_runtime_fn::<SetDevice>(c"cudaNoSuchFunction").unwrap_err().contains("cudaNoSuchFunction was not found"));
        let err = make_current(1).unwrap_err().to_string();
        println!("{err}");
        assert!(err.contains("cuda:1") && err.contains("cudaSetDevice failed with CUDA error"), "{err}");
        assert_eq!(compute_capability(0), None);
    }
}
