//! Attention of a CPU decode step: one new token per row against that row's own cached keys and
//! values, read up to the row's own length (rows of different lengths need no mask, and nothing
//! past a row's end is used). It first writes each row's new key and value into the cache at the
//! row's position. Grouped-query attention reads each KV head for its group of query heads, and a
//! sliding window limits the positions read. HF's order: scores q·k / √D, softmax (libtorch's), then the
//! probability-weighted sum of values. The sums are AVX2 + FMA on torch's OpenMP threads, which
//! split the (row, head) pairs; reading the cache is the cost (codegen-350M, 500 cached tokens:
//! 82 MB per row per step). A row's result does not depend on its batch: its sums are its own,
//! and so is its softmax, over its own positions only.

use tch::{Device, Kind, Tensor};

use super::matvec::{available, horizontal_sum};
use super::omp::{on_torch_threads, SharedOut};

/// Writes each row's new key and value, `new` (N, KV, 1, D) each, into the cache's keys and values
/// (N, KV, C, D) at the row's position, `attended[n] - 1`, then returns `softmax(q·kᵀ/√D)·v` for
/// query (N, H, 1, D) over the row's first `attended[n]` positions (the last `window` of them
/// when given) -> (N, H, 1, D). Query head h reads key/value head h / (H / KV) (grouped-query
/// attention; KV = H for CodeGen). None, having written nothing, where it does not apply (not
/// fp32 on an AVX2 CPU, or D not a multiple of 8); then the caller writes the cache and runs
/// libtorch's attention.
pub fn decode_step(
    query: &Tensor,
    new: (&Tensor, &Tensor),
    cache: (&mut Tensor, &mut Tensor),
    attended: &[i64],
    window: Option<i64>,
) -> Option<Tensor> {
    let (keys, values) = cache;
    if !applies(query, new, (keys, values), attended, window) {
        return None;
    }
    let (n, h, _, d) = query.size4().ok()?;
    let (_, kv, capacity, _) = keys.size4().ok()?;
    let _guard = tch::no_grad_guard();
    let (query, new_key, new_value) = (query.contiguous(), new.0.contiguous(), new.1.contiguous());
    let (pairs, h, kv, d, capacity) = ((n * h) as usize, h as usize, kv as usize, d as usize, capacity as usize);
    // Each query pair's cache pair (its row's kv head), and the positions it attends to: the row's
    // last `window` (all without one), `first..attended`.
    let cache_pair = |pair: usize| pair / h * kv + pair % h / (h / kv);
    let first = |pair: usize| window.map_or(0, |w| (attended[pair / h] - w).max(0)) as usize;
    let span = |pair: usize| attended[pair / h] as usize - first(pair);
    // Row r's scores, then its probabilities: (H, span) each, so that every row's softmax runs
    // over its own positions only (libtorch sums a row shorter than its vector width in another
    // order than a padded one: a batch would change a short row's result).
    let mut scores: Vec<Tensor> =
        (0..n as usize).map(|r| Tensor::empty([h as i64, span(r * h) as i64], (Kind::Float, Device::Cpu))).collect();
    let scale = (d as f32).sqrt();
    write_new_entries((&new_key, &new_value), (keys, values), attended);
    // SAFETY (both blocks): contiguous fp32 CPU tensors of these element counts, alive for the
    // call; each thread writes only its own pairs' slices of `scores` and `out` (fresh) and reads
    // the cache, which no thread writes any more. The CPU has AVX2 + FMA (`available()`), which
    // `score` and `weighted_sum` enable.
    unsafe {
        let q = std::slice::from_raw_parts(query.data_ptr() as *const f32, pairs * d);
        let k = std::slice::from_raw_parts(keys.data_ptr() as *const f32, n as usize * kv * capacity * d);
        let s: Vec<SharedOut> = scores.iter_mut().map(|t| SharedOut::new(raw_mut(t, t.numel()))).collect();
        for_pairs(pairs, &span, &|pair| {
            let (len, at) = (span(pair), (cache_pair(pair) * capacity + first(pair)) * d);
            score(&q[pair * d..][..d], &k[at..][..len * d], scale, s[pair / h].get().wrapping_add(pair % h * len));
        });
    }
    let probabilities: Vec<Tensor> = scores.iter().map(|t| t.softmax(-1, Kind::Float)).collect();
    let out = Tensor::empty([n, h as i64, 1, d as i64], (Kind::Float, Device::Cpu));
    unsafe {
        let p: Vec<&[f32]> = probabilities.iter().map(|t| std::slice::from_raw_parts(t.data_ptr() as *const f32, t.numel())).collect();
        let v = std::slice::from_raw_parts(values.data_ptr() as *const f32, n as usize * kv * capacity * d);
        let o = SharedOut::new(std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, pairs * d));
        for_pairs(pairs, &span, &|pair| {
            let (len, at) = (span(pair), (cache_pair(pair) * capacity + first(pair)) * d);
            let p = &p[pair / h][pair % h * len..][..len];
            weighted_sum(p, &v[at..][..len * d], o.get().wrapping_add(pair * d), d);
        });
    }
    Some(out)
}

