//! Collectives behind one trait, so the ZeRO-2 step is written once: a TCP ring between CPU ranks
//! (`ring.rs`) and NCCL between GPUs (`nccl.rs`). Every rank issues the same collectives in the
//! same order, unconditionally (docs/architecture.md: no collective on a data-dependent branch).

pub mod nccl;
pub mod ring;

use tch::Tensor;

use crate::error::Result;

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
