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
    /// The parameters' 16-bit format, which gradients come down in and new weights go up in;
    /// `Cast::None` for fp32 parameters.
    cast: Cast,
    /// Two tiles of host memory (pinned on a GPU) that alternate tiles' new weights are cast or
    /// copied into before going up: the host fills one while the other's upload reads it. From
    /// pageable memory CUDA copies synchronously, and the overlap would be lost; a pinned copy of
    /// the whole range would cost 2 bytes a parameter, and libtorch's pinned allocator rounds it
    /// up to a power of two. None for fp32 on the CPU, where the master goes up as it is.
    upload_tiles: Option<[Tensor; 2]>,
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
        let tile = tile.max(1);
        let upload_kind = if cast == Cast::None { Kind::Float } else { kind };
        let upload_tiles = (cast != Cast::None || device != Device::Cpu).then(|| upload_tiles(upload_kind, tile.min(master.len()), device));
        Self { adam: AdamState::new(master), cast, upload_tiles, device, tile }
    }

    /// One AdamW step from `grad` (the owned range's fp32 gradients on the device) into `params`
    /// (the owned range of the 16-bit or fp32 parameters on the device). While the host updates
    /// tile i, tile i+1's gradients come down and tile i-1's weights go up; torch runs the copies
    /// in order on its one stream, so it is the host's work that overlaps them. On a CPU device
    /// the copies are views or plain copies.
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
        let prescale = match self.cast {
            Cast::F16 if n > 0 => {
                fp16_transfer_scale(grad.f_linalg_norm(f64::INFINITY, None::<&[i64]>, false, None::<Kind>)?.f_double_value(&[])?)
            }
            _ => 1.0,
        };
        let coeffs = self.adam.begin_step((grad_scale / prescale) as f32, lr, hyper);
        let tiles: Vec<Range<usize>> = (0..n).step_by(self.tile).map(|s| s..(s + self.tile).min(n)).collect();
        let Some(first) = tiles.first() else { return Ok(()) };
        let mut incoming = fetch(grad, first, kind, prescale)?;
        let mut updated: Option<(usize, &Range<usize>)> = None;
        for (i, tile) in tiles.iter().enumerate() {
            // Tile i's gradients are in host memory, and tile i-2's upload, which read upload
            // tile i % 2, is done.
            self.wait();
            let next = tiles.get(i + 1).map(|t| fetch(grad, t, kind, prescale)).transpose()?;
            if let Some((j, done)) = updated.take() {
                self.upload(j % 2, done, params)?;
            }
            let grads = match kind {
                Kind::BFloat16 => Grads::Bf16(host_slice(&incoming)),
                Kind::Half => Grads::F16(host_slice(&incoming)),
                _ => Grads::F32(host_slice(&incoming)),
            };
            let out = match (&self.upload_tiles, self.cast) {
                (_, Cast::None) | (None, _) => &mut [][..],
                // SAFETY: a contiguous 16-bit host tensor of at least a tile's elements, which
                // no queued copy reads (the wait above retired the last upload from it).
                (Some(buffers), _) => unsafe { std::slice::from_raw_parts_mut(buffers[i % 2].data_ptr() as *mut u16, tile.len()) },
            };
            self.adam.update(tile.clone(), grads, &coeffs, segments, (out, self.cast));
            updated = Some((i, tile));
            incoming = next.unwrap_or(incoming);
        }
        if let Some((j, done)) = updated {
            self.upload(j % 2, done, params)?;
        }
        self.wait();
        Ok(())
    }

    /// Queues the copy of `tile`'s new weights (in upload tile `slot` when there are upload
    /// tiles) into the same elements of `params`.
    fn upload(&self, slot: usize, tile: &Range<usize>, params: &mut Tensor) -> Result<()> {
        let (start, len) = (tile.start as i64, tile.len() as i64);
        let master = &self.adam.master[tile.clone()];
        let source = match (&self.upload_tiles, self.cast) {
            (Some(buffers), Cast::None) => {
                // SAFETY: a contiguous f32 host tensor of at least a tile's elements; the upload
                // that last read it, two tiles back, was retired by the wait at the top of the
                // tile before (slots alternate, so only the other slot can still be in flight).
                unsafe { std::slice::from_raw_parts_mut(buffers[slot].data_ptr() as *mut f32, master.len()) }.copy_from_slice(master);
                buffers[slot].narrow(0, 0, len)
            }
            (Some(buffers), _) => buffers[slot].narrow(0, 0, len),
            // SAFETY: the f32 master outlives the copy, which on the CPU is done when `to_device_`
            // returns.
            (None, _) => unsafe { Tensor::f_from_blob(master.as_ptr() as *const u8, &[len], &[1], Kind::Float, Device::Cpu)? },
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

/// Two host tiles of `len` elements of `kind`, pinned for a GPU `device`.
fn upload_tiles(kind: Kind, len: usize, device: Device) -> [Tensor; 2] {
    [(); 2].map(|_| {
        let buffer = Tensor::empty([len as i64], (kind, Device::Cpu));
        match device {
            Device::Cpu => buffer,
            _ => buffer.pin_memory(device),
        }
    })
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

    /// fp32 weights go up through the two upload tiles on a GPU only; forced here on the CPU,
    /// tiles of 1000 over 10007 elements (a short last tile) end bit for bit where the master
    /// going up as it is does.
    #[test]
    fn fp32_through_the_upload_tiles_equals_the_master_going_up_directly() {
        let n = 10_007;
        tch::manual_seed(3);
        let master: Vec<f32> = Vec::try_from(Tensor::randn([n as i64], (Kind::Float, Device::Cpu)) * 0.02).unwrap();
        let hyper = Hyper { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };
        let segments = [Segment { start: 0, end: n / 2, decay: true }, Segment { start: n / 2, end: n, decay: false }];
        let grads: Vec<Tensor> = (0..3).map(|_| Tensor::randn([n as i64], (Kind::Float, Device::Cpu)) * 1e-3).collect();
        let run = |staged: bool| {
            let mut optimizer = HostOptimizer::new(master.clone(), Kind::Float, Device::Cpu, 1000);
            assert!(optimizer.upload_tiles.is_none(), "fp32 on the CPU goes up directly");
            if staged {
                optimizer.upload_tiles = Some(upload_tiles(Kind::Float, 1000, Device::Cpu));
            }
            let mut params = Tensor::from_slice(&master);
            for (step, grad) in grads.iter().enumerate() {
                optimizer.step(grad, &mut params, 1.0, 1e-3 * (step + 1) as f64, &hyper, &segments).unwrap();
            }
            (optimizer.adam.master.clone(), params)
        };
        let ((direct_master, direct), (staged_master, staged)) = (run(false), run(true));
        assert!(direct_master != master, "the steps moved the weights");
        assert_eq!(Tensor::from_slice(&direct_master), direct, "the parameters are the master");
        assert!(staged_master == direct_master && staged.equal(&direct), "staged vs direct");
    }

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