/// Whether `decode_step` applies: one fp32 CPU token per row, D a multiple of 8, whole groups of
/// query heads per KV head, contiguous disjoint caches that hold every row's positions, AVX2.
fn applies(query: &Tensor, new: (&Tensor, &Tensor), cache: (&Tensor, &Tensor), attended: &[i64], window: Option<i64>) -> bool {
    let (Ok((n, h, t, d)), Ok((_, kv, capacity, _))) = (query.size4(), cache.0.size4()) else { return false };
    let (keys, values) = cache;
    t == 1
        && d % 8 == 0
        && kv > 0
        && h % kv == 0
        && window.is_none_or(|w| w > 0)
        && available()
        && [query, new.0, new.1, keys, values].iter().all(|x| x.kind() == Kind::Float && x.device() == Device::Cpu)
        && new.0.size() == [n, kv, 1, d]
        && new.1.size() == new.0.size()
        && keys.size() == [n, kv, capacity, d]
        && values.size() == keys.size()
        && keys.is_contiguous()
        && values.is_contiguous()
        && query.numel() > 0 // no empty slices from libtorch's null data pointers
        && attended.len() == n as usize
        && attended.iter().all(|&a| 1 <= a && a <= capacity)
        && disjoint(&[new.0, new.1, keys, values])
}

/// Copies each row's new key and value (N, KV, 1, D), contiguous, into its cache rows (N, KV, C, D)
/// at the row's last attended position, on this thread, before any thread reads the cache.
fn write_new_entries(new: (&Tensor, &Tensor), cache: (&mut Tensor, &mut Tensor), attended: &[i64]) {
    let (n, kv, capacity, d) = cache.0.size4().expect("(N, KV, C, D)");
    let (n, kv, capacity, d) = (n as usize, kv as usize, capacity as usize, d as usize);
    // SAFETY: `decode_step` checked the shapes, kinds, contiguity and disjointness of these
    // tensors; this thread is the only one touching them here.
    unsafe {
        let new_k = std::slice::from_raw_parts(new.0.data_ptr() as *const f32, n * kv * d);
        let new_v = std::slice::from_raw_parts(new.1.data_ptr() as *const f32, n * kv * d);
        let (k, v) = (raw_mut(cache.0, n * kv * capacity * d), raw_mut(cache.1, n * kv * capacity * d));
        for c in 0..n * kv {
            let slot = (c * capacity + attended[c / kv] as usize - 1) * d;
            k[slot..slot + d].copy_from_slice(&new_k[c * d..][..d]);
            v[slot..slot + d].copy_from_slice(&new_v[c * d..][..d]);
        }
    }
}

/// The `len` floats of a contiguous fp32 tensor, writable.
/// SAFETY: `t` is a contiguous fp32 CPU tensor of `len` elements, and nothing else reads or
/// writes them while the slice lives.
unsafe fn raw_mut(t: &mut Tensor, len: usize) -> &mut [f32] {
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, len) }
}

/// Whether the tensors' memory (as fp32 elements from their data pointers) does not overlap: the
/// step writes the new entries into the cache, and keys and values from different threads.
fn disjoint(tensors: &[&Tensor]) -> bool {
    let span = |t: &Tensor| (t.data_ptr() as usize, t.data_ptr() as usize + 4 * t.numel());
    tensors.iter().enumerate().all(|(i, a)| {
        tensors[i + 1..].iter().all(|b| {
            let ((a0, a1), (b0, b1)) = (span(a), span(b));
            a1 <= b0 || b1 <= a0
        })
    })
}

