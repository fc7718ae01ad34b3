//! The gradient buffers of one rank, per ZeRO stage (all fp32 on the device): each micro-batch's
//! parameter gradients are added in (stage 2: reduce-scattered at once, bucket by bucket), and at
//! the accumulation boundary the reduced gradients of the rank's range are handed out.

use std::ops::Range;

use tch::{Device, Kind, Tensor};

use crate::comm::Collective;
use crate::error::Result;
use crate::model::params::Slot;
use crate::zero::ShardMap;

/// Gradient buffers per ZeRO stage.
pub enum GradBuffers {
    /// Stage 0, and any stage on one rank: the full accumulator, all-reduced at the boundary.
    Replicated { acc: Tensor },
    /// Stage 1: the full accumulator, reduce-scattered into `part` at the boundary.
    Partitioned { acc: Tensor, part: Tensor },
    /// Stage 2: each micro-step's gradients gathered bucket by bucket (`bucket`: world blocks of
    /// the same range of every partition), reduce-scattered into `incoming` and added to the
    /// partition accumulator `part`: no full-size gradient buffer.
    Streamed { bucket: Tensor, incoming: Tensor, part: Tensor },
}

impl GradBuffers {
    /// Zeroed buffers for `zero_stage` over `shard`, on `device`; stage 2's buckets hold
    /// `reduce_bucket_size` elements, all ranks' blocks together, as DeepSpeed counts.
    pub fn new(zero_stage: u8, shard: &ShardMap, reduce_bucket_size: usize, device: Device) -> Self {
        let f32_zeros = |n: usize| Tensor::zeros([n as i64], (Kind::Float, device));
        match zero_stage {
            0 => Self::Replicated { acc: f32_zeros(shard.padded()) },
            // On one rank the partition is everything: one accumulator, nothing to reduce.
            _ if shard.world == 1 => Self::Replicated { acc: f32_zeros(shard.padded()) },
            1 => Self::Partitioned { acc: f32_zeros(shard.padded()), part: f32_zeros(shard.partition) },
            _ => {
                // reduce_bucket_size counts the whole bucket, as in DeepSpeed: each rank's block is a share.
                let b = (reduce_bucket_size / shard.world).clamp(1, shard.partition);
                Self::Streamed { bucket: f32_zeros(b * shard.world), incoming: f32_zeros(b), part: f32_zeros(shard.partition) }
            }
        }
    }

    /// Adds one micro-batch's gradients (`grads[i]` of `slots[i]`, None where a parameter got
    /// none) into the buffers; stage 2 reduce-scatters them at once, so every rank must call this
    /// together.
    pub fn accumulate(&mut self, slots: &[Slot], grads: &[Option<Tensor>], shard: &ShardMap, comm: &mut dyn Collective) -> Result<()> {
        match self {
            Self::Replicated { acc } | Self::Partitioned { acc, .. } => {
                for (slot, grad) in slots.iter().zip(grads) {
                    if let Some(grad) = grad {
                        let _ = acc.narrow(0, slot.offset as i64, slot.numel as i64).f_add_(&grad.view(-1))?;
                    }
                }
            }
            Self::Streamed { bucket, incoming, part } => {
                let (p, b) = (shard.partition, incoming.numel());
                for start in (0..p).step_by(b) {
                    let len = b.min(p - start);
                    fill_bucket(bucket, slots, grads, shard, start..start + len)?;
                    comm.reduce_scatter(bucket, incoming)?;
                    let _ = part.narrow(0, start as i64, len as i64).f_add_(&incoming.narrow(0, 0, len as i64))?;
                }
            }
        }
        Ok(())
    }

    /// Zeroes the buffers for the next optimizer step.
    pub fn zero(&mut self) -> Result<()> {
        let _ = match self {
            Self::Replicated { acc } => acc.f_zero_()?,
            Self::Partitioned { acc, part } => {
                let _ = acc.f_zero_()?;
                part.f_zero_()?
            }
            Self::Streamed { part, .. } => part.f_zero_()?,
        };
        Ok(())
    }

    /// The reduced gradients of the owned range (its first `owned_len` elements from the rank's
    /// view), and of the range this rank alone accounts for in the global norm. Stages 0 and 1
    /// reduce here, so every rank must call this together.
    pub fn reduced(&mut self, owned_len: usize, shard: &ShardMap, comm: &mut dyn Collective) -> Result<(Tensor, Tensor)> {
        let n = owned_len as i64;
        let unique = shard.range(comm.rank());
        Ok(match self {
            Self::Replicated { acc } => {
                comm.all_reduce(acc)?;
                (acc.narrow(0, 0, n), acc.narrow(0, unique.start as i64, unique.len() as i64))
            }
            Self::Partitioned { acc, part } => {
                comm.reduce_scatter(acc, part)?;
                (part.narrow(0, 0, n), part.narrow(0, 0, n))
            }
            Self::Streamed { part, .. } => (part.narrow(0, 0, n), part.narrow(0, 0, n)),
        })
    }
}

/// Fills `bucket` with the gradients of `range` (offsets within a partition) of every rank's
/// partition: block r holds flat range [r P + range.start, r P + range.end), zero where no
/// parameter lies (padding) or no gradient came.
fn fill_bucket(bucket: &mut Tensor, slots: &[Slot], grads: &[Option<Tensor>], shard: &ShardMap, range: Range<usize>) -> Result<()> {
    let (p, b) = (shard.partition, bucket.numel() / shard.world);
    let _ = bucket.f_zero_()?;
    for r in 0..shard.world {
        let (lo, hi) = (r * p + range.start, r * p + range.end);
        for (slot, grad) in slots.iter().zip(grads) {
            let (from, to) = (slot.offset.max(lo), (slot.offset + slot.numel).min(hi));
            if let (Some(grad), true) = (grad, from < to) {
                let n = (to - from) as i64;
                let src = grad.view(-1).narrow(0, (from - slot.offset) as i64, n);
                bucket.narrow(0, (r * b + from - lo) as i64, n).f_copy_(&src)?;
            }
        }
    }
    Ok(())
}
