//! The Llama decoder family (HF `modeling_llama.py`, `modeling_qwen2.py`,
//! `modeling_starcoder2.py`) in tch: sequential pre-norm blocks (RMSNorm, or LayerNorm with bias
//! for StarCoder2), separate q/k/v projections with NeoX rotary over the whole head (`rope.rs`),
//! grouped-query attention (KV heads each serving H / KV query heads; caches hold the KV heads
//! only), per-layer sliding windows, a SwiGLU MLP (or StarCoder2's GELU one), a final norm and an
//! lm_head that may be the embedding; StarCoder2's embedding, residual and attention dropout.
//! Shapes: B batch, T tokens, E hidden, H query heads, KV key/value heads, D head_dim, I MLP
//! width, V vocab rows, N rows of a decode step.

use tch::{Device, Kind, Reduction, Tensor};
use zerotune_hf::DecoderConfig;

use super::kv::{BatchCache, KvCache, Step};
use super::params::ParamSet;
use super::rope::{Rope, RowAngles};
use super::shared::{project, token_loss, Stack};

/// RMSNorm (Llama, Qwen2) or LayerNorm with bias (StarCoder2).
struct Norm {
    weight: Tensor,
    bias: Option<Tensor>,
    eps: f64,
}

impl Norm {
    /// xs: (B, T, E) -> (B, T, E)
    fn forward(&self, xs: &Tensor) -> Tensor {
        match &self.bias {
            Some(bias) => xs.layer_norm([self.weight.size()[0]], Some(&self.weight), Some(bias), self.eps, true),
            None => {
                // HF: the mean square in f32, the result cast back before the weight multiplies it.
                let x = xs.to_kind(Kind::Float);
                let y = &x * (x.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float) + self.eps).rsqrt();
                &self.weight * y.to_kind(xs.kind())
            }
        }
    }
}

/// A linear layer's weight (out, in) and optional bias (out,).
struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// `rows`: the rows of a CPU decode step (0 otherwise), for `shared::project`.
    fn forward(&self, xs: &Tensor, rows: i64) -> Tensor {
        project(xs, &self.weight, self.bias.as_ref(), rows)
    }
}

struct Block {
    input_layernorm: Norm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    post_attention_layernorm: Norm,
    /// gate, up, down (SwiGLU) or c_fc, c_proj (GELU).
    mlp: Vec<Linear>,
    /// Keys a token sees, itself included (`None`: every earlier one).
    window: Option<i64>,
}

/// Where a block's attention finds its positions and past keys.
enum Context<'a> {
    /// Tokens at positions `start..`, causal among themselves, appended to `cache` when given.
    Sequence { start: i64, cache: Option<&'a mut (Tensor, Tensor)> },
    /// One token per row at the step's positions: its key and value are written into the batch
    /// cache's `layer`, and it attends to its row's positions up to its own.
    Batch { step: &'a Step, angles: &'a RowAngles, layer: &'a mut (Tensor, Tensor) },
}

impl Context<'_> {
    /// The rows of a decode step (0 for a sequence), for `shared::project`.
    fn rows(&self, xs: &Tensor) -> i64 {
        if matches!(self, Context::Batch { .. }) {
            xs.size()[0]
        } else {
            0
        }
    }
}

/// The model: parameter handles into a `ParamSet` plus the rotary tables.
pub struct Decoder {
    pub config: DecoderConfig,
    embed_tokens: Tensor,
    blocks: Vec<Block>,
    norm: Norm,
    /// The embedding itself when tied.
    lm_head: Tensor,
    rope: Rope,
}

