//! Text generation with a KV cache (HF `generate` semantics): greedy by default, or sampling with
//! temperature, top-k and top-p; stops at EOS or after `max_new_tokens`.

use tch::{Device, Kind, Tensor};

use crate::model::{CodeGen, KvCache};

/// Decoding settings (HF `GenerationConfig` names).
#[derive(Clone, Debug)]
pub struct Sampling {
    pub max_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    /// 0 disables top-k filtering.
    pub top_k: i64,
    /// 1 disables nucleus filtering.
    pub top_p: f64,
    pub seed: u64,
    pub eos_id: Option<i64>,
}

/// New token ids following `prompt` (EOS included when produced).
pub fn generate(model: &CodeGen, prompt: &[i64], sampling: &Sampling, device: Device) -> Vec<i64> {
    let _guard = tch::no_grad_guard();
    tch::manual_seed(sampling.seed as i64);
    let limit = model.config.n_positions.saturating_sub(prompt.len());
    let mut cache = KvCache::default();
    let mut input = Tensor::from_slice(prompt).view([1, -1]).to_device(device);
    let mut out = vec![];
    for _ in 0..sampling.max_new_tokens.min(limit) {
        let logits = model.forward_cached(&input, Some(&mut cache), false);
        let last = logits.select(1, -1).squeeze_dim(0);
        let next = pick(&last, sampling);
        out.push(next);
        if Some(next) == sampling.eos_id {
            break;
        }
        input = Tensor::from_slice(&[next]).view([1, 1]).to_device(device);
    }
    out
}

/// Chooses the next id from logits (V,).
fn pick(logits: &Tensor, s: &Sampling) -> i64 {
    if s.temperature <= 0.0 {
        return logits.argmax(0, false).int64_value(&[]);
    }
    let mut logits = logits / s.temperature;
    let v = logits.size()[0];
    if s.top_k > 0 && s.top_k < v {
        let threshold = logits.topk(s.top_k, 0, true, true).0.select(0, s.top_k - 1);
        logits = logits.masked_fill(&logits.lt_tensor(&threshold), f64::NEG_INFINITY);
    }
    if s.top_p < 1.0 {
        // HF TopPLogitsWarper: drop the low tail whose cumulative probability is <= 1 - top_p.
        let (sorted, indices) = logits.sort(0, false);
        let cumulative = sorted.softmax(0, Kind::Float).cumsum(0, Kind::Float);
        let remove = cumulative.le(1.0 - s.top_p);
        let _ = remove.narrow(0, v - 1, 1).fill_(0);
        let remove = remove.scatter(0, &indices, &remove);
        logits = logits.masked_fill(&remove, f64::NEG_INFINITY);
    }
    logits.softmax(0, Kind::Float).multinomial(1, false).int64_value(&[0])
}
