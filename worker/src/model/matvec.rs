//! `y = x · wᵀ` for the few rows of a CPU decode step (1 to 8), where the cost is reading `w`.
//! libtorch's small-M path (MKL sgemv for one row) streams the weights on one core here, at half
//! the machine's bandwidth; this kernel splits `w`'s rows across torch's OpenMP threads so each
//! streams its share once, for all rows of `x` (FMAs of 16 lanes with AVX-512, of 8 with AVX2
//! only). On one CPU every output is the same sum in the same order whatever the number of rows,
//! so a row's result does not depend on its batch. `cargo run --release --example matvec_bench
//! -p zerotune-worker` measures it per shape.

use std::arch::x86_64::*;
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
            Isa::Avx512 => unsafe { kernel_avx512(x, rows, w, k, y, out) },
            Isa::Avx2 => unsafe { kernel_avx2(x, rows, w, k, y, out) },
        }
    });
}

/// How far ahead (floats, 2 KB) of each weight row's loads a block of several rows of x asks for
/// the row's cache lines. With the FMAs of several rows between loads, the hardware prefetcher
/// alone does not keep enough lines in flight. Near a row's end the line asked for is the next
/// block's: the hardware prefetcher starts each new row cold, and asking for lines of the row
/// after (which this block loads itself) left the 8-row step's matrices at 53-56 ms against 34-36
/// with the next block's (codegen-350M, medians of interleaved calls, same process).
const PREFETCH: usize = 512;

/// The vectors this CPU offers the kernel: AVX2's 16 registers of 8 lanes, or AVX-512's 32 of 16.
/// 16 lanes read a whole cache line per load: one row streams the weights ~15% faster here
/// (`decode_bench`, codegen-350M, 32 vs 37 ms per token).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    Avx2,
    Avx512,
}

impl Isa {
    fn detect() -> Self {
        if is_x86_feature_detected!("avx512f") {
            Self::Avx512
        } else {
            Self::Avx2
        }
    }
}

// The kernels: y's columns (row stride `stride`, from `y` on) of the rows of `w`: a block of O
// weight rows against R rows of x at a time, O by R accumulators held in registers, so each load
// feeds several FMAs. With 32 registers all 8 rows of x go in one pass and the weights are read
// once; with 16, passes of up to 4 rows each read this thread's weights again (from cache).

