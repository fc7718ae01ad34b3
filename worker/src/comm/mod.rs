//! Collectives behind one trait, so the ZeRO-2 step is written once: a TCP ring between CPU ranks
//! (`ring.rs`) and NCCL between GPUs (`nccl.rs`). Every rank issues the same collectives in the
//! same order, unconditionally (docs/architecture.md: no collective on a data-dependent branch).

pub mod nccl;
pub mod ring;

use tch::{Kind, Tensor};

use crate::error::Result;

/// A collective called with tensors it cannot take: wrong device, layout, element type or length.
/// The caller's bug, not a lost rank (that is `WorkerError::Peer`).
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// The TCP ring was given a GPU or non-contiguous tensor.
    #[error("TCP ring collectives need contiguous host tensors (GPUs use NCCL)")]
    NotHost,
    /// The TCP ring sums f32 and f64 only.
    #[error("all_reduce of {kind:?} is not supported (f32, f64)")]
    RingKind { kind: Kind },
    /// The TCP ring's reduce_scatter takes f32 input of world x output elements.
    #[error("reduce_scatter needs f32 input of world x output length")]
    RingReduceScatter { input: usize, output: usize, world: usize },
    /// NCCL has no type for this element kind.
    #[error("NCCL collectives on {kind:?} are not supported")]
    NcclKind { kind: Kind },
    /// NCCL was given a host or non-contiguous tensor.
    #[error("NCCL collectives need contiguous CUDA tensors")]
    NotCuda,
    /// NCCL was asked to join on a device that is not a GPU.
    #[error("NCCL collectives need a GPU")]
    NoGpu,
    /// An NCCL communicator id of the wrong length (`expected` is NCCL's).
    #[error("an NCCL id has {expected} bytes, got {got}")]
    NcclId { expected: usize, got: usize },
    /// NCCL's reduce_scatter takes input of world x output elements.
    #[error("reduce_scatter needs input of world x output length")]
    NcclReduceScatter { input: usize, output: usize, world: usize },
    /// all_gather of a buffer that does not split into `world` equal blocks.
    #[error("all_gather of {len} values over {world} ranks: pad to a multiple")]
    UnevenGather { len: usize, world: usize },
}

/// Sum-reductions and gathers over contiguous tensors on this rank's device.
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// `values` (f32 or f64) becomes the element-wise sum over ranks. Any length.
    fn all_reduce(&mut self, values: &mut Tensor) -> Result<()>;
    /// `output[i] = sum over ranks of input[rank * n + i]`, n = output length; input is world * n.
    fn reduce_scatter(&mut self, input: &Tensor, output: &mut Tensor) -> Result<()>;
    /// In place: rank r's block `buffer[r * n .. (r + 1) * n]` (n = len / world) is copied to every
    /// rank. Any dtype.
    fn all_gather(&mut self, buffer: &mut Tensor) -> Result<()>;
    /// `data` (any dtype) becomes root's on every rank.
    fn broadcast(&mut self, data: &mut Tensor, root: usize) -> Result<()>;
    fn barrier(&mut self) -> Result<()>;
}

/// A world of one: every collective is the identity.
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce(&mut self, _values: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn reduce_scatter(&mut self, input: &Tensor, output: &mut Tensor) -> Result<()> {
        output.f_copy_(input)?;
        Ok(())
    }
    fn all_gather(&mut self, _buffer: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn broadcast(&mut self, _data: &mut Tensor, _root: usize) -> Result<()> {
        Ok(())
    }
    fn barrier(&mut self) -> Result<()> {
        Ok(())
    }
}
