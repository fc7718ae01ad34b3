//! Decoding checks every architecture must pass, on any model: rows of different lengths decoding
//! together each get their lone logits, and a prompt continued from a cached prefix gets the
//! logits of its whole prefill.

use tch::Tensor;
use zerotune_worker::model::{BatchCache, KvCache, Model};

use super::rel_err;

const LOGITS_REL: f64 = 1e-5;

/// Rows of different lengths (11, 3 and 25 tokens) decoding together each get the logits of
/// their lone run, a row that leaves changes nothing, and equal rows decode without a mask.
#[allow(dead_code)] // not every test binary decodes
pub fn assert_batched_decode_is_lone_decode(model: &Model, n_positions: usize) {
    let _guard = tch::no_grad_guard();
    let prompts: Vec<Vec<i64>> = vec![(1..12).collect(), vec![5, 9, 2], (20..45).collect()];
    let next = |step: i64, row: usize| (7 * step + 3 * row as i64) % 300 + 1;
    // Alone: prefill, then one token at a time.
    let mut alone = vec![];
    for (row, prompt) in prompts.iter().enumerate() {
        let mut cache = KvCache::default();
        let _ = model.forward_cached(&Tensor::from_slice(prompt).view([1, -1]), Some(&mut cache), false);
        let steps: Vec<Tensor> = (0..4)
            .map(|step| model.forward_cached(&Tensor::from_slice(&[next(step, row)]).view([1, 1]), Some(&mut cache), false).view(-1))
            .collect();
        alone.push(steps);
    }
    // Together: rows join after their own prefill; row 1 leaves after step 1.
    let mut batch = BatchCache::new(n_positions as i64);
    for prompt in &prompts {
        let mut cache = KvCache::default();
        let _ = model.prefill(&Tensor::from_slice(prompt).view([1, -1]), &mut cache, false);
        batch.push(&cache);
    }
    let mut rows = vec![0, 1, 2];
    for step in 0..4 {
        let ids: Vec<i64> = rows.iter().map(|&r| next(step, r)).collect();
        let logits = model.decode(&Tensor::from_slice(&ids).view([-1, 1]), &mut batch);
        for (i, &row) in rows.iter().enumerate() {
            let err = rel_err(&format!("row {row} step {step}"), &logits.get(i as i64), &alone[row][step as usize]);
            assert!(err < LOGITS_REL, "row {row} step {step}: {err:.2e}");
        }
        if step == 1 {
            batch.retain(&[true, false, true]);
            rows = vec![0, 2];
        }
    }
    assert_eq!(batch.lengths(), [11 + 4, 25 + 4]);

    // Rows of equal length decode without a mask: two copies of prompt 0 give its lone logits.
    let mut cache = KvCache::default();
    let _ = model.prefill(&Tensor::from_slice(&prompts[0]).view([1, -1]), &mut cache, false);
    let mut batch = BatchCache::new(n_positions as i64);
    batch.push(&cache.repeat(2));
    for step in 0..4 {
        let ids = Tensor::from_slice(&[next(step, 0), next(step, 0)]).view([-1, 1]);
        let logits = model.decode(&ids, &mut batch);
        for row in 0..2 {
            let err = rel_err(&format!("equal row {row} step {step}"), &logits.get(row), &alone[0][step as usize]);
            assert!(err < LOGITS_REL, "equal rows, step {step}: {err:.2e}");
        }
    }
}

/// A prompt prefilled after a cached prefix of it (the server's prefix cache: cut from the cache
/// of an earlier prompt that went on differently) gets the logits of one prefill over the whole
/// prompt, for every position, and its cache then decodes the same.
#[allow(dead_code)]
pub fn assert_a_cached_prefix_continues_as_the_whole_prefill(model: &Model) {
    let _guard = tch::no_grad_guard();
    let prompt: Vec<i64> = (0..40).map(|i| (i * 37) % 500 + 1).collect();
    let ids = Tensor::from_slice(&prompt).view([1, -1]);
    let mut whole = KvCache::default();
    let reference = model.prefill(&ids, &mut whole, true);
    for cached in [1, 17, 39] {
        let mut earlier = KvCache::default();
        let other = Tensor::from_slice(&[3i64, 1, 4, 1, 5]).view([1, 5]);
        let _ = model.prefill(&Tensor::cat(&[ids.narrow(1, 0, cached), other], 1), &mut earlier, false);
        let mut cache = earlier.prefix(cached);
        let rest = model.prefill(&ids.narrow(1, cached, 40 - cached), &mut cache, true);
        let want = reference.narrow(1, cached, 40 - cached);
        let rel = (&rest - &want).abs().max().double_value(&[]) / want.abs().max().double_value(&[]);
        assert!(rel < 1e-5, "{cached} cached tokens: rel {rel:.2e}");
        assert_eq!(cache.len(), 40);
        let next = Tensor::from_slice(&[7i64]).view([1, 1]);
        let (a, b) =
            (model.forward_cached(&next, Some(&mut cache), false), model.forward_cached(&next, Some(&mut whole.prefix(40)), false));
        let rel = (&a - &b).abs().max().double_value(&[]) / b.abs().max().double_value(&[]);
        assert!(rel < 1e-5, "decoding after {cached} cached tokens: rel {rel:.2e}");
    }
}
