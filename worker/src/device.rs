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
        load_cuda_backend();
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
    load_cuda_backend();
    if !tch::Cuda::is_available() {
        return Err(WorkerError::Device(spec.into(), "CUDA is not available on this machine (run with --device cpu)".into()));
    }
    let count = tch::Cuda::device_count() as usize;
    if index >= count {
        return Err(WorkerError::Device(spec.into(), format!("only {count} CUDA device(s) are visible")));
    }
    Ok(Device::Cuda(index))
}

fn load_cuda_backend() {
    // SAFETY: dlopen with a constant, NUL-terminated name; the handle is intentionally leaked so
    // the library stays loaded for the life of the process.
    unsafe {
        libc::dlopen(c"libtorch_cuda.so".as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL);
    }
}
