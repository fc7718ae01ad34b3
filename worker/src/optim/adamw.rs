//! AdamW on flat f32 slices, exactly `torch.optim.AdamW` (single-tensor path, decoupled decay,
//! bias correction), fused with gradient unscaling/clipping, the widening of 16-bit gradients and
//! the 16-bit down-cast of the new weights, split across threads and runnable tile by tile.

use std::ops::Range;

use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use zerotune_proto::plan::AdamW as Hyper;

/// One contiguous run of parameters sharing a weight-decay setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub start: usize,
    pub end: usize,
    pub decay: bool,
}

/// fp32 master weights and Adam moments for a contiguous slice of the flat parameters.
pub struct AdamState {
    pub master: Vec<f32>,
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
    /// Optimizer steps taken (torch's `state["step"]`), for bias correction.
    pub steps: u64,
}

impl AdamState {
    pub fn new(master: Vec<f32>) -> Self {
        let n = master.len();
        Self { master, exp_avg: vec![0.0; n], exp_avg_sq: vec![0.0; n], steps: 0 }
    }

    /// One AdamW step with gradient `grad * grad_scale` at learning rate `lr`.
    pub fn step(&mut self, grad: &[f32], grad_scale: f32, lr: f64, hyper: &Hyper, segments: &[Segment]) {
        self.step_and_cast(Grads::F32(grad), grad_scale, lr, hyper, segments, (&mut [], Cast::None));
    }

    /// `step` from `grad` in any format, also writing the new weights rounded to 16 bits into
    /// `out` in the same pass (the offloaded optimizer's down-cast).
    pub fn step_and_cast(&mut self, grad: Grads, grad_scale: f32, lr: f64, hyper: &Hyper, segments: &[Segment], out: (&mut [u16], Cast)) {
        assert_eq!(grad.len(), self.master.len(), "gradient and master weights differ in length");
        let coeffs = self.begin_step(grad_scale, lr, hyper);
        self.update(0..self.master.len(), grad, &coeffs, segments, out);
    }

    /// Starts the next step: counts it and returns what every `update` of it uses.
    pub fn begin_step(&mut self, grad_scale: f32, lr: f64, hyper: &Hyper) -> Coeffs {
        self.steps += 1;
        let t = self.steps as i32;
        let bias_correction1 = 1.0 - hyper.beta1.powi(t);
        let bias_correction2 = 1.0 - hyper.beta2.powi(t);
        Coeffs {
            decay: (1.0 - lr * hyper.weight_decay) as f32,
            one_minus_beta1: (1.0 - hyper.beta1) as f32,
            beta2: hyper.beta2 as f32,
            one_minus_beta2: (1.0 - hyper.beta2) as f32,
            neg_step_size: (-(lr / bias_correction1)) as f32,
            bias_correction2_sqrt: bias_correction2.sqrt() as f32,
            eps: hyper.eps as f32,
            grad_scale,
        }
    }

    /// Applies the step begun with `begin_step` to the elements in `range` (`grad` and `out` hold
    /// that range only), so a step can run tile by tile while transfers of other tiles proceed.
    /// Decay follows `segments`, which cover all elements.
    pub fn update(&mut self, range: Range<usize>, grad: Grads, coeffs: &Coeffs, segments: &[Segment], (out, cast): (&mut [u16], Cast)) {
        assert_eq!(grad.len(), range.len(), "the gradients must cover the range");
        assert!(cast == Cast::None || out.len() == range.len(), "the 16-bit output must cover the range");
        for seg in segments {
            let (start, end) = (seg.start.max(range.start), seg.end.min(range.end));
            if start >= end {
                continue;
            }
            let c = Coeffs { decay: if seg.decay { coeffs.decay } else { 1.0 }, ..*coeffs };
            let local = start - range.start..end - range.start;
            let out = if cast == Cast::None { &mut [][..] } else { &mut out[local.clone()] };
            parallel_chunks(
                &mut self.master[start..end],
                &mut self.exp_avg[start..end],
                &mut self.exp_avg_sq[start..end],
                grad.slice(local),
                out,
                |p, m, v, g, o| adamw_kernel(p, m, v, g, o, cast, &c),
            );
        }
    }
}

/// The gradients a step reads: f32, or 16-bit values as they came down from the device (bf16 or
/// fp16 bits), widened exactly in the kernel.
#[derive(Clone, Copy, Debug)]
pub enum Grads<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
    F16(&'a [u16]),
}