/// Calls `sweep::<V, O, R>` for the R rows of x in hand, O given per R.
macro_rules! sweep_by_rows {
    ($v:ty, $r:expr, $args:tt, $($rows:literal => $o:literal),*) => {
        match $r {
            $($rows => sweep::<$v, $o, $rows> $args,)*
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
        unsafe { sweep_by_rows!(__m256, r, (w, x, k, y, stride), 1 => 2, 2 => 2, 3 => 2, 4 => 2) }
    }
}

#[target_feature(enable = "avx2,fma,avx512f")]
unsafe fn kernel_avx512(x: &[f32], rows: usize, w: &[f32], k: usize, y: *mut f32, stride: usize) {
    // O·R accumulators + O weight vectors + 1 x vector <= 32 registers.
    // SAFETY: the features this function enables; y as the caller gives it.
    unsafe { sweep_by_rows!(__m512, rows, (w, x, k, y, stride), 1 => 4, 2 => 6, 3 => 6, 4 => 6, 5 => 4, 6 => 4, 7 => 3, 8 => 3) }
}

/// An FMA vector of `LANES` floats. Its functions inline into the kernel that enables its
/// instruction set (they have no target features of their own, like `block`).
trait Vector: Copy {
    const LANES: usize;
    unsafe fn zero() -> Self;
    unsafe fn load(p: *const f32) -> Self;
    /// self · b + c
    unsafe fn mul_add(self, b: Self, c: Self) -> Self;
    /// The sum of the lanes, in one fixed order.
    unsafe fn sum(self) -> f32;
}

impl Vector for __m256 {
    const LANES: usize = 8;
    #[inline(always)]
    unsafe fn zero() -> Self {
        unsafe { _mm256_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        unsafe { _mm256_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn mul_add(self, b: Self, c: Self) -> Self {
        unsafe { _mm256_fmadd_ps(self, b, c) }
    }
    #[inline(always)]
    unsafe fn sum(self) -> f32 {
        unsafe { horizontal_sum(self) }
    }
}

impl Vector for __m512 {
    const LANES: usize = 16;
    #[inline(always)]
    unsafe fn zero() -> Self {
        unsafe { _mm512_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn mul_add(self, b: Self, c: Self) -> Self {
        unsafe { _mm512_fmadd_ps(self, b, c) }
    }
    #[inline(always)]
    unsafe fn sum(self) -> f32 {
        // Lanes i and i + 8 first, then those 8 as `horizontal_sum` adds them: an order written
        // here, not left to the library.
        let mut parts = [0f32; 16];
        unsafe { _mm512_storeu_ps(parts.as_mut_ptr(), self) };
        let half: [f32; 8] = std::array::from_fn(|i| parts[i] + parts[i + 8]);
        ((half[0] + half[4]) + (half[1] + half[5])) + ((half[2] + half[6]) + (half[3] + half[7]))
    }
}

/// `y[r * stride + o] = w[o] · x[r]` for every row o of w and the R rows of x: blocks of O weight
/// rows, then the last few one at a time.
#[inline(always)]
unsafe fn sweep<V: Vector, const O: usize, const R: usize>(w: &[f32], x: &[f32], k: usize, y: *mut f32, stride: usize) {
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
        store(o, &unsafe { block::<V, O, R>(w[o * k..].as_ptr(), x.as_ptr(), k) });
        o += O;
    }
    while o < n {
        // SAFETY: as above, one weight row.
        store(o, &unsafe { block::<V, 1, R>(w[o * k..].as_ptr(), x.as_ptr(), k) });
        o += 1;
    }
}

/// `sums[p][r] = w[p] · x[r]` for O rows of w and R rows of x (k floats each, from `w` and `x`):
/// each (p, r) one FMA chain of V's lanes over k, reduced in a fixed order, then the scalar tail:
/// the same sum whatever O and R are. Both are constants, so the accumulators live in registers.
/// Pointers advance rather than indices multiply: debug builds check integer overflow.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // (p, r) index the register block
unsafe fn block<V: Vector, const O: usize, const R: usize>(w: *const f32, x: *const f32, k: usize) -> [[f32; R]; O] {
    // SAFETY (whole body): the caller gives O and R rows of k floats and a CPU with V's features.
    unsafe {
        let lanes = k / V::LANES * V::LANES;
        let mut acc = [[V::zero(); R]; O];
        let mut wp = [w; O];
        for (p, wp) in wp.iter_mut().enumerate() {
            *wp = w.wrapping_add(p * k);
        }
        let mut xp = [x; R];
        for (r, xp) in xp.iter_mut().enumerate() {
            *xp = x.wrapping_add(r * k);
        }
        let end = w.wrapping_add(lanes);
        // Row p's loads `ahead` floats from now: further along row p, or, near its end, in row p
        // of the next block, which starts O·k floats after this one.
        let ahead = PREFETCH.min(lanes);
        let to_next_block = O * k - lanes;
        while wp[0] < end {
            let skip = if wp[0].wrapping_add(ahead) >= end { to_next_block } else { 0 };
            // Plain loops, not closures: a closure would not inherit the caller's target features,
            // and its intrinsics would stay calls.
            let mut wv = [V::zero(); O];
            for p in 0..O {
                wv[p] = V::load(wp[p]);
                if R > 1 {
                    _mm_prefetch::<_MM_HINT_T0>(wp[p].wrapping_add(ahead + skip) as *const i8);
                }
                wp[p] = wp[p].wrapping_add(V::LANES);
            }
            for r in 0..R {
                let xv = V::load(xp[r]);
                for p in 0..O {
                    acc[p][r] = wv[p].mul_add(xv, acc[p][r]);
                }
                xp[r] = xp[r].wrapping_add(V::LANES);
            }
        }
        let mut sums = [[0f32; R]; O];
        for p in 0..O {
            for r in 0..R {
                let mut total = acc[p][r].sum();
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
pub(super) fn horizontal_sum(v: __m256) -> f32 {
    let mut parts = [0f32; 8];
    // SAFETY: an 8-float array.
    unsafe { _mm256_storeu_ps(parts.as_mut_ptr(), v) };
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
        // Every instruction set this CPU has (AVX2 always), each alone against its batches.
        let isas = if Isa::detect() == Isa::Avx512 { vec![Isa::Avx2, Isa::Avx512] } else { vec![Isa::Avx2] };
        for (out, k) in [(37, 1027), (64, 1024), (1, 8), (5, 3), (13, 40), (3, 24)] {
            let w = random(out * k);
            let x = random(MAX_ROWS * k);
            for &isa in &isas {
                let alone: Vec<Vec<f32>> = (0..MAX_ROWS)
                    .map(|r| {
                        let mut y = vec![0f32; out];
                        rows_times_wt_with(isa, &x[r * k..(r + 1) * k], 1, &w, k, &mut y);
                        y
                    })
                    .collect();
                for rows in 1..=MAX_ROWS {
                    let mut y = vec![0f32; rows * out];
                    rows_times_wt_with(isa, &x[..rows * k], rows, &w, k, &mut y);
                    let want = reference(&x, rows, &w, k);
                    for (got, want) in y.iter().zip(&want) {
                        assert!(
                            (*got as f64 - want).abs() <= 1e-5 * (k as f64).sqrt(),
                            "{out}x{k}, {rows} rows ({isa:?}): {got} vs {want}"
                        );
                    }
                    for (r, alone) in alone.iter().enumerate().take(rows) {
                        assert_eq!(y[r * out..(r + 1) * out], alone[..], "{out}x{k}: row {r} alone and in a batch of {rows} ({isa:?})");
                    }
                }
            }
        }
    }
}
