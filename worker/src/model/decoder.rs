//! The Llama decoder family (HF `modeling_llama.py`, `modeling_qwen2.py`,
//! `modeling_starcoder2.py`) in tch: sequential pre-norm blocks (RMSNorm, or LayerNorm with bias
//! for StarCoder2), separate q/k/v projections with NeoX rotary over the whole head, grouped-query
//! attention (KV heads each serving H / KV query heads), per-layer sliding windows, a SwiGLU MLP
//! (or StarCoder2's GELU one), a final norm and an lm_head that may be the embedding.
//! Shapes: B batch, T tokens, E hidden, H query heads, KV key/value heads, D head_dim, I MLP
//! width, V vocab rows.
//! This is the forward pass the HF ladder checks first; training, caches and serving reach the
//! family through the model layer in later steps.

use tch::{Device, Kind, Reduction, Tensor};
use zerotune_hf::decoder::RopeScaling;
use zerotune_hf::DecoderConfig;

use super::params::ParamSet;

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
    fn forward(&self, xs: &Tensor) -> Tensor {
        xs.linear(&self.weight, self.bias.as_ref())
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

/// NeoX rotary tables for every position: cos and sin (T, D), each half of a head rotated with the
/// other (`rotate_half`).
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// HF's default inv_freq `1 / θ^(2i/D)` in f32 (divided by the factor for linear scaling),
    /// angles `pos · inv_freq` repeated for both halves, kept in `kind` on `device`.
    fn new(config: &DecoderConfig, kind: Kind, device: Device) -> Rope {
        let d = config.head_dim as i64;
        let exponent = Tensor::arange_start_step(0, d, 2, (Kind::Int64, Device::Cpu)).to_kind(Kind::Float) / d as f64;
        let mut inv_freq = Tensor::from(config.rope_theta as f32).pow(&exponent).reciprocal();
        if let RopeScaling::Linear { factor } = config.rope_scaling {
            inv_freq = inv_freq / factor;
        }
        let positions = Tensor::arange(config.max_position_embeddings as i64, (Kind::Int64, Device::Cpu)).to_kind(Kind::Float);
        let angles = positions.outer(&inv_freq);
        let angles = Tensor::cat(&[&angles, &angles], -1);
        Rope { cos: angles.cos().to_kind(kind).to_device(device), sin: angles.sin().to_kind(kind).to_device(device) }
    }

    /// xs (B, heads, T, D) at positions `start..start + T`, rotated.
    fn apply(&self, xs: &Tensor, start: i64) -> Tensor {
        let (t, d) = (xs.size()[2], xs.size()[3]);
        let (cos, sin) = (self.cos.narrow(0, start, t), self.sin.narrow(0, start, t));
        let half = d / 2;
        let rotated = Tensor::cat(&[-xs.narrow(3, half, half), xs.narrow(3, 0, half)], 3);
        xs * cos + rotated * sin
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

    /// Logits in f32.  ids: (B, T) int64 -> (B, T, V)
    pub fn forward(&self, ids: &Tensor) -> Tensor {
        // The pad row (`pad_token_id`) gets no gradient from the lookup, as nn.Embedding's padding_idx.
        let pad = self.config.pad_token_id.unwrap_or(-1);
        let mut h = Tensor::embedding(&self.embed_tokens, ids, pad, false, false);
        for block in &self.blocks {
            h = &h + self.attention(block, &block.input_layernorm.forward(&h));
            h = &h + self.mlp(block, &block.post_attention_layernorm.forward(&h));
        }
        self.norm.forward(&h).matmul(&self.lm_head.tr()).to_kind(Kind::Float)
    }

    /// Mean next-token cross-entropy of each row predicting itself shifted by one (HF labels =
    /// input_ids).  ids: (B, T) -> scalar f32
    pub fn loss(&self, ids: &Tensor) -> Tensor {
        let (_, t) = ids.size2().expect("ids are (B, T)");
        let logits = self.forward(ids);
        let v = logits.size()[2];
        let predicted = logits.narrow(1, 0, t - 1).reshape([-1, v]);
        predicted.cross_entropy_loss::<Tensor>(&ids.narrow(1, 1, t - 1).reshape([-1]), None, Reduction::Mean, -100, 0.0)
    }

    /// Causal attention (within the block's window) of every token over those before it.
    /// xs: (B, T, E) -> (B, T, E)
    fn attention(&self, block: &Block, xs: &Tensor) -> Tensor {
        let (b, t, _) = xs.size3().expect("(B, T, E)");
        let c = &self.config;
        let (h, kv, d) = (c.num_attention_heads as i64, c.num_key_value_heads as i64, c.head_dim as i64);
        let heads = |proj: &Linear, n: i64| proj.forward(xs).view([b, t, n, d]).transpose(1, 2);
        let query = self.rope.apply(&heads(&block.q_proj, h), 0);
        let key = self.rope.apply(&heads(&block.k_proj, kv), 0);
        let value = heads(&block.v_proj, kv);
        // Grouped-query attention: KV head j serves query heads j·g .. j·g + g - 1.
        let group = |x: Tensor| if h == kv { x } else { x.repeat_interleave_self_int(h / kv, Some(1), None) };
        let (key, value) = (group(key), group(value));
        let out = match block.window.filter(|&w| w < t) {
            None => Tensor::scaled_dot_product_attention(&query, &key, &value, None::<Tensor>, 0.0, true, None, false),
            Some(w) => {
                let mask = window_mask(t, w, xs.device());
                Tensor::scaled_dot_product_attention(&query, &key, &value, Some(mask), 0.0, false, None, false)
            }
        };
        block.o_proj.forward(&out.transpose(1, 2).reshape([b, t, h * d]))
    }

    /// xs: (B, T, E) -> (B, T, E)
    fn mlp(&self, block: &Block, xs: &Tensor) -> Tensor {
        match block.mlp.as_slice() {
            [gate, up, down] => down.forward(&(gate.forward(xs).silu() * up.forward(xs))),
            [fc, proj] => proj.forward(&fc.forward(xs).gelu("tanh")),
            _ => unreachable!("an MLP of 2 or 3 matrices"),
        }
    }
}

/// True where query row `q` may see key column `k`: causal, and within the last `w` positions
/// (itself included).  -> (T, T) bool
fn window_mask(t: i64, w: i64, device: Device) -> Tensor {
    let rows = Tensor::arange(t, (Kind::Int64, device)).unsqueeze(1);
    let cols = Tensor::arange(t, (Kind::Int64, device)).unsqueeze(0);
    cols.le_tensor(&rows).logical_and(&cols.gt_tensor(&(&rows - w)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_lets_each_token_see_w_keys_itself_included() {
        let mask = window_mask(5, 2, Device::Cpu);
        let rows: Vec<Vec<bool>> = (0..5).map(|r| Vec::<bool>::try_from(mask.get(r)).unwrap()).collect();
        assert_eq!(rows[0], [true, false, false, false, false]);
        assert_eq!(rows[1], [true, true, false, false, false]);
        assert_eq!(rows[4], [false, false, false, true, true]);
    }
}
