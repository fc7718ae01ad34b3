//! AdamW on flat f32 slices, exactly `torch.optim.AdamW` (single-tensor path, decoupled decay,
//! bias correction), fused with gradient unscaling/clipping and split across threads. Also the
//! squared gradient norm and the finiteness check the step needs, in one pass each.

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
        self.step_and_cast(grad, grad_scale, lr, hyper, segments, (&mut [], Cast::None));
    }

    /// `step`, also writing the new weights rounded to 16 bits into `out` in the same pass (the
    /// offloaded optimizer's down-cast: 2 bytes per parameter go back to the device).
    pub fn step_and_cast(
        &mut self,
        grad: &[f32],
        grad_scale: f32,
        lr: f64,
        hyper: &Hyper,
        segments: &[Segment],
        (out, cast): (&mut [u16], Cast),
    ) {
        assert_eq!(grad.len(), self.master.len(), "gradient and master weights differ in length");
        assert!(cast == Cast::None || out.len() == self.master.len(), "the 16-bit output must match the master weights");
        self.steps += 1;
        let t = self.steps as i32;
        let bias_correction1 = 1.0 - hyper.beta1.powi(t);
        let bias_correction2 = 1.0 - hyper.beta2.powi(t);
        let coeffs = Coeffs {
            decay: (1.0 - lr * hyper.weight_decay) as f32,
            one_minus_beta1: (1.0 - hyper.beta1) as f32,
            beta2: hyper.beta2 as f32,
            one_minus_beta2: (1.0 - hyper.beta2) as f32,
            neg_step_size: (-(lr / bias_correction1)) as f32,
            bias_correction2_sqrt: bias_correction2.sqrt() as f32,
            eps: hyper.eps as f32,
            grad_scale,
        };
        for seg in segments {
            let range = seg.start..seg.end;
            let decay = if seg.decay { coeffs.decay } else { 1.0 };
            let c = Coeffs { decay, ..coeffs };
            let out = if cast == Cast::None { &mut [][..] } else { &mut out[range.clone()] };
            parallel_chunks(
                &mut self.master[range.clone()],
                &mut self.exp_avg[range.clone()],
                &mut self.exp_avg_sq[range.clone()],
                &grad[range],
                out,
                |p, m, v, g, o| adamw_kernel(p, m, v, g, o, cast, &c),
            );
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

#[derive(Clone, Copy)]
struct Coeffs {
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
fn adamw_kernel(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], out: &mut [u16], cast: Cast, c: &Coeffs) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { adamw_kernel_avx2(p, m, v, g, out, cast, c) };
    }
    adamw_kernel_cast(p, m, v, g, out, cast, c)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn adamw_kernel_avx2(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], out: &mut [u16], cast: Cast, c: &Coeffs) {
    adamw_kernel_cast(p, m, v, g, out, cast, c)
}

/// Parameters per block in the fused down-cast: the block's new weights are cast while still in L1
/// (16 KB of f32), so the update loop and the cast loop each stay vectorised. Casting element by
/// element inside the update loop halved the offloaded step's speed in dev builds (bench/adamw.sh).
const CAST_BLOCK: usize = 4096;

#[inline(always)]
fn adamw_kernel_cast(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], out: &mut [u16], cast: Cast, c: &Coeffs) {
    if cast == Cast::None {
        return adamw_kernel_body(p, m, v, g, c);
    }
    let blocks = p.chunks_mut(CAST_BLOCK).zip(m.chunks_mut(CAST_BLOCK)).zip(v.chunks_mut(CAST_BLOCK));
    for (((p, m), v), (g, out)) in blocks.zip(g.chunks(CAST_BLOCK).zip(out.chunks_mut(CAST_BLOCK))) {
        adamw_kernel_body(p, m, v, g, c);
        match cast {
            Cast::Bf16 => out.iter_mut().zip(p.iter()).for_each(|(o, &x)| *o = bf16_bits(x)),
            Cast::F16 => out.reinterpret_cast_mut::<half::f16>().convert_from_f32_slice(p),
            Cast::None => unreachable!("handled above"),
        }
    }
}

/// `x` rounded to bfloat16 (nearest, ties to even; NaN stays a quiet NaN), as `half::bf16::from_f32`
/// but without branches, so a loop of it vectorises.
#[inline(always)]
fn bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
    if x.is_nan() { (bits >> 16) as u16 | 0x40 } else { rounded }
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

/// Sum of squares in f64 (for the global gradient norm), in parallel.
pub fn sum_of_squares(values: &[f32]) -> f64 {
    parallel_reduce(values, |chunk| chunk.iter().map(|&x| (x as f64) * (x as f64)).sum())
}

/// Whether every value is finite (fp16 overflow check), in parallel.
pub fn all_finite(values: &[f32]) -> bool {
    parallel_reduce(values, |chunk| if chunk.iter().all(|x| x.is_finite()) { 0.0 } else { 1.0 }) == 0.0
}

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Below this many elements per thread, spawning costs more than it saves.
const MIN_CHUNK: usize = 1 << 16;

fn chunk_len(n: usize) -> usize {
    n.div_ceil(threads()).max(MIN_CHUNK)
}

fn parallel_reduce(values: &[f32], f: impl Fn(&[f32]) -> f64 + Sync) -> f64 {
    let chunk = chunk_len(values.len());
    if values.len() <= chunk {
        return f(values);
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = values.chunks(chunk).map(|c| s.spawn(|| f(c))).collect();
        handles.into_iter().map(|h| h.join().expect("reduction thread")).sum()
    })
}

/// Runs `f` over matching chunks of the slices on all threads; `e` is either empty or as long as `a`.
fn parallel_chunks(
    a: &mut [f32],
    b: &mut [f32],
    c: &mut [f32],
    d: &[f32],
    e: &mut [u16],
    f: impl Fn(&mut [f32], &mut [f32], &mut [f32], &[f32], &mut [u16]) + Sync,
) {
    let chunk = chunk_len(a.len());
    if a.len() <= chunk {
        return f(a, b, c, d, e);
    }
    let mut e_chunks: Vec<&mut [u16]> = if e.is_empty() { vec![] } else { e.chunks_mut(chunk).collect() };
    std::thread::scope(|s| {
        let parts = a.chunks_mut(chunk).zip(b.chunks_mut(chunk)).zip(c.chunks_mut(chunk)).zip(d.chunks(chunk));
        for (i, (((a, b), c), d)) in parts.enumerate() {
            let e = if e_chunks.is_empty() { &mut [][..] } else { std::mem::take(&mut e_chunks[i]) };
            let f = &f;
            s.spawn(move || f(a, b, c, d, e));
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
            fused.step_and_cast(&grad, 0.5, hyper.lr, &hyper, &all, (&mut out, cast));
            assert_eq!(plain.master, fused.master);
            let want: Vec<u16> = plain
                .master
                .iter()
                .map(|&x| if cast == Cast::Bf16 { half::bf16::from_f32(x).to_bits() } else { half::f16::from_f32(x).to_bits() })
                .collect();
            assert_eq!(out, want, "{cast:?}");
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

    #[test]
    fn reductions_over_many_threads() {
        let values: Vec<f32> = (0..1_000_003).map(|i| (i % 7) as f32).collect();
        let want: f64 = values.iter().map(|&x| (x as f64).powi(2)).sum();
        assert_eq!(sum_of_squares(&values), want);
        assert!(all_finite(&values));
        let mut bad = values.clone();
        bad[999_999] = f32::INFINITY;
        assert!(!all_finite(&bad));
    }
}