impl<'a> Grads<'a> {
    pub fn len(&self) -> usize {
        match self {
            Grads::F32(g) => g.len(),
            Grads::Bf16(g) | Grads::F16(g) => g.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn slice(self, range: Range<usize>) -> Grads<'a> {
        match self {
            Grads::F32(g) => Grads::F32(&g[range]),
            Grads::Bf16(g) => Grads::Bf16(&g[range]),
            Grads::F16(g) => Grads::F16(&g[range]),
        }
    }
}

/// The 16-bit format `step_and_cast` rounds the new weights to (nearest even, as torch).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cast {
    None,
    Bf16,
    F16,
}

/// One step's scalars (bias corrections, decay, gradient scale), from `AdamState::begin_step`.
#[derive(Clone, Copy, Debug)]
pub struct Coeffs {
    decay: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    neg_step_size: f32,
    bias_correction2_sqrt: f32,
    eps: f32,
    grad_scale: f32,
}

/// The element-wise update, compiled for AVX2 when the CPU has it (the same IEEE operations,
/// eight lanes wide; no FMA contraction, so results do not depend on the path). With AVX2 the
/// step is memory-bound (bench/adamw.sh); wider vectors do not help.
fn adamw_kernel(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: Grads, out: &mut [u16], cast: Cast, c: &Coeffs) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { adamw_kernel_avx2(p, m, v, g, out, cast, c) };
    }
    adamw_kernel_blocks(p, m, v, g, out, cast, c)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn adamw_kernel_avx2(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: Grads, out: &mut [u16], cast: Cast, c: &Coeffs) {
    adamw_kernel_blocks(p, m, v, g, out, cast, c)
}

/// Parameters per block when gradients come in or weights go out as 16 bits: a block is widened
/// into (or cast from) 16 KB of f32 that stays in L1, so the conversion loops and the update loop
/// each stay vectorised. Converting element by element inside the update loop halved the
/// offloaded step's speed in dev builds (bench/adamw.sh).
const CAST_BLOCK: usize = 4096;

#[inline(always)]
fn adamw_kernel_blocks(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: Grads, out: &mut [u16], cast: Cast, c: &Coeffs) {
    if let (Grads::F32(g), Cast::None) = (g, cast) {
        return adamw_kernel_body(p, m, v, g, c);
    }
    let mut wide = [0f32; CAST_BLOCK];
    for start in (0..p.len()).step_by(CAST_BLOCK) {
        let block = start..(start + CAST_BLOCK).min(p.len());
        let wide = &mut wide[..block.len()];
        let g = match g.slice(block.clone()) {
            Grads::F32(g) => g,
            Grads::Bf16(bits) => {
                wide.iter_mut().zip(bits).for_each(|(w, &b)| *w = f32::from_bits((b as u32) << 16));
                wide
            }
            Grads::F16(bits) => {
                bits.reinterpret_cast::<half::f16>().convert_to_f32_slice(wide);
                wide
            }
        };
        let p = &mut p[block.clone()];
        adamw_kernel_body(p, &mut m[block.clone()], &mut v[block.clone()], g, c);
        match cast {
            Cast::Bf16 => out[block].iter_mut().zip(p.iter()).for_each(|(o, &x)| *o = bf16_bits(x)),
            Cast::F16 => out[block].reinterpret_cast_mut::<half::f16>().convert_from_f32_slice(p),
            Cast::None => {}
        }
    }
}

/// `x` rounded to bfloat16 (nearest, ties to even; NaN stays a quiet NaN), as `half::bf16::from_f32`
/// but without branches, so a loop of it vectorises.
#[inline(always)]
fn bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
    if x.is_nan() {
        (bits >> 16) as u16 | 0x40
    } else {
        rounded
    }
}

/// Op for op as torch's `_single_tensor_adamw`; a plain loop over equal-length slices so it
/// vectorises.
#[inline(always)]
fn adamw_kernel_body(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], c: &Coeffs) {
    let (m, v, g) = (&mut m[..p.len()], &mut v[..p.len()], &g[..p.len()]);
    for i in 0..p.len() {
        let grad = g[i] * c.grad_scale;
        let param = p[i] * c.decay;
        let exp_avg = m[i] + c.one_minus_beta1 * (grad - m[i]);
        let exp_avg_sq = v[i] * c.beta2 + c.one_minus_beta2 * grad * grad;
        let denom = exp_avg_sq.sqrt() / c.bias_correction2_sqrt + c.eps;
        p[i] = param + c.neg_step_size * (exp_avg / denom);
        m[i] = exp_avg;
        v[i] = exp_avg_sq;
    }
}

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Below this many elements per thread, spawning costs more than it saves.
const MIN_CHUNK: usize = 1 << 16;

