//! `y = x · wᵀ` for the few rows of a CPU decode step (1 to 8), where the cost is reading `w`.
//! libtorch's small-M path (MKL sgemv for one row) streams the weights on one core here, at half
//! the machine's bandwidth; this kernel splits `w`'s rows across torch's OpenMP threads so each
//! streams its share once, for all rows of `x` (AVX2 + FMA, 8 lanes). Every output is the same
//! sum in the same order whatever the number of rows, so a row's result does not depend on its
//! batch. `cargo run --release --example matvec_bench -p zerotune-worker` measures it per shape.

use std::sync::OnceLock;

use tch::{Device, Kind, Tensor};

use super::omp::{on_torch_threads, SharedOut};

/// The most rows of `x` one call takes.
pub const MAX_ROWS: usize = 8;

/// Whether this CPU runs the kernel (AVX2 and FMA).
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// `xs · wᵀ + b` by this kernel, for xs (B, T, in) of B·T <= MAX_ROWS rows and w (out, in), fp32
/// on the CPU; None where it does not apply (then libtorch multiplies).
pub fn project(xs: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Option<Tensor> {
    let (n, t, k) = xs.size3().ok()?;
    let rows = (n * t) as usize;
    let applies = (1..=MAX_ROWS).contains(&rows)
        && available()
        && xs.device() == Device::Cpu
        && (xs.kind(), w.kind()) == (Kind::Float, Kind::Float)
        && w.is_contiguous()
        && w.size2().ok()?.1 == k;
    if !applies {
        return None;
    }
    let _guard = tch::no_grad_guard();
    let xs = xs.contiguous();
    let out = w.size()[0];
    let mut y = Tensor::empty([n, t, out], (Kind::Float, Device::Cpu));
    let (k, out) = (k as usize, out as usize);
    // SAFETY: contiguous fp32 CPU tensors of exactly these element counts, alive for the call; y is
    // fresh, so no other view aliases it.
    unsafe {
        let x = std::slice::from_raw_parts(xs.data_ptr() as *const f32, rows * k);
        let w = std::slice::from_raw_parts(w.data_ptr() as *const f32, out * k);
        let y = std::slice::from_raw_parts_mut(y.data_ptr() as *mut f32, rows * out);
        rows_times_wt(x, rows, w, k, y);
    }
    if let Some(b) = b {
        y += b;
    }
    Some(y)
}

/// `y[r][o] = Σ_i x[r][i] · w[o][i]` for `rows` rows: x is (rows, k), w is (out, k), y is
/// (rows, out), all row-major. Needs `available()` and 1 <= rows <= MAX_ROWS.
pub fn rows_times_wt(x: &[f32], rows: usize, w: &[f32], k: usize, y: &mut [f32]) {
    static ISA: OnceLock<Isa> = OnceLock::new();
    rows_times_wt_with(*ISA.get_or_init(Isa::detect), x, rows, w, k, y)
}

fn rows_times_wt_with(isa: Isa, x: &[f32], rows: usize, w: &[f32], k: usize, y: &mut [f32]) {
    assert!(available() && (1..=MAX_ROWS).contains(&rows), "rows_times_wt: {rows} rows, kernel available: {}", available());
    let out = w.len() / k;
    assert!(x.len() == rows * k && w.len() == out * k && y.len() == rows * out, "rows_times_wt: shapes disagree");
    let y_ptr = &SharedOut::new(y);
    on_torch_threads(&|thread, threads| {
        let (start, end) = (out * thread / threads, out * (thread + 1) / threads);
        let (w, y) = (&w[start * k..end * k], y_ptr.get().wrapping_add(start));
        // SAFETY: each thread writes only the columns start..end of y, disjoint from the others';
        // the CPU has the features each kernel enables (`available()` and `Isa::detect`).
        match isa {
            Isa::Avx512Vl => unsafe { kernel_avx512vl(x, rows, w, k, y, out) },
            Isa::Avx2 => unsafe { kernel_avx2(x, rows, w, k, y, out) },
        }
    });
}

/// How far ahead (floats, 1 KB) of each weight row's loads a block of several rows of x asks for
/// the row's cache lines: with the FMAs of several rows between loads, the hardware prefetcher
/// alone leaves the weights' stream at 25 GB/s here (8 rows); with this, 33 (one row: 41).
const PREFETCH: usize = 256;

/// The vector registers this CPU offers the kernel: AVX2's 16, or AVX-512VL's 32 (the same 8-lane
/// FMAs, with ymm16-31 as extra accumulators, so the sums do not change with the instruction set).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    Avx2,
    Avx512Vl,
}

