//! Collectives between GPUs through NCCL (cudarc's bindings, library loaded at run time). Calls go
//! on the default stream that torch also uses, so they are ordered with compute without extra
//! synchronisation (docs/toolchain.md). The launcher puts a `libnccl.so` link to the pip wheel's
//! `libnccl.so.2` on the worker's LD_LIBRARY_PATH (cudarc does not look for the `.so.2` name).

use cudarc::nccl::sys;
use tch::{Device, Kind, Tensor};

use super::{Collective, CollectiveError};
use crate::error::{Result, WorkerError};

/// Bytes of an NCCL unique id (relayed from rank 0 by the coordinator).
pub const UNIQUE_ID_BYTES: usize = 128;

pub struct Nccl {
    comm: sys::ncclComm_t,
    rank: usize,
    world: usize,
    /// This rank's GPU, the communicator's.
    device: Device,
}

// SAFETY: an NCCL communicator may be used from any thread, one call at a time (&mut self).
unsafe impl Send for Nccl {}

fn available() -> Result<()> {
    // SAFETY: only probes for the shared library.
    if unsafe { sys::is_culib_present() } {
        Ok(())
    } else {
        Err(WorkerError::Device(
            "nccl".into(),
            "libnccl.so was not found: install nvidia-nccl-cu13 (pip) and launch through the coordinator, \
             which links it onto the worker's LD_LIBRARY_PATH, or set LD_LIBRARY_PATH yourself"
                .into(),
        ))
    }
}

fn check(what: &str, result: sys::ncclResult_t) -> Result<()> {
    if result == sys::ncclResult_t::ncclSuccess {
        return Ok(());
    }
    // SAFETY: NCCL returns a static C string for every result code.
    let text = unsafe { std::ffi::CStr::from_ptr(sys::ncclGetErrorString(result)) }.to_string_lossy().into_owned();
    Err(WorkerError::Peer(format!("NCCL {what}: {text} ({result:?})")))
}

/// A new unique id (rank 0 makes it; the coordinator relays it to the others).
pub fn unique_id() -> Result<Vec<u8>> {
    available()?;
    let mut id = sys::ncclUniqueId { internal: [0; UNIQUE_ID_BYTES] };
    // SAFETY: NCCL fills the 128-byte id.
    check("ncclGetUniqueId", unsafe { sys::ncclGetUniqueId(&mut id) })?;
    Ok(id.internal.iter().map(|&c| c as u8).collect())
}

fn data_type(kind: Kind) -> Result<sys::ncclDataType_t> {
    Ok(match kind {
        Kind::Float => sys::ncclDataType_t::ncclFloat32,
        Kind::Double => sys::ncclDataType_t::ncclFloat64,
        Kind::Half => sys::ncclDataType_t::ncclFloat16,
        Kind::BFloat16 => sys::ncclDataType_t::ncclBfloat16,
        Kind::Uint8 => sys::ncclDataType_t::ncclUint8,
        kind => return Err(CollectiveError::NcclKind { kind }.into()),
    })
}

fn on_gpu(t: &Tensor) -> Result<*mut std::ffi::c_void> {
    if !matches!(t.device(), Device::Cuda(_)) || !t.is_contiguous() {
        return Err(CollectiveError::NotCuda.into());
    }
    Ok(t.data_ptr())
}

impl Nccl {
    /// Joins the communicator of `world` ranks named by `id` on this rank's GPU `device` (blocks
    /// until all have joined).
    pub fn join(id: &[u8], rank: usize, world: usize, device: Device) -> Result<Self> {
        available()?;
        let Device::Cuda(index) = device else {
            return Err(CollectiveError::NoGpu.into());
        };
        // NCCL takes the calling thread's current device, which is GPU 0 unless made otherwise
        // (every launcher gives a rank its one GPU as cuda:0).
        if index != 0 {
            crate::device::make_current(index)?;
        }
        let mut unique = sys::ncclUniqueId { internal: [0; UNIQUE_ID_BYTES] };
        if id.len() != UNIQUE_ID_BYTES {
            return Err(CollectiveError::NcclId { expected: UNIQUE_ID_BYTES, got: id.len() }.into());
        }
        for (dst, src) in unique.internal.iter_mut().zip(id) {
            *dst = *src as std::ffi::c_char;
        }
        let mut comm = std::ptr::null_mut();
        // SAFETY: a valid id, rank < world; NCCL writes the communicator handle.
        check("ncclCommInitRank", unsafe { sys::ncclCommInitRank(&mut comm, world as i32, unique, rank as i32) })?;
        Ok(Self { comm, rank, world, device })
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        // SAFETY: the communicator was created by ncclCommInitRank and is not used after this.
        unsafe { sys::ncclCommDestroy(self.comm) };
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce(&mut self, values: &mut Tensor) -> Result<()> {
        let (ptr, ty) = (on_gpu(values)?, data_type(values.kind())?);
        // SAFETY: in-place sum over a live device buffer of numel elements, default stream.
        check("all_reduce", unsafe {
            sys::ncclAllReduce(ptr, ptr, values.numel(), ty, sys::ncclRedOp_t::ncclSum, self.comm, std::ptr::null_mut())
        })
    }

    fn reduce_scatter(&mut self, input: &Tensor, output: &mut Tensor) -> Result<()> {
        if input.numel() != output.numel() * self.world {
            let (input, output, world) = (input.numel(), output.numel(), self.world);
            return Err(CollectiveError::NcclReduceScatter { input, output, world }.into());
        }
        let (src, dst, ty) = (on_gpu(input)?, on_gpu(output)?, data_type(input.kind())?);
        // SAFETY: live device buffers of the stated sizes, default stream.
        check("reduce_scatter", unsafe {
            sys::ncclReduceScatter(src, dst, output.numel(), ty, sys::ncclRedOp_t::ncclSum, self.comm, std::ptr::null_mut())
        })
    }

    fn all_gather(&mut self, buffer: &mut Tensor) -> Result<()> {
        if !buffer.numel().is_multiple_of(self.world) {
            return Err(CollectiveError::UnevenGather { len: buffer.numel(), world: self.world }.into());
        }
        let n = buffer.numel() / self.world;
        let (ptr, ty) = (on_gpu(buffer)?, data_type(buffer.kind())?);
        let elem = buffer.kind().elt_size_in_bytes();
        // SAFETY: in-place all-gather (send = this rank's block of the receive buffer), default stream.
        check("all_gather", unsafe {
            let mine = (ptr as *mut u8).add(self.rank * n * elem) as *const std::ffi::c_void;
            sys::ncclAllGather(mine, ptr, n, ty, self.comm, std::ptr::null_mut())
        })
    }

    fn broadcast(&mut self, data: &mut Tensor, root: usize) -> Result<()> {
        let (ptr, ty) = (on_gpu(data)?, data_type(data.kind())?);
        // SAFETY: in-place broadcast of a live device buffer, default stream.
        check("broadcast", unsafe { sys::ncclBroadcast(ptr, ptr, data.numel(), ty, root as i32, self.comm, std::ptr::null_mut()) })
    }

    fn barrier(&mut self) -> Result<()> {
        let mut token = Tensor::zeros([1], (Kind::Float, self.device));
        self.all_reduce(&mut token)
    }
}
