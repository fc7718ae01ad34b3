//! Choosing the next token from one sequence's logits, on the host: OpenAI's presence and
//! frequency penalties, then greedy (temperature 0) or HF's sampling warpers in HF's order
//! (temperature, top-k, top-p), drawn with the sequence's own seeded generator, so a sequence's
//! choices do not depend on what else is in the batch. Also the model's log-probabilities.

use std::collections::HashMap;

use zerotune_data::rng::SplitMix64;

use crate::error::WorkerError;

/// How one sequence picks its tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 (or below 1e-5) means greedy.
    pub temperature: f64,
    /// 1 disables nucleus filtering.
    pub top_p: f64,
    /// 0 disables top-k filtering.
    pub top_k: usize,
    /// Subtracted once from the logit of every token already generated (OpenAI).
    pub presence_penalty: f64,
    /// Subtracted from a token's logit once per time it was generated (OpenAI).
    pub frequency_penalty: f64,
}

impl SamplingParams {
    /// Refuses what sampling cannot use, naming the `worker generate` flag.
    pub fn check(&self) -> Result<(), WorkerError> {
        let t = self.temperature;
        if !t.is_finite() || t < 0.0 {
            return Err(WorkerError::Flag {
                flag: "--temperature",
                value: t.to_string(),
                rule: "must be a finite number, 0 (greedy) or more",
            });
        }
        let p = self.top_p;
        if !(p > 0.0 && p <= 1.0) {
            return Err(WorkerError::Flag { flag: "--top_p", value: p.to_string(), rule: "must be in (0, 1]" });
        }
        Ok(())
    }
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 0.0, top_p: 1.0, top_k: 0, presence_penalty: 0.0, frequency_penalty: 0.0 }
    }
}

/// A sequence's generator: SplitMix64 (zerotune-data), seeded per request and choice.
#[derive(Clone, Debug)]
pub struct Rng(SplitMix64);

impl Rng {
    /// The stream of choice `index` of a request seeded with `seed`.
    pub fn new(seed: u64, index: u64) -> Self {
        let mut rng = SplitMix64::new(seed ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03));
        rng.next_u64();
        Self(rng)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        self.0.next_f64()
    }

    /// The underlying generator.
    pub fn inner(&mut self) -> &mut SplitMix64 {
        &mut self.0
    }
}

/// A seed for a request that gave none: the clock, mixed with a counter so two in the same
/// nanosecond differ.
pub fn fresh_seed() -> u64 {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    Rng::new(nanos, COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)).next_u64()
}

/// One sequence's sampling state: its settings, generator and the counts the penalties need.
#[derive(Clone, Debug)]
pub struct TokenSampler {
    pub params: SamplingParams,
    rng: Rng,
    counts: HashMap<u32, u32>,
}

impl TokenSampler {
    pub fn new(params: SamplingParams, rng: Rng) -> Self {
        Self { params, rng, counts: HashMap::new() }
    }

    /// The next token id from `logits` (V,), which it may change in place; records the choice.
    pub fn pick(&mut self, logits: &mut [f32]) -> u32 {
        let p = &self.params;
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&id, &count) in &self.counts {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l -= (p.frequency_penalty * count as f64 + p.presence_penalty) as f32;
                }
            }
        }
        // Below GREEDY_BELOW the division would overflow f32: sampling's limit there is greedy.
        let id = if p.temperature < GREEDY_BELOW { argmax(logits) } else { self.draw(logits) };
        *self.counts.entry(id).or_default() += 1;
        id
    }

    /// HF's TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper, then a draw.
    fn draw(&mut self, logits: &mut [f32]) -> u32 {
        let p = &self.params;
        let temperature = p.temperature as f32;
        logits.iter_mut().for_each(|l| *l /= temperature);
        if p.top_k > 0 && p.top_k < logits.len() {
            let threshold = kth_largest(logits, p.top_k);
            logits.iter_mut().filter(|l| **l < threshold).for_each(|l| *l = f32::NEG_INFINITY);
        }
        let mut probs = softmax(logits);
        if p.top_p < 1.0 {
            // Drop the low tail whose cumulative probability is <= 1 - top_p; keep at least one.
            let mut order: Vec<usize> = (0..probs.len()).collect();
            order.sort_by(|&a, &b| probs[a].total_cmp(&probs[b]).then(a.cmp(&b)));
            let mut cumulative = 0.0;
            for &i in &order[..order.len() - 1] {
                cumulative += probs[i];
                if cumulative > 1.0 - p.top_p {
                    break;
                }
                probs[i] = 0.0;
            }
        }
        let total: f64 = probs.iter().sum();
        let mut target = self.rng.next_f64() * total;
        let mut last = 0;
        for (i, &q) in probs.iter().enumerate() {
            if q > 0.0 {
                last = i;
                if target < q {
                    return i as u32;
                }
                target -= q;
            }
        }
        last as u32
    }
}