fn chunk_len(n: usize) -> usize {
    n.div_ceil(threads()).max(MIN_CHUNK)
}

/// Runs `f` over matching chunks of the slices on all threads; `out` is either empty or as long as `p`.
fn parallel_chunks(
    p: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    g: Grads,
    out: &mut [u16],
    f: impl Fn(&mut [f32], &mut [f32], &mut [f32], Grads, &mut [u16]) + Sync,
) {
    let chunk = chunk_len(p.len());
    if p.len() <= chunk {
        return f(p, m, v, g, out);
    }
    let mut out_chunks: Vec<&mut [u16]> = if out.is_empty() { vec![] } else { out.chunks_mut(chunk).collect() };
    std::thread::scope(|s| {
        let parts = p.chunks_mut(chunk).zip(m.chunks_mut(chunk)).zip(v.chunks_mut(chunk));
        for (i, ((p, m), v)) in parts.enumerate() {
            let g = g.slice(i * chunk..i * chunk + p.len());
            let out = if out_chunks.is_empty() { &mut [][..] } else { std::mem::take(&mut out_chunks[i]) };
            let f = &f;
            s.spawn(move || f(p, m, v, g, out));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_step_moves_each_weight_by_lr_against_the_gradient_sign() {
        // At t=1 Adam's update is lr * g / (|g| + eps') whatever the gradient's size.
        let hyper = Hyper { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
        let mut state = AdamState::new(vec![1.0, 1.0, 1.0]);
        let all = [Segment { start: 0, end: 3, decay: true }];
        state.step(&[0.5, -2.0, 1e3], 1.0, hyper.lr, &hyper, &all);
        for (p, want) in state.master.iter().zip([0.9, 1.1, 0.9]) {
            assert!((p - want).abs() < 1e-6, "{p} vs {want}");
        }
    }

    #[test]
    fn decay_applies_only_to_decaying_segments() {
        let hyper = Hyper { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.5 };
        let mut state = AdamState::new(vec![2.0, 2.0]);
        let segs = [Segment { start: 0, end: 1, decay: true }, Segment { start: 1, end: 2, decay: false }];
        state.step(&[0.0, 0.0], 1.0, hyper.lr, &hyper, &segs);
        assert!((state.master[0] - 2.0 * 0.95).abs() < 1e-6);
        assert_eq!(state.master[1], 2.0);
    }

    #[test]
    fn the_fused_down_cast_equals_casting_afterwards() {
        let hyper = Hyper { lr: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };
        let n = 300_001; // several threads' worth, not a multiple of anything
        let master: Vec<f32> = (0..n).map(|i| ((i % 977) as f32 - 488.0) * 1e-3).collect();
        let grad: Vec<f32> = (0..n).map(|i| ((i % 131) as f32 - 65.0) * 1e-2).collect();
        let all = [Segment { start: 0, end: n / 2, decay: true }, Segment { start: n / 2, end: n, decay: false }];
        for cast in [Cast::Bf16, Cast::F16] {
            let (mut plain, mut fused) = (AdamState::new(master.clone()), AdamState::new(master.clone()));
            let mut out = vec![0u16; n];
            plain.step(&grad, 0.5, hyper.lr, &hyper, &all);
            fused.step_and_cast(Grads::F32(&grad), 0.5, hyper.lr, &hyper, &all, (&mut out, cast));
            assert_eq!(plain.master, fused.master);
            let want: Vec<u16> = plain
                .master
                .iter()
                .map(|&x| if cast == Cast::Bf16 { half::bf16::from_f32(x).to_bits() } else { half::f16::from_f32(x).to_bits() })
                .collect();
            assert_eq!(out, want, "{cast:?}");
        }
    }

    /// Deterministic values of every sign and many magnitudes, none a multiple of anything.
    fn wavy(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32).map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed) % 20_011) as f32 / 20_011.0 - 0.5).collect()
    }

    #[test]
    fn sixteen_bit_gradients_step_exactly_as_their_f32_values() {
        let hyper = Hyper { lr: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };
        let n = 300_001;
        let master = wavy(n, 1);
        let all = [Segment { start: 0, end: n / 3, decay: true }, Segment { start: n / 3, end: n, decay: false }];
        // Gradients over a wide range of exponents (fp16 subnormals included), then as bits.
        let grad: Vec<f32> = wavy(n, 2).iter().enumerate().map(|(i, g)| g * 2f32.powi((i % 40) as i32 - 30)).collect();
        let bf16: Vec<u16> = grad.iter().map(|&g| half::bf16::from_f32(g).to_bits()).collect();
        let f16: Vec<u16> = grad.iter().map(|&g| half::f16::from_f32(g).to_bits()).collect();
        let cases = [
            ("bf16", Grads::Bf16(&bf16), bf16.iter().map(|&b| half::bf16::from_bits(b).to_f32()).collect::<Vec<f32>>()),
            ("f16", Grads::F16(&f16), f16.iter().map(|&b| half::f16::from_bits(b).to_f32()).collect()),
        ];
        for (name, narrow, widened) in cases {
            for cast in [Cast::None, Cast::Bf16] {
                let (mut want, mut got) = (AdamState::new(master.clone()), AdamState::new(master.clone()));
                let (mut want_out, mut got_out) = (vec![0u16; n], vec![0u16; n]);
                want.step_and_cast(Grads::F32(&widened), 0.25, hyper.lr, &hyper, &all, (&mut want_out, cast));
                got.step_and_cast(narrow, 0.25, hyper.lr, &hyper, &all, (&mut got_out, cast));
                assert_eq!(got.master, want.master, "{name} gradients, {cast:?} out");
                assert_eq!((got.exp_avg, got.exp_avg_sq), (want.exp_avg, want.exp_avg_sq));
                assert_eq!(got_out, want_out);
            }
        }
    }

    #[test]
    fn a_step_in_tiles_equals_one_pass() {
        let hyper = Hyper { lr: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };
        let n = 200_003;
        let (master, grad) = (wavy(n, 3), wavy(n, 4));
        let bits: Vec<u16> = grad.iter().map(|&g| half::bf16::from_f32(g).to_bits()).collect();
        // Decay runs that start and end inside tiles, and tiles smaller and larger than a thread's share.
        let segs = [
            Segment { start: 0, end: 999, decay: true },
            Segment { start: 999, end: 150_000, decay: false },
            Segment { start: 150_000, end: n, decay: true },
        ];
        let mut whole = AdamState::new(master.clone());
        let mut whole_out = vec![0u16; n];
        for _ in 0..2 {
            whole.step_and_cast(Grads::Bf16(&bits), 0.5, hyper.lr, &hyper, &segs, (&mut whole_out, Cast::F16));
        }
        for tile in [1000, 65_537, n] {
            let mut tiled = AdamState::new(master.clone());
            let mut out = vec![0u16; n];
            for _ in 0..2 {
                let coeffs = tiled.begin_step(0.5, hyper.lr, &hyper);
                for start in (0..n).step_by(tile) {
                    let r = start..(start + tile).min(n);
                    tiled.update(r.clone(), Grads::Bf16(&bits[r.clone()]), &coeffs, &segs, (&mut out[r], Cast::F16));
                }
            }
            assert_eq!(tiled.master, whole.master, "tile {tile}");
            assert_eq!((&tiled.exp_avg, &tiled.exp_avg_sq, tiled.steps), (&whole.exp_avg, &whole.exp_avg_sq, whole.steps));
            assert_eq!(out, whole_out, "tile {tile}");
        }
    }

    #[test]
    fn branch_free_bf16_rounding_equals_half_on_every_kind_of_value() {
        // A stride through all 2^32 patterns (normals, subnormals, infinities, NaNs) plus the edges:
        // ties to even both ways, the largest finite values rounding to infinity, signed zeros.
        let specials = [0x3f80_8000u32, 0x3f81_8000, 0x7f7f_ffff, 0xff7f_ffff, 0x7f7f_8000, 0x0000_8000, 0x8000_0000, 0x7fc0_0001];
        for bits in (0..=u32::MAX).step_by(65_521).chain(specials) {
            let x = f32::from_bits(bits);
            assert_eq!(bf16_bits(x), half::bf16::from_f32(x).to_bits(), "{bits:#010x}");
        }
    }
}
