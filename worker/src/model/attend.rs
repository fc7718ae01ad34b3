//! Attention of a CPU decode step: one new token per row against that row's own cached keys and
//! values, read up to the row's own length (rows of different lengths need no mask, and nothing
//! past a row's end is read). HF's CodeGen order: scores q·k / √D, softmax (libtorch's), then the
//! probability-weighted sum of values. The sums are AVX2 + FMA on torch's OpenMP threads, which
//! split the (row, head) pairs; reading the cache is the cost (codegen-350M, 500 cached tokens:
//! 82 MB per row per step). A row's result does not depend on its batch: its sums are its own,
//! and so is its softmax, over its own positions only.

use tch::{Device, Kind, Tensor};

use super::matvec::{available, horizontal_sum};
use super::omp::{on_torch_threads, SharedOut};

/// `softmax(q·kᵀ/√D)·v` for query (N, H, 1, D) and the cache's keys and values (N, H, C, D), of
/// which row n attends to its first `attended[n]` positions -> (N, H, 1, D). None where it does
/// not apply (not fp32 on an AVX2 CPU, or D not a multiple of 8); then libtorch's attention runs.
pub fn decode_step(query: &Tensor, keys: &Tensor, values: &Tensor, attended: &[i64]) -> Option<Tensor> {
    let (n, h, t, d) = query.size4().ok()?;
    let (_, _, capacity, _) = keys.size4().ok()?;
    let applies = t == 1
        && d % 8 == 0
        && available()
        && [query, keys, values].iter().all(|x| x.kind() == Kind::Float && x.device() == Device::Cpu)
        && keys.size() == [n, h, capacity, d]
        && values.size() == keys.size()
        && keys.is_contiguous()
        && values.is_contiguous()
        && attended.len() == n as usize
        && attended.iter().all(|&a| 1 <= a && a <= capacity);
    if !applies {
        return None;
    }
    let _guard = tch::no_grad_guard();
    let query = query.contiguous();
    let (pairs, h, d, capacity) = ((n * h) as usize, h as usize, d as usize, capacity as usize);
    let length = |pair: usize| attended[pair / h] as usize;
    // Row r's scores, then its probabilities: (H, attended[r]) each, so that every row's softmax
    // runs over its own positions only (libtorch sums a row shorter than its vector width in
    // another order than a padded one: a batch would change a short row's result).
    let mut scores: Vec<Tensor> = attended.iter().map(|&len| Tensor::empty([h as i64, len], (Kind::Float, Device::Cpu))).collect();
    let scale = (d as f32).sqrt();
    // SAFETY (both blocks): contiguous fp32 CPU tensors of these element counts, alive for the
    // call; `scores` and `out` are fresh, and each thread writes only its own pairs' rows; the CPU
    // has AVX2 + FMA (`available()`), which `score` and `weighted_sum` enable.
    unsafe {
        let q = std::slice::from_raw_parts(query.data_ptr() as *const f32, pairs * d);
        let k = std::slice::from_raw_parts(keys.data_ptr() as *const f32, pairs * capacity * d);
        let s: Vec<SharedOut> =
            scores.iter_mut().map(|t| SharedOut::new(std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, t.numel()))).collect();
        for_pairs(pairs, &|pair| {
            let len = length(pair);
            score(&q[pair * d..][..d], &k[pair * capacity * d..][..len * d], scale, s[pair / h].get().wrapping_add(pair % h * len));
        });
    }
    let probabilities: Vec<Tensor> = scores.iter().map(|t| t.softmax(-1, Kind::Float)).collect();
    let out = Tensor::empty([n, h as i64, 1, d as i64], (Kind::Float, Device::Cpu));
    unsafe {
        let p: Vec<&[f32]> = probabilities.iter().map(|t| std::slice::from_raw_parts(t.data_ptr() as *const f32, t.numel())).collect();
        let v = std::slice::from_raw_parts(values.data_ptr() as *const f32, pairs * capacity * d);
        let o = SharedOut::new(std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, pairs * d));
        for_pairs(pairs, &|pair| {
            let len = length(pair);
            let p = &p[pair / h][pair % h * len..][..len];
            weighted_sum(p, &v[pair * capacity * d..][..len * d], o.get().wrapping_add(pair * d), d);
        });
    }
    Some(out)
}

/// Runs `body(pair)` for every pair, split evenly across torch's threads.
fn for_pairs(pairs: usize, body: &(dyn Fn(usize) + Sync)) {
    on_torch_threads(&|thread, threads| (pairs * thread / threads..pairs * (thread + 1) / threads).for_each(body));
}