/// Temperatures below this decode greedily.
const GREEDY_BELOW: f64 = 1e-5;

/// The first index of the largest value, as torch.argmax.
pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] || (xs[best].is_nan() && !x.is_nan()) {
            best = i;
        }
    }
    best as u32
}

fn kth_largest(xs: &[f32], k: usize) -> f32 {
    let mut sorted: Vec<f32> = xs.to_vec();
    let (_, kth, _) = sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    *kth
}

/// Probabilities in f64.
fn softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let exps: Vec<f64> = logits.iter().map(|&l| (l as f64 - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// log-softmax of `logits` at `id`, and the `top` most likely ids with theirs (most likely first).
pub fn logprobs(logits: &[f32], id: u32, top: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max + logits.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln();
    let lp = |i: u32| (logits[i as usize] as f64 - lse) as f32;
    let mut best: Vec<u32> = (0..logits.len() as u32).collect();
    let top = top.min(best.len());
    if top > 0 {
        best.select_nth_unstable_by(top - 1, |&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
    }
    best.truncate(top);
    best.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
    (lp(id), best.into_iter().map(|i| (i, lp(i))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(params: SamplingParams, seed: u64) -> TokenSampler {
        TokenSampler::new(params, Rng::new(seed, 0))
    }

    #[test]
    fn greedy_takes_the_first_largest_and_penalties_apply_per_occurrence() {
        let mut s = sampler(SamplingParams::default(), 0);
        assert_eq!(s.pick(&mut [0.0, 3.0, 3.0, -1.0]), 1, "ties go to the first, as torch.argmax");
        let params = SamplingParams { frequency_penalty: 1.0, presence_penalty: 0.5, ..Default::default() };
        let mut s = sampler(params, 0);
        assert_eq!(s.pick(&mut [0.0, 3.0, 2.0]), 1);
        // Token 1 now loses 1.5: 3.0 - 1.5 < 2.0.
        assert_eq!(s.pick(&mut [0.0, 3.0, 2.0]), 2);
        // Both were seen once: 3.0 - 1.5 = 1.5 vs 2.0 - 1.5 = 0.5.
        assert_eq!(s.pick(&mut [0.0, 3.0, 2.0]), 1);
    }

    /// Draws follow the softmax, top-k keeps the k largest and top-p the smallest set reaching
    /// p, and the same seed draws the same tokens.
    #[test]
    fn sampling_follows_the_warped_distribution_and_is_seeded() {
        let logits = [2.0f32, 1.0, 0.5, -1.0];
        let draws = |params: SamplingParams, seed| {
            let mut s = sampler(params, seed);
            let mut counts = [0usize; 4];
            for _ in 0..20_000 {
                counts[s.draw(&mut logits.clone()) as usize] += 1;
            }
            counts
        };
        let plain = SamplingParams { temperature: 1.0, ..Default::default() };
        let counts = draws(plain.clone(), 1);
        let expected = softmax(&logits);
        for (c, e) in counts.iter().zip(&expected) {
            assert!((*c as f64 / 20_000.0 - e).abs() < 0.015, "{counts:?} vs {expected:?}");
        }
        assert_eq!(counts, draws(plain.clone(), 1), "same seed, same draws");
        assert_ne!(counts, draws(plain.clone(), 2));
        let top_k = draws(SamplingParams { top_k: 2, ..plain.clone() }, 1);
        assert_eq!((top_k[2], top_k[3]), (0, 0));
        // Probabilities 0.61, 0.22, 0.14, 0.03: top_p 0.7 keeps the first two.
        let top_p = draws(SamplingParams { top_p: 0.7, ..plain.clone() }, 1);
        assert!(top_p[0] > 0 && top_p[1] > 0 && top_p[2] == 0 && top_p[3] == 0, "{top_p:?}");
        let top_p = draws(SamplingParams { top_p: 0.1, ..plain }, 1);
        assert_eq!(top_p, [20_000, 0, 0, 0], "at least one token stays");
    }

    #[test]
    fn logprobs_are_the_log_softmax() {
        let logits = [1.0f32, 3.0, 2.0, 3.0];
        let (lp, top) = logprobs(&logits, 2, 3);
        let lse = logits.iter().map(|&l| (l as f64).exp()).sum::<f64>().ln();
        assert!((lp as f64 - (2.0 - lse)).abs() < 1e-6);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 3, 2]);
        assert!((top[0].1 as f64 - (3.0 - lse)).abs() < 1e-6);
    }
}