/// Runs `body(pair)` for every pair on torch's threads, each thread a run of pairs of about
/// equal cost (a pair's cost is its length, at least 1): rows of different lengths keep the
/// threads equally busy.
fn for_pairs(pairs: usize, length: &(dyn Fn(usize) -> usize + Sync), body: &(dyn Fn(usize) + Sync)) {
    let total: usize = (0..pairs).map(length).sum();
    on_torch_threads(&|thread, threads| {
        let mut start = 0;
        for pair in 0..pairs {
            if owner(start, length(pair), total, threads) == thread {
                body(pair);
            }
            start += length(pair);
        }
    });
}

/// The thread that takes the pair of `len` (>= 1) whose cost starts at `start` of `total`: the
/// one whose equal share of the total holds the pair's middle.
fn owner(start: usize, len: usize, total: usize, threads: usize) -> usize {
    debug_assert!(len >= 1 && start + len <= total);
    (start + len / 2) * threads / total
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
        if j + AHEAD + 4 <= rows {
            prefetch_row(keys[(j + AHEAD) * d..].as_ptr(), 4 * d);
        }
        put(j, &unsafe { dot::<4>(q, keys[j * d..].as_ptr()) });
        j += 4;
    }
    while j < rows {
        put(j, &unsafe { dot::<1>(q, keys[j * d..].as_ptr()) });
        j += 1;
    }
}

/// How many cache rows ahead of the one in hand the kernels ask for (4 KB at D = 64): 8 rows'
/// attention of 500 tokens took 18.9 ms per step against 20.9 with the hardware prefetcher alone
/// (`attend_bench`, mean of 5 interleaved pairs); 16 beat 8 and 32.
const AHEAD: usize = 16;

