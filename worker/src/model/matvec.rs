//! `y = x · wᵀ` for the few rows of a CPU decode step (1 to 8), where the cost is reading `w`.
//! libtorch's small-M path (MKL sgemv for one row) streams the weights on one core here, at half
//! the machine's bandwidth; this kernel splits `w`'s rows across torch's OpenMP threads so each
//! streams its share once, for all rows of `x` (AVX2 + FMA, 8 lanes). Every output is the same sum in the same
//! order whatever the number of rows, so a row's result does not depend on its batch.

use std::sync::OnceLock;

use tch::{Device, Kind, Tensor};

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
    assert!(available() && (1..=MAX_ROWS).contains(&rows), "rows_times_wt: {rows} rows, kernel available: {}", available());
    let out = w.len() / k;
    assert!(x.len() == rows * k && w.len() == out * k && y.len() == rows * out, "rows_times_wt: shapes disagree");
    let y_ptr = &SharedOut(y.as_mut_ptr());
    on_torch_threads(&|thread, threads| {
        let (start, end) = (out * thread / threads, out * (thread + 1) / threads);
        // SAFETY: each thread writes only the columns start..end of y, disjoint from the others';
        // the kernel is only reached when `available()`.
        unsafe { kernel(x, rows, &w[start * k..end * k], k, y_ptr.get(), out, start) }
    });
}

/// y's base pointer, shared by threads that write disjoint columns.
struct SharedOut(*mut f32);
// SAFETY: threads write disjoint elements through it, and all of them finish inside the call.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    fn get(&self) -> *mut f32 {
        self.0
    }
}

/// Runs `body(thread, threads)` on every thread of libtorch's OpenMP team (libgomp, which
/// libtorch loads; its size follows `tch::set_num_threads`), or once on this thread where that
/// library is not found. Running on torch's own threads matters: between torch ops they spin
/// waiting for the next parallel region, and any other pool would compete with them for the cores.
fn on_torch_threads(body: &(dyn Fn(usize, usize) + Sync)) {
    let Some(omp) = Omp::get() else { return body(0, 1) };
    extern "C" fn run(data: *mut std::ffi::c_void) {
        // SAFETY: `data` is the `&dyn Fn` below, alive until GOMP_parallel returns.
        let body = unsafe { &*(data as *const &(dyn Fn(usize, usize) + Sync)) };
        let omp = Omp::get().expect("found before the parallel region");
        // SAFETY: libgomp's own queries, called inside its parallel region.
        let (thread, threads) = unsafe { ((omp.thread_num)(), (omp.num_threads)()) };
        body(thread.max(0) as usize, threads.max(1) as usize);
    }
    // SAFETY: GOMP_parallel(fn, data, 0 = the default team size, 0 = no flags) runs `run` on every
    // thread of the team and returns when all are done; `body` outlives it.
    unsafe { (omp.parallel)(run, &body as *const _ as *mut std::ffi::c_void, 0, 0) }
}

/// libgomp's entry points, looked up in the running process.
struct Omp {
    parallel: ParallelFn,
    thread_num: QueryFn,
    num_threads: QueryFn,
}

/// `GOMP_parallel(fn, data, num_threads, flags)`.
type ParallelFn = unsafe extern "C" fn(extern "C" fn(*mut std::ffi::c_void), *mut std::ffi::c_void, u32, u32);
/// `omp_get_thread_num()`, `omp_get_num_threads()`.
type QueryFn = unsafe extern "C" fn() -> i32;

impl Omp {
    fn get() -> Option<&'static Omp> {
        static OMP: OnceLock<Option<Omp>> = OnceLock::new();
        OMP.get_or_init(|| {
            let find = |name: &std::ffi::CStr| {
                // SAFETY: dlsym over the symbols already loaded into this process.
                let symbol = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
                (!symbol.is_null()).then_some(symbol)
            };
            let (parallel, thread_num, num_threads) = (find(c"GOMP_parallel")?, find(c"omp_get_thread_num")?, find(c"omp_get_num_threads")?);
            // SAFETY: libgomp's documented ABI for these three symbols.
            unsafe {
                Some(Omp {
                    parallel: std::mem::transmute::<*mut std::ffi::c_void, ParallelFn>(parallel),
                    thread_num: std::mem::transmute::<*mut std::ffi::c_void, QueryFn>(thread_num),
                    num_threads: std::mem::transmute::<*mut std::ffi::c_void, QueryFn>(num_threads),
                })
            }
        })
        .as_ref()
    }
}