impl Decoder {
    /// Binds the model to `params` (laid out by `config.parameter_shapes()`).
    pub fn new(config: &DecoderConfig, params: &ParamSet) -> Decoder {
        let linear = |name: &str| Linear { weight: params.get(&format!("{name}.weight")), bias: params.find(&format!("{name}.bias")) };
        let norm = |name: &str| {
            let Linear { weight, bias } = linear(name);
            Norm { weight, bias, eps: config.norm_eps }
        };
        let mlp_names: &[&str] = if config.gated_mlp() { &["gate_proj", "up_proj", "down_proj"] } else { &["c_fc", "c_proj"] };
        let blocks = (0..config.num_hidden_layers)
            .map(|l| {
                let p = format!("model.layers.{l}");
                Block {
                    input_layernorm: norm(&format!("{p}.input_layernorm")),
                    q_proj: linear(&format!("{p}.self_attn.q_proj")),
                    k_proj: linear(&format!("{p}.self_attn.k_proj")),
                    v_proj: linear(&format!("{p}.self_attn.v_proj")),
                    o_proj: linear(&format!("{p}.self_attn.o_proj")),
                    post_attention_layernorm: norm(&format!("{p}.post_attention_layernorm")),
                    mlp: mlp_names.iter().map(|m| linear(&format!("{p}.mlp.{m}"))).collect(),
                    window: config.windows[l].map(|w| w as i64),
                }
            })
            .collect();
        let embed_tokens = params.get("model.embed_tokens.weight");
        let lm_head = if config.tie_word_embeddings { embed_tokens.shallow_clone() } else { params.get("lm_head.weight") };
        let flat = &params.flat;
        Decoder {
            config: config.clone(),
            embed_tokens,
            blocks,
            norm: norm("model.norm"),
            lm_head,
            rope: Rope::new(config, flat.kind(), flat.device()),
        }
    }

    /// One new token per row of `cache`, each at its own position (the row's length): each row's
    /// logits are those it would get alone.  ids: (N, 1) -> (N, V)
    pub fn decode(&self, ids: &Tensor, cache: &mut BatchCache) -> Tensor {
        let step = cache.step();
        let angles = self.rope.at(&step.positions);
        let mut xs = self.embed(ids, false);
        for (block, layer) in self.blocks.iter().zip(cache.layers.iter_mut()) {
            xs = self.block(block, &xs, Context::Batch { step: &step, angles: &angles, layer }, false);
        }
        cache.advance();
        self.logits(&self.norm.forward(&xs)).squeeze_dim(1)
    }

    /// The final hidden states after the norm, appending to `cache` when given.  (B, T) -> (B, T, E)
    fn hidden(&self, ids: &Tensor, mut cache: Option<&mut KvCache>, train: bool) -> Tensor {
        let start = cache.as_ref().map_or(0, |c| c.len());
        let mut h = self.embed(ids, train);
        for (l, block) in self.blocks.iter().enumerate() {
            let layer = cache.as_deref_mut().map(|c| c.layer(l));
            h = self.block(block, &h, Context::Sequence { start, cache: layer }, train);
        }
        self.norm.forward(&h)
    }

    /// Token embeddings with embedding dropout. The pad row (`pad_token_id`) gets no gradient from
    /// the lookup, as nn.Embedding's padding_idx.  ids: (B, T) -> (B, T, E)
    fn embed(&self, ids: &Tensor, train: bool) -> Tensor {
        let pad = self.config.pad_token_id.unwrap_or(-1);
        Tensor::embedding(&self.embed_tokens, ids, pad, false, false).dropout(self.config.dropout.embedding, train)
    }

    /// Logits in f32.  (B, T, E) -> (B, T, V)
    fn logits(&self, h: &Tensor) -> Tensor {
        let rows = if h.size()[1] == 1 { h.size()[0] } else { 0 };
        project(h, &self.lm_head, None, rows).to_kind(Kind::Float)
    }

