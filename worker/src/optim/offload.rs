//! The offloaded optimizer (ZeRO-Offload): fp32 master weights and Adam moments of the owned range
//! in host memory, stepped tile by tile so that the transfers overlap the host's work. With 16-bit
//! parameters both directions move 2 bytes per parameter (docs/architecture.md), where DeepSpeed moves 4.

use std::ops::Range;

use tch::{Device, Kind, Tensor};
use zerotune_proto::plan::AdamW as Hyper;

use super::adamw::{AdamState, Cast, Grads, Segment};
use crate::dtype::host_slice;
use crate::error::Result;

pub struct HostOptimizer {
    pub adam: AdamState,
    /// With 16-bit parameters: their format, which gradients come down in and weights go up in,
    /// and the host buffer (pinned on CUDA) the new weights are cast into.
    sixteen: Option<(Cast, Tensor)>,
    /// With fp32 parameters on a GPU: one tile of pinned host memory the master weights are copied
    /// into before going up, so the upload is asynchronous (from pageable memory CUDA copies
    /// synchronously, and the overlap is lost). One tile suffices: each tile's upload is queued
    /// after the wait that ends the previous one.
    staging: Option<Tensor>,
    device: Device,
    /// Elements per tile.
    tile: usize,
}

impl HostOptimizer {
    /// State for `master`, the owned range of parameters held as `kind` on `device`.
    pub fn new(master: Vec<f32>, kind: Kind, device: Device, tile: usize) -> Self {
        let cast = match kind {
            Kind::BFloat16 => Cast::Bf16,
            Kind::Half => Cast::F16,
            _ => Cast::None,
        };
        let sixteen = (cast != Cast::None).then(|| {
            let buffer = Tensor::zeros([master.len() as i64], (kind, Device::Cpu));
            (cast, if device == Device::Cpu { buffer } else { buffer.pin_memory(device) })
        });
        let tile = tile.max(1);
        let staging = (cast == Cast::None && device != Device::Cpu)
            .then(|| Tensor::zeros([tile.min(master.len()) as i64], (Kind::Float, Device::Cpu)).pin_memory(device));
        Self { adam: AdamState::new(master), sixteen, staging, device, tile }
    }

    /// One AdamW step from `grad` (the owned range's fp32 gradients on the device) into `params`
    /// (the owned range of the 16-bit or fp32 parameters on the device). While the host updates tile i, tile i+1's gradients come down
    /// and tile i-1's weights go up; torch runs the copies in order on its one stream, so it is
    /// the host's work that overlaps them. On a CPU device the copies are views or plain copies.
    pub fn step(
        &mut self,
        grad: &Tensor,
        params: &mut Tensor,
        grad_scale: f64,
        lr: f64,
        hyper: &Hyper,
        segments: &[Segment],
    ) -> Result<()> {
        let n = self.adam.master.len();
        assert_eq!((grad.numel(), params.numel()), (n, n), "gradients, parameters and optimizer state cover the owned range");
        let kind = params.kind();
        // fp16 gradients go down scaled into range, by a factor of their largest magnitude.
        let prescale = match self.sixteen {
            Some((Cast::F16, _)) if n > 0 => {
                fp16_transfer_scale(grad.f_linalg_norm(f64::INFINITY, None::<&[i64]>, false, None::<Kind>)?.f_double_value(&[])?)
            }
            _ => 1.0,
        };
        let coeffs = self.adam.begin_step((grad_scale / prescale) as f32, lr, hyper);
        let tiles: Vec<Range<usize>> = (0..n).step_by(self.tile).map(|s| s..(s + self.tile).min(n)).collect();
        let Some(first) = tiles.first() else { return Ok(()) };
        let mut incoming = fetch(grad, first, kind, prescale)?;
        let mut updated: Option<&Range<usize>> = None;
        for (i, tile) in tiles.iter().enumerate() {
            self.wait(); // tile i's gradients are in host memory
            let next = tiles.get(i + 1).map(|t| fetch(grad, t, kind, prescale)).transpose()?;
            if let Some(done) = updated.take() {
                self.upload(done, params)?;
            }
            let grads = match kind {
                Kind::BFloat16 => Grads::Bf16(host_slice(&incoming)),
                Kind::Half => Grads::F16(host_slice(&incoming)),
                _ => Grads::F32(host_slice(&incoming)),
            };
            let out = match &mut self.sixteen {
                // SAFETY: the buffer is a contiguous 16-bit host tensor of n elements; the only
                // other access, the upload of an earlier tile, reads elements outside `tile`.
                Some((cast, buffer)) => {
                    (unsafe { &mut std::slice::from_raw_parts_mut(buffer.data_ptr() as *mut u16, n)[tile.clone()] }, *cast)
                }
                None => (&mut [][..], Cast::None),
            };
            self.adam.update(tile.clone(), grads, &coeffs, segments, out);
            updated = Some(tile);
            incoming = next.unwrap_or(incoming);
        }
        if let Some(done) = updated {
            // The previous tile's upload may still read the fp32 staging tile.
            if self.staging.is_some() {
                self.wait();
            }
            self.upload(done, params)?;
        }
        self.wait();
        Ok(())
    }

