//! Picks the compute device. CUDA needs libtorch_cuda loaded first: rustc's --as-needed drops it
//! from the link, so it is dlopen'ed when a GPU is asked for (docs/toolchain.md); the same binary runs
//! on machines without one.

use tch::Device;

use crate::error::{Result, WorkerError};

/// Parses `cpu`, `cuda`, `cuda:N` or `auto` (the first GPU if there is one) and checks the
/// device can be used.
pub fn parse(spec: &str) -> Result<Device> {
    let spec = spec.trim();
    if spec == "cpu" {
        return Ok(Device::Cpu);
    }
    if spec == "auto" {
        let _ = load_cuda_backend();
        return Ok(if tch::Cuda::is_available() { Device::Cuda(0) } else { Device::Cpu });
    }
    let index = match spec.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| WorkerError::Device(spec.into(), "expected cpu, cuda, cuda:N or auto".into()))?,
        None => return Err(WorkerError::Device(spec.into(), "expected cpu, cuda, cuda:N or auto".into())),
    };
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
}