/// `out[j] = (q · keys[j]) / scale` for each key row j of keys (rows of q.len() floats), four keys
/// at a time so four FMA chains run side by side. Its own target features let `dot` inline.
#[target_feature(enable = "avx2,fma")]
fn score(q: &[f32], keys: &[f32], scale: f32, out: *mut f32) {
    let d = q.len();
    let rows = keys.len() / d;
    let put = |j: usize, dots: &[f32]| {
        for (i, dot) in dots.iter().enumerate() {
            // SAFETY: column j + i < rows, in the pair's row of `out`, which only this thread writes.
            unsafe { *out.wrapping_add(j + i) = dot / scale };
        }
    };
    let mut j = 0;
    // SAFETY (both): rows j.. are inside keys.
    while j + 4 <= rows {
        put(j, &unsafe { dot::<4>(q, keys[j * d..].as_ptr()) });
        j += 4;
    }
    while j < rows {
        put(j, &unsafe { dot::<1>(q, keys[j * d..].as_ptr()) });
        j += 1;
    }
}

/// `q · keys[i]` for the B rows of q.len() (a multiple of 8) floats that start at `keys`.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)] // i indexes the register block
unsafe fn dot<const B: usize>(q: &[f32], keys: *const f32) -> [f32; B] {
    use std::arch::x86_64::*;
    let d = q.len();
    let mut acc = [_mm256_setzero_ps(); B];
    let mut c = 0;
    while c < d {
        // SAFETY: c + 8 <= d, inside q and each of the B key rows.
        let qv = unsafe { _mm256_loadu_ps(q.as_ptr().wrapping_add(c)) };
        for i in 0..B {
            acc[i] = _mm256_fmadd_ps(unsafe { _mm256_loadu_ps(keys.wrapping_add(i * d + c)) }, qv, acc[i]);
        }
        c += 8;
    }
    let mut dots = [0f32; B];
    for i in 0..B {
        dots[i] = horizontal_sum(acc[i]);
    }
    dots
}

/// `out = Σ_j p[j] · values[j]`, over the rows of `values` (d floats each, d a multiple of 8),
/// accumulated eight lanes at a time; out holds d floats only this thread writes.
#[target_feature(enable = "avx2,fma")]
fn weighted_sum(p: &[f32], values: &[f32], out: *mut f32, d: usize) {
    let mut c = 0;
    // SAFETY (both): c + 8·V <= d, columns inside every row of values and inside out.
    while c + 64 <= d {
        unsafe { columns::<8>(p, values, out, d, c) };
        c += 64;
    }
    while c < d {
        unsafe { columns::<1>(p, values, out, d, c) };
        c += 8;
    }
}

/// Columns c..c + 8·V of `out = Σ_j p[j] · values[j]`, in V accumulators.
#[target_feature(enable = "avx2,fma")]
unsafe fn columns<const V: usize>(p: &[f32], values: &[f32], out: *mut f32, d: usize, c: usize) {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_ps(); V];
    for (j, &pj) in p.iter().enumerate() {
        let pv = _mm256_set1_ps(pj);
        let row = values.as_ptr().wrapping_add(j * d + c);
        for (i, acc) in acc.iter_mut().enumerate() {
            // SAFETY: c + 8·V <= d: inside row j (the caller's bound).
            *acc = _mm256_fmadd_ps(pv, unsafe { _mm256_loadu_ps(row.wrapping_add(8 * i)) }, *acc);
        }
    }
    for (i, acc) in acc.iter().enumerate() {
        // SAFETY: inside out's d floats.
        unsafe { _mm256_storeu_ps(out.wrapping_add(c + 8 * i), *acc) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equals_libtorch_attention_with_each_rows_own_length() {
        if !available() {
            return;
        }
        tch::manual_seed(5);
        let (n, h, capacity) = (5, 4, 37);
        for d in [64, 8, 80] {
            let query = Tensor::randn([n, h, 1, d], (Kind::Float, Device::Cpu));
            let keys = Tensor::randn([n, h, capacity, d], (Kind::Float, Device::Cpu));
            let values = Tensor::randn([n, h, capacity, d], (Kind::Float, Device::Cpu));
            // Rows shorter and longer than a vector register, beside each other.
            let attended = [37, 1, 22, 3, 9];
            let got = decode_step(&query, &keys, &values, &attended).expect("applies");
            for (row, &len) in attended.iter().enumerate() {
                let r = |t: &Tensor| t.narrow(0, row as i64, 1);
                let (k, v) = (r(&keys).narrow(2, 0, len), r(&values).narrow(2, 0, len));
                let want = Tensor::scaled_dot_product_attention::<Tensor>(&r(&query), &k, &v, None, 0.0, false, None, false);
                let diff = (r(&got) - want).abs().max().double_value(&[]);
                assert!(diff < 1e-5, "d {d}, row {row} of {len} positions: off by {diff}");
                // Alone, the row gets exactly what it got beside longer and shorter rows.
                let alone = decode_step(&r(&query), &r(&keys), &r(&values), &[len]).expect("applies");
                assert!(alone.equal(&r(&got)), "d {d}, row {row}: differs alone and in the batch");
            }
        }
    }
}