    /// Pre-norm residual: h = x + attn(norm(x)), then h + mlp(norm(h)).  (B, T, E) -> (B, T, E)
    fn block(&self, block: &Block, xs: &Tensor, context: Context, train: bool) -> Tensor {
        let rows = context.rows(xs);
        let residual = self.config.dropout.residual;
        let h = xs + self.attention(block, &block.input_layernorm.forward(xs), context, train).dropout(residual, train);
        let normed = block.post_attention_layernorm.forward(&h);
        let mlp = match block.mlp.as_slice() {
            [gate, up, down] => down.forward(&(gate.forward(&normed, rows).silu() * up.forward(&normed, rows)), rows),
            [fc, proj] => proj.forward(&fc.forward(&normed, rows).gelu("tanh"), rows),
            _ => unreachable!("an MLP of 2 or 3 matrices"),
        };
        &h + mlp.dropout(residual, train)
    }

    /// Attention of every token over those before it, within the block's window.
    /// xs: (B, T, E) -> (B, T, E)
    fn attention(&self, block: &Block, xs: &Tensor, context: Context, train: bool) -> Tensor {
        let (b, t, _) = xs.size3().expect("(B, T, E)");
        let c = &self.config;
        let (h, kv, d) = (c.num_attention_heads as i64, c.num_key_value_heads as i64, c.head_dim as i64);
        let rows = context.rows(xs);
        let heads = |proj: &Linear, n: i64| proj.forward(xs, rows).view([b, t, n, d]).transpose(1, 2);
        let (query, key, value) = (heads(&block.q_proj, h), heads(&block.k_proj, kv), heads(&block.v_proj, kv));
        let dropout = if train { c.dropout.attention } else { 0.0 };
        let out = match context {
            Context::Sequence { start, cache } => {
                let (query, mut key, mut value) = (self.rope.apply(&query, start), self.rope.apply(&key, start), value);
                if let Some((past_k, past_v)) = cache {
                    if past_k.defined() {
                        key = Tensor::cat(&[&*past_k, &key], 2);
                        value = Tensor::cat(&[&*past_v, &value], 2);
                    }
                    (*past_k, *past_v) = (key.shallow_clone(), value.shallow_clone());
                }
                let (causal, mask) = sequence_mask(t, key.size()[2], block.window, xs.device());
                let (key, value) = (self.group(key), self.group(value));
                Tensor::scaled_dot_product_attention(&query, &key, &value, mask.as_ref(), dropout, causal, None, false)
            }
            Context::Batch { step, angles, layer } => {
                let (query, key) = (self.rope.apply_rows(&query, angles), self.rope.apply_rows(&key, angles));
                self.decode_attention(&query, (&key, &value), layer, step, block.window)
            }
        };
        block.o_proj.forward(&out.transpose(1, 2).reshape([b, t, h * d]), rows)
    }

    /// A decode step's attention: each row's new key and value go into its cache row at its
    /// position, and its query attends to its own positions (the last `window` of them).
    /// query (N, H, 1, D), new (N, KV, 1, D) each -> (N, H, 1, D)
    fn decode_attention(
        &self,
        query: &Tensor,
        new: (&Tensor, &Tensor),
        layer: &mut (Tensor, Tensor),
        step: &Step,
        window: Option<i64>,
    ) -> Tensor {
        let (cache_k, cache_v) = layer;
        if let Some(out) = super::attend::decode_step(query, new, (cache_k, cache_v), &step.attended, window) {
            return out;
        }
        let index = step.positions.view([-1, 1, 1, 1]).expand_as(new.0);
        let _ = cache_k.scatter_(2, &index, new.0);
        let _ = cache_v.scatter_(2, &index, new.1);
        let (keys, values) = (self.group(cache_k.narrow(2, 0, step.width)), self.group(cache_v.narrow(2, 0, step.width)));
        let windowed: Tensor;
        let mask = match window {
            None => step.mask(),
            Some(w) => {
                let n = step.attended.len() as i64;
                let columns = Tensor::arange(step.width, (Kind::Int64, query.device())).view([1, step.width]);
                let positions = step.positions.view([n, 1]);
                windowed = columns.le_tensor(&positions).logical_and(&columns.gt_tensor(&(&positions - w))).view([n, 1, 1, step.width]);
                Some(&windowed)
            }
        };
        Tensor::scaled_dot_product_attention(query, &keys, &values, mask, 0.0, false, None, false)
    }