/// Asks for the cache lines of the `len` floats from `start` (a hint: it never faults).
#[target_feature(enable = "avx2,fma")]
fn prefetch_row(start: *const f32, len: usize) {
    use std::arch::x86_64::*;
    for line in (0..len).step_by(16) {
        _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(line) as *const i8);
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
        if j + AHEAD < p.len() {
            prefetch_row(row.wrapping_add(AHEAD * d), 8 * V);
        }
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
    fn every_pair_has_one_owner_and_the_shares_are_even() {
        let lengths = [37, 1, 22, 3, 9, 9, 600, 2];
        let total: usize = lengths.iter().sum();
        for threads in 1..=8 {
            let mut cost = vec![0; threads];
            let mut start = 0;
            for &len in &lengths {
                let thread = owner(start, len, total, threads);
                assert!(thread < threads, "{threads} threads: the pair at {start} went to thread {thread}");
                cost[thread] += len;
                start += len;
            }
            // Each share is within one pair's length of an even split.
            assert!(cost.iter().all(|&c| c.abs_diff(total / threads) <= 600), "{threads} threads: {cost:?}");
        }
        // With equal lengths, an even split by count.
        let owners: Vec<usize> = (0..8).map(|i| owner(i * 10, 10, 80, 2)).collect();
        assert_eq!(owners, [0, 0, 0, 0, 1, 1, 1, 1]);
    }

    #[test]
    fn declines_overlapping_tensors_without_writing() {
        if !available() {
            return;
        }
        let cache = Tensor::zeros([1, 2, 8, 8], (Kind::Float, Device::Cpu));
        let (mut keys, mut values) = (cache.narrow(1, 0, 1), cache.narrow(1, 1, 1)); // halves of one tensor: disjoint
        let query = Tensor::ones([1, 1, 1, 8], (Kind::Float, Device::Cpu));
        assert!(decode_step(&query, (&query, &query.copy()), (&mut keys, &mut values), &[1], None).is_some());
        let before = cache.copy();
        let mut same = keys.shallow_clone();
        assert!(decode_step(&query, (&query, &query), (&mut keys, &mut same), &[2], None).is_none(), "keys and values are one tensor");
        let new_key = keys.narrow(2, 0, 1);
        assert!(decode_step(&query, (&new_key, &query), (&mut keys, &mut values), &[2], None).is_none(), "the new key lies in the cache");
        assert!(cache.equal(&before), "nothing was written");
    }

    #[test]
    fn writes_the_new_entries_and_equals_libtorch_attention_with_each_rows_own_length() {
        if !available() {
            return;
        }
        tch::manual_seed(5);
        let (n, h, capacity) = (5, 4, 37);
        let randn = |shape: [i64; 4]| Tensor::randn(shape, (Kind::Float, Device::Cpu));
        for d in [64, 8, 80] {
            let (query, new_key, new_value) = (randn([n, h, 1, d]), randn([n, h, 1, d]), randn([n, h, 1, d]));
            let (keys, values) = (randn([n, h, capacity, d]), randn([n, h, capacity, d]));
            // Rows shorter and longer than a vector register, beside each other.
            let attended = [37, 1, 22, 3, 9];
            // libtorch's way: scatter each row's new entries to its position, then attend.
            let index = Tensor::from_slice(&attended.map(|a| a - 1)).view([n, 1, 1, 1]).expand([n, h, 1, d], false);
            let (want_keys, want_values) = (keys.scatter(2, &index, &new_key), values.scatter(2, &index, &new_value));
            let (mut got_keys, mut got_values) = (keys.copy(), values.copy());
            let got = decode_step(&query, (&new_key, &new_value), (&mut got_keys, &mut got_values), &attended, None).expect("applies");
            assert!(got_keys.equal(&want_keys) && got_values.equal(&want_values), "d {d}: the cache holds the new entries");
            for (row, &len) in attended.iter().enumerate() {
                let r = |t: &Tensor| t.narrow(0, row as i64, 1);
                let (k, v) = (r(&want_keys).narrow(2, 0, len), r(&want_values).narrow(2, 0, len));
                let want = Tensor::scaled_dot_product_attention::<Tensor>(&r(&query), &k, &v, None, 0.0, false, None, false);
                let diff = (r(&got) - want).abs().max().double_value(&[]);
                assert!(diff < 1e-5, "d {d}, row {row} of {len} positions: off by {diff}");
                // Alone, the row gets exactly what it got beside longer and shorter rows.
                let (mut k, mut v) = (r(&keys).copy(), r(&values).copy());
                let alone = decode_step(&r(&query), (&r(&new_key), &r(&new_value)), (&mut k, &mut v), &[len], None).expect("applies");
                assert!(alone.equal(&r(&got)), "d {d}, row {row}: differs alone and in the batch");
            }
        }
    }

    /// Grouped and multi-query heads and windows: each query head reads its group's cache head over
    /// its row's last `window` positions, as libtorch's attention over repeated heads and a mask.
    #[test]
    fn grouped_heads_and_windows_equal_libtorch_attention_over_repeated_heads() {
        if !available() {
            return;
        }
        tch::manual_seed(9);
        let (n, h, capacity, d) = (4, 6, 30, 16);
        let randn = |shape: [i64; 4]| Tensor::randn(shape, (Kind::Float, Device::Cpu));
        let attended = [30, 1, 7, 12];
        for (kv, window) in [(2, None), (1, Some(5)), (3, Some(40)), (6, Some(1))] {
            let query = randn([n, h, 1, d]);
            let (new_key, new_value) = (randn([n, kv, 1, d]), randn([n, kv, 1, d]));
            let (mut keys, mut values) = (randn([n, kv, capacity, d]), randn([n, kv, capacity, d]));
            let index = Tensor::from_slice(&attended.map(|a| a - 1)).view([n, 1, 1, 1]).expand([n, kv, 1, d], false);
            let (want_keys, want_values) = (keys.scatter(2, &index, &new_key), values.scatter(2, &index, &new_value));
            let got = decode_step(&query, (&new_key, &new_value), (&mut keys, &mut values), &attended, window).expect("applies");
            assert!(keys.equal(&want_keys) && values.equal(&want_values), "kv {kv}: the cache holds the new entries once");
            for (row, &len) in attended.iter().enumerate() {
                let first = window.map_or(0, |w| (len - w).max(0));
                let r =
                    |t: &Tensor| t.narrow(0, row as i64, 1).narrow(2, first, len - first).repeat_interleave_self_int(h / kv, Some(1), None);
                let q = query.narrow(0, row as i64, 1);
                let want =
                    Tensor::scaled_dot_product_attention::<Tensor>(&q, &r(&want_keys), &r(&want_values), None, 0.0, false, None, false);
                let diff = (got.narrow(0, row as i64, 1) - want).abs().max().double_value(&[]);
                assert!(diff < 1e-5, "kv {kv}, window {window:?}, row {row} of {len}: off by {diff}");
            }
        }
    }
}