impl Isa {
    fn detect() -> Self {
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl") {
            Self::Avx512Vl
        } else {
            Self::Avx2
        }
    }
}

// The kernels: y's columns (row stride `stride`, from `y` on) of the rows of `w`: a block of O
// weight rows against R rows of x at a time, O by R accumulators held in registers, so each load
// feeds several FMAs. With 32 registers all 8 rows of x go in one pass and the weights are read
// once; with 16, passes of up to 4 rows each read this thread's weights again (from cache).

/// Calls `sweep::<O, R>` for the R rows of x in hand, O given per R.
macro_rules! sweep_by_rows {
    ($r:expr, $args:tt, $($rows:literal => $o:literal),*) => {
        match $r {
            $($rows => sweep::<$o, $rows> $args,)*
            r => unreachable!("{r} rows in one pass"),
        }
    };
}

#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_avx2(x: &[f32], rows: usize, w: &[f32], k: usize, y: *mut f32, stride: usize) {
    for pass in (0..rows).step_by(4) {
        let r = (rows - pass).min(4);
        let (x, y) = (&x[pass * k..(pass + r) * k], y.wrapping_add(pass * stride));
        // SAFETY: the features this function enables; y as the caller gives it.
        unsafe { sweep_by_rows!(r, (w, x, k, y, stride), 1 => 2, 2 => 2, 3 => 2, 4 => 2) }
    }
}

#[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
unsafe fn kernel_avx512vl(x: &[f32], rows: usize, w: &[f32], k: usize, y: *mut f32, stride: usize) {
    // O·R accumulators + O weight vectors + 1 x vector <= 32 registers.
    // SAFETY: the features this function enables; y as the caller gives it.
    unsafe { sweep_by_rows!(rows, (w, x, k, y, stride), 1 => 4, 2 => 6, 3 => 6, 4 => 6, 5 => 4, 6 => 4, 7 => 3, 8 => 3) }
}

/// `y[r * stride + o] = w[o] · x[r]` for every row o of w and the R rows of x: blocks of O weight
/// rows, then the last few one at a time.
#[inline(always)]
unsafe fn sweep<const O: usize, const R: usize>(w: &[f32], x: &[f32], k: usize, y: *mut f32, stride: usize) {
    let n = w.len() / k;
    let store = |o: usize, sums: &[[f32; R]]| {
        for (p, sums) in sums.iter().enumerate() {
            for (r, &sum) in sums.iter().enumerate() {
                // SAFETY: (r, o + p) is inside y, and only this thread writes column o + p.
                unsafe { *y.wrapping_add(r * stride + o + p) = sum };
            }
        }
    };
    let mut o = 0;
    while o + O <= n {
        // SAFETY: rows o..o + O of w and the R rows of x hold k floats each.
        store(o, &unsafe { block::<O, R>(w[o * k..].as_ptr(), x.as_ptr(), k) });
        o += O;
    }
    while o < n {
        // SAFETY: as above, one weight row.
        store(o, &unsafe { block::<1, R>(w[o * k..].as_ptr(), x.as_ptr(), k) });
        o += 1;
    }
}