    /// Grouped-query attention: KV head j serves query heads j·g .. j·g + g - 1 (HF `repeat_kv`).
    /// (B, KV, T, D) -> (B, H, T, D)
    fn group(&self, xs: Tensor) -> Tensor {
        match self.config.group() {
            1 => xs,
            g => xs.repeat_interleave_self_int(g as i64, Some(1), None),
        }
    }
}

impl Stack for Decoder {
    fn hidden(&self, ids: &Tensor, cache: Option<&mut KvCache>, train: bool) -> Tensor {
        Decoder::hidden(self, ids, cache, train)
    }

    fn logits(&self, h: &Tensor) -> Tensor {
        Decoder::logits(self, h)
    }

    fn layers(&self) -> usize {
        self.blocks.len()
    }

    fn has_dropout(&self) -> bool {
        self.config.dropout.any()
    }

    fn embed(&self, ids: &Tensor, train: bool) -> Tensor {
        Decoder::embed(self, ids, train)
    }

    fn block(&self, layer: usize, xs: &Tensor, train: bool) -> Tensor {
        Decoder::block(self, &self.blocks[layer], xs, Context::Sequence { start: 0, cache: None }, train)
    }

    fn head_loss(&self, ids: &Tensor, top: &Tensor, reduction: Reduction) -> Tensor {
        token_loss(ids, &self.logits(&self.norm.forward(top)), reduction)
    }
}

/// How T new tokens attend to `keys` keys (the last T of them theirs): whether plain causal
/// masking does, or else the mask (T, keys) of what each may see: up to its own position and,
/// with a window, the last `window` positions, itself included. None where nothing is hidden.
fn sequence_mask(t: i64, keys: i64, window: Option<i64>, device: Device) -> (bool, Option<Tensor>) {
    let past = keys - t;
    let binds = window.is_some_and(|w| w < keys);
    if !binds && past == 0 {
        return (true, None);
    }
    if !binds && t == 1 {
        return (false, None);
    }
    let rows = Tensor::arange_start(past, keys, (Kind::Int64, device)).unsqueeze(1);
    let cols = Tensor::arange(keys, (Kind::Int64, device)).unsqueeze(0);
    let mut mask = cols.le_tensor(&rows);
    if let Some(w) = window {
        mask = mask.logical_and(&cols.gt_tensor(&(&rows - w)));
    }
    (false, Some(mask))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows_of(mask: &Tensor) -> Vec<Vec<bool>> {
        (0..mask.size()[0]).map(|r| Vec::<bool>::try_from(mask.get(r)).unwrap()).collect()
    }

    #[test]
    fn a_window_lets_each_token_see_w_keys_itself_included() {
        let (causal, mask) = sequence_mask(5, 5, Some(2), Device::Cpu);
        let rows = rows_of(&mask.unwrap());
        assert!(!causal);
        assert_eq!(rows[0], [true, false, false, false, false]);
        assert_eq!(rows[1], [true, true, false, false, false]);
        assert_eq!(rows[4], [false, false, false, true, true]);
    }

    #[test]
    fn tokens_after_a_cache_see_it_and_a_window_that_cannot_bind_is_no_mask() {
        assert!(matches!(sequence_mask(4, 4, Some(4), Device::Cpu), (true, None)), "W = T: plain causal");
        assert!(matches!(sequence_mask(1, 9, None, Device::Cpu), (false, None)), "one token sees the whole cache");
        let (_, mask) = sequence_mask(2, 5, None, Device::Cpu);
        assert_eq!(rows_of(&mask.unwrap()), [[true, true, true, true, false], [true; 5]]);
        let (_, mask) = sequence_mask(1, 5, Some(3), Device::Cpu);
        assert_eq!(rows_of(&mask.unwrap()), [[false, false, true, true, true]]);
    }
}