/// Columns `first..first + w.len()/k` of y (row stride `stride`) from the rows of `w`, two
/// weight rows at a time against up to PASS_ROWS rows of x, so each load feeds more than one FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel(x: &[f32], rows: usize, w: &[f32], k: usize, y: *mut f32, stride: usize, first: usize) {
    let n = w.len() / k;
    let mut o = 0;
    while o < n {
        let pair = (n - o).min(2);
        for pass in (0..rows).step_by(PASS_ROWS) {
            let r = (rows - pass).min(PASS_ROWS);
            let x = &x[pass * k..(pass + r) * k];
            let mut sums = [[0f32; PASS_ROWS]; 2];
            // SAFETY: same target features as this function.
            unsafe {
                let w = &w[o * k..(o + pair) * k];
                match (pair, r) {
                    (2, 4) => block::<2, 4>(w, x, &mut sums),
                    (2, 3) => block::<2, 3>(w, x, &mut sums),
                    (2, 2) => block::<2, 2>(w, x, &mut sums),
                    (2, _) => block::<2, 1>(w, x, &mut sums),
                    (_, 4) => block::<1, 4>(w, x, &mut sums),
                    (_, 3) => block::<1, 3>(w, x, &mut sums),
                    (_, 2) => block::<1, 2>(w, x, &mut sums),
                    _ => block::<1, 1>(w, x, &mut sums),
                }
            }
            for (p, sums) in sums.iter().enumerate().take(pair) {
                for (i, &sum) in sums.iter().enumerate().take(r) {
                    // SAFETY: (pass + i, first + o + p) is inside y, and only this thread writes
                    // column first + o + p.
                    unsafe { *y.wrapping_add((pass + i) * stride + first + o + p) = sum };
                }
            }
        }
        o += pair;
    }
}

/// Rows of x one `block` takes: with two weight rows, 8 accumulators of the 16 AVX2 registers.
const PASS_ROWS: usize = 4;

/// `sums[p][r] = w[p] · x[r]` for the O rows of `w` and the R (<= PASS_ROWS) rows of x, each
/// (p, r) one 8-lane FMA chain over k, reduced in a fixed order, then the scalar tail: the same
/// sum whatever O and R are. Both are constants, so the accumulators live in registers.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)] // (p, r) indices name the register block
unsafe fn block<const O: usize, const R: usize>(w: &[f32], x: &[f32], sums: &mut [[f32; PASS_ROWS]; 2]) {
    use std::arch::x86_64::*;
    let k = w.len() / O;
    let lanes = k / 8 * 8;
    let mut acc = [[_mm256_setzero_ps(); R]; O];
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    let mut i = 0;
    // `wrapping_add` rather than `add`: the same address, without the per-call precondition check
    // that debug builds (which users run) would otherwise make in this loop.
    while i < lanes {
        // SAFETY: i + 8 <= lanes <= k: inside each of w's O rows and x's R rows of k.
        let wv: [__m256; O] = std::array::from_fn(|p| unsafe { _mm256_loadu_ps(wp.wrapping_add(p * k + i)) });
        for r in 0..R {
            let xv = unsafe { _mm256_loadu_ps(xp.wrapping_add(r * k + i)) };
            for p in 0..O {
                acc[p][r] = _mm256_fmadd_ps(wv[p], xv, acc[p][r]);
            }
        }
        i += 8;
    }
    for p in 0..O {
        for r in 0..R {
            let mut parts = [0f32; 8];
            // SAFETY: an 8-float array.
            unsafe { _mm256_storeu_ps(parts.as_mut_ptr(), acc[p][r]) };
            let mut total = ((parts[0] + parts[4]) + (parts[1] + parts[5])) + ((parts[2] + parts[6]) + (parts[3] + parts[7]));
            for j in lanes..k {
                total += w[p * k + j] * x[r * k + j];
            }
            sums[p][r] = total;
        }
    }
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
        for (out, k) in [(37, 1027), (64, 1024), (1, 8), (5, 3)] {
            let w = random(out * k);
            let x = random(MAX_ROWS * k);
            let mut alone = vec![0f32; out];
            rows_times_wt(&x[..k], 1, &w, k, &mut alone);
            for rows in 1..=MAX_ROWS {
                let mut y = vec![0f32; rows * out];
                rows_times_wt(&x[..rows * k], rows, &w, k, &mut y);
                let want = reference(&x, rows, &w, k);
                for (got, want) in y.iter().zip(&want) {
                    assert!((*got as f64 - want).abs() <= 1e-5 * (k as f64).sqrt(), "{out}x{k}, {rows} rows: {got} vs {want}");
                }
                assert_eq!(y[..out], alone[..], "row 0 alone and in a batch of {rows}");
            }
        }
    }
}