    /// Queues the copy of `tile`'s new weights into the same elements of `params`.
    fn upload(&self, tile: &Range<usize>, params: &mut Tensor) -> Result<()> {
        let (start, len) = (tile.start as i64, tile.len() as i64);
        let master = &self.adam.master[tile.clone()];
        let source = match (&self.sixteen, &self.staging) {
            (Some((_, buffer)), _) => buffer.narrow(0, start, len),
            (None, Some(staging)) => {
                // SAFETY: the staging tensor is a contiguous f32 host buffer of at least a tile;
                // every earlier upload from it has completed (`step` waits before each upload).
                unsafe { std::slice::from_raw_parts_mut(staging.data_ptr() as *mut f32, master.len()) }.copy_from_slice(master);
                staging.narrow(0, 0, len)
            }
            // SAFETY: the f32 master outlives the copy, which on the CPU is done when `to_device_`
            // returns.
            (None, None) => unsafe { Tensor::f_from_blob(master.as_ptr() as *const u8, &[len], &[1], Kind::Float, Device::Cpu)? },
        };
        let on_device = source.f_to_device_(self.device, params.kind(), true, false)?;
        params.narrow(0, start, len).f_copy_(&on_device)?;
        Ok(())
    }

    /// Waits for the device's queued copies (a no-op on the CPU, where copies are synchronous).
    fn wait(&self) {
        if let Device::Cuda(index) = self.device {
            tch::Cuda::synchronize(index as i64);
        }
    }
}

/// Queues the copy of `tile` of `grad` to host memory in `kind`, for fp16 multiplied by `prescale`
/// (the result is pinned, so the copy does not block).
fn fetch(grad: &Tensor, tile: &Range<usize>, kind: Kind, prescale: f64) -> Result<Tensor> {
    let part = grad.narrow(0, tile.start as i64, tile.len() as i64);
    let narrow = match kind {
        Kind::Float => part,
        _ if prescale != 1.0 => part.f_mul_scalar(prescale)?.f_to_kind(kind)?,
        _ => part.f_to_kind(kind)?,
    };
    Ok(narrow.f_to_device_(Device::Cpu, kind, true, false)?)
}

/// The power of two that brings the largest gradient magnitude `amax` into [2^14, 2^15): far from
/// fp16's overflow at 65504 (the sum of the micro-steps' scaled gradients can exceed it) while
/// using its whole precision. 1 for no or non-finite gradients.
pub fn fp16_transfer_scale(amax: f64) -> f64 {
    if !(amax.is_finite() && amax > 0.0) {
        return 1.0;
    }
    let exponent = ((amax.to_bits() >> 52) & 0x7ff) as i32 - 1023; // amax in [2^e, 2^(e+1))
    2f64.powi((14 - exponent).clamp(-64, 64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp16_transfer_scale_brings_the_largest_gradient_just_below_2_to_the_15() {
        for amax in [1e-15, 3e-8, 6e-5, 0.7, 1.0, 1.5, 16384.0, 32767.0, 32768.0, 65504.0, 1e6, 8.0 * 65504.0] {
            let scale = fp16_transfer_scale(amax);
            assert_eq!(scale.log2().fract(), 0.0, "{amax}: a power of two, so scaling is exact");
            assert!((16384.0..32768.0).contains(&(amax * scale)), "{amax} x {scale}");
            assert!(half::f16::from_f64(amax * scale).is_finite());
        }
        // Out of the clamp's reach, and nothing to scale.
        assert_eq!(fp16_transfer_scale(1e-40), 2f64.powi(64));
        assert_eq!(fp16_transfer_scale(3e38), 2f64.powi(-64));
        for amax in [0.0, f64::INFINITY, f64::NAN] {
            assert_eq!(fp16_transfer_scale(amax), 1.0);
        }
    }
}