/// `sums[p][r] = w[p] · x[r]` for O rows of w and R rows of x (k floats each, from `w` and `x`):
/// each (p, r) one 8-lane FMA chain over k, reduced in a fixed order, then the scalar tail: the
/// same sum whatever O and R are. Both are constants, so the accumulators live in registers.
/// Pointers advance rather than indices multiply: debug builds check integer overflow.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // (p, r) index the register block
unsafe fn block<const O: usize, const R: usize>(w: *const f32, x: *const f32, k: usize) -> [[f32; R]; O] {
    use std::arch::x86_64::*;
    // SAFETY (whole body): the caller gives O and R rows of k floats and a CPU with AVX2 + FMA.
    unsafe {
        let lanes = k / 8 * 8;
        let mut acc = [[_mm256_setzero_ps(); R]; O];
        let mut wp = [w; O];
        for (p, wp) in wp.iter_mut().enumerate() {
            *wp = w.wrapping_add(p * k);
        }
        let mut xp = [x; R];
        for (r, xp) in xp.iter_mut().enumerate() {
            *xp = x.wrapping_add(r * k);
        }
        let end = w.wrapping_add(lanes);
        while wp[0] < end {
            // Plain loops, not closures: a closure would not inherit the caller's target features,
            // and its intrinsics would stay calls.
            let mut wv = [_mm256_setzero_ps(); O];
            for p in 0..O {
                wv[p] = _mm256_loadu_ps(wp[p]);
                if R > 1 {
                    _mm_prefetch::<_MM_HINT_T0>(wp[p].wrapping_add(PREFETCH) as *const i8);
                }
                wp[p] = wp[p].wrapping_add(8);
            }
            for r in 0..R {
                let xv = _mm256_loadu_ps(xp[r]);
                for p in 0..O {
                    acc[p][r] = _mm256_fmadd_ps(wv[p], xv, acc[p][r]);
                }
                xp[r] = xp[r].wrapping_add(8);
            }
        }
        let mut sums = [[0f32; R]; O];
        for p in 0..O {
            for r in 0..R {
                let mut total = horizontal_sum(acc[p][r]);
                for j in lanes..k {
                    total += *w.wrapping_add(p * k + j) * *x.wrapping_add(r * k + j);
                }
                sums[p][r] = total;
            }
        }
        sums
    }
}

/// The sum of an 8-lane vector, in one fixed order (both decode kernels).
#[target_feature(enable = "avx2,fma")]
pub(super) fn horizontal_sum(v: std::arch::x86_64::__m256) -> f32 {
    let mut parts = [0f32; 8];
    // SAFETY: an 8-float array.
    unsafe { std::arch::x86_64::_mm256_storeu_ps(parts.as_mut_ptr(), v) };
    ((parts[0] + parts[4]) + (parts[1] + parts[5])) + ((parts[2] + parts[6]) + (parts[3] + parts[7]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(x: &[f32], rows: usize, w: &[f32], k: usize) -> Vec<f64> {
        let out = w.len() / k;
        (0..rows).flat_map(|r| (0..out).map(move |o| (0..k).map(|i| x[r * k + i] as f64 * w[o * k + i] as f64).sum())).collect()
    }

    #[test]
    fn equals_an_f64_product_and_each_row_is_independent_of_its_batch() {
        if !available() {
            return;
        }
        let mut rng = zerotune_data::rng::SplitMix64::new(3);
        let mut random = |n: usize| (0..n).map(|_| (rng.next_u64() % 2001) as f32 / 1000.0 - 1.0).collect::<Vec<f32>>();
        // Every instruction set this CPU has (AVX2 always) computes the same sums.
        let isas = if Isa::detect() == Isa::Avx512Vl { vec![Isa::Avx2, Isa::Avx512Vl] } else { vec![Isa::Avx2] };
        for (out, k) in [(37, 1027), (64, 1024), (1, 8), (5, 3), (13, 40)] {
            let w = random(out * k);
            let x = random(MAX_ROWS * k);
            let mut alone = vec![0f32; out];
            rows_times_wt_with(Isa::Avx2, &x[..k], 1, &w, k, &mut alone);
            for (isa, rows) in isas.iter().flat_map(|&isa| (1..=MAX_ROWS).map(move |rows| (isa, rows))) {
                let mut y = vec![0f32; rows * out];
                rows_times_wt_with(isa, &x[..rows * k], rows, &w, k, &mut y);
                let want = reference(&x, rows, &w, k);
                for (got, want) in y.iter().zip(&want) {
                    assert!((*got as f64 - want).abs() <= 1e-5 * (k as f64).sqrt(), "{out}x{k}, {rows} rows: {got} vs {want}");
                }
                assert_eq!(y[..out], alone[..], "row 0 alone (AVX2) and in a batch of {rows} ({isa:?})");
            }
        }
    }
}
