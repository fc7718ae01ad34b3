//! CodeGen (HF `modeling_codegen.py`) in tch: one LayerNorm and a parallel residual per block,
//! qkv_proj split as [mp_num=4] chunks of (query, value, key), GPT-J rotary, causal attention
//! through `scaled_dot_product_attention`, gelu_new MLP, untied lm_head with bias.
//! Shapes: B batch, T tokens, C = n_embd, H heads, D = C/H, V vocab rows.

use tch::{Kind, Reduction, Tensor};
use zerotune_hf::CodeGenConfig;

use super::params::ParamSet;
use super::rotary::Rotary;

/// CodeGen's qkv_proj holds its heads in this many chunks (`mp_num` in HF).
const MP_NUM: i64 = 4;

struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let c = self.weight.size()[0];
        xs.layer_norm([c], Some(&self.weight), Some(&self.bias), self.eps, true)
    }
}

struct Block {
    ln_1: LayerNorm,
    qkv_proj: Tensor,
    out_proj: Tensor,
    fc_in_weight: Tensor,
    fc_in_bias: Tensor,
    fc_out_weight: Tensor,
    fc_out_bias: Tensor,
}

/// Past keys and values per layer, (B, H, T_past, D) each, for incremental decoding.
#[derive(Default)]
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
}

impl KvCache {
    /// Tokens already in the cache.
    pub fn len(&self) -> i64 {
        self.layers.first().map_or(0, |(k, _)| k.size()[2])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The model: parameter handles into a `ParamSet` plus the rotary tables.
pub struct CodeGen {
    pub config: CodeGenConfig,
    wte: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    lm_head_weight: Tensor,
    lm_head_bias: Tensor,
    rotary: Rotary,
}

impl CodeGen {
    /// Binds the model to `params` (which must follow `config`'s layout).
    pub fn new(config: &CodeGenConfig, params: &ParamSet) -> Self {
        let eps = config.layer_norm_epsilon;
        let ln =
            |prefix: &str| LayerNorm { weight: params.get(&format!("{prefix}.weight")), bias: params.get(&format!("{prefix}.bias")), eps };
        let blocks = (0..config.n_layer)
            .map(|l| {
                let p = format!("transformer.h.{l}");
                Block {
                    ln_1: ln(&format!("{p}.ln_1")),
                    qkv_proj: params.get(&format!("{p}.attn.qkv_proj.weight")),
                    out_proj: params.get(&format!("{p}.attn.out_proj.weight")),
                    fc_in_weight: params.get(&format!("{p}.mlp.fc_in.weight")),
                    fc_in_bias: params.get(&format!("{p}.mlp.fc_in.bias")),
                    fc_out_weight: params.get(&format!("{p}.mlp.fc_out.weight")),
                    fc_out_bias: params.get(&format!("{p}.mlp.fc_out.bias")),
                }
            })
            .collect();
        let flat = &params.flat;
        Self {
            config: config.clone(),
            wte: params.get("transformer.wte.weight"),
            blocks,
            ln_f: ln("transformer.ln_f"),
            lm_head_weight: params.get("lm_head.weight"),
            lm_head_bias: params.get("lm_head.bias"),
            rotary: Rotary::new(config.n_positions as i64, config.rotary_dim as i64, flat.kind(), flat.device()),
        }
    }

    /// Logits in f32 (HF upcasts them).  ids: (B, T) int64 -> (B, T, V)
    pub fn forward(&self, ids: &Tensor, train: bool) -> Tensor {
        self.forward_cached(ids, None, train)
    }

    /// Forward pass that appends to `cache` when given (prompt first, then one token at a time).
    pub fn forward_cached(&self, ids: &Tensor, mut cache: Option<&mut KvCache>, train: bool) -> Tensor {
        let start = cache.as_ref().map_or(0, |c| c.len());
        let mut h = Tensor::embedding(&self.wte, ids, -1, false, false).dropout(self.config.embd_pdrop, train);
        for (l, block) in self.blocks.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| {
                if c.layers.len() <= l {
                    c.layers.push((Tensor::new(), Tensor::new()));
                }
                &mut c.layers[l]
            });
            h = self.block(block, &h, start, layer_cache, train);
        }
        let h = self.ln_f.forward(&h);
        h.linear(&self.lm_head_weight, Some(&self.lm_head_bias)).to_kind(Kind::Float)
    }

    /// Mean next-token cross-entropy of each block predicting itself shifted by one (HF labels =
    /// input_ids).  ids: (B, T) -> scalar f32
    pub fn loss(&self, ids: &Tensor, train: bool) -> Tensor {
        self.token_loss(ids, train, Reduction::Mean)
    }

    /// Summed next-token cross-entropy, for evaluation over many batches.  ids: (B, T) -> scalar
    pub fn loss_sum(&self, ids: &Tensor) -> Tensor {
        self.token_loss(ids, false, Reduction::Sum)
    }

    fn token_loss(&self, ids: &Tensor, train: bool, reduction: Reduction) -> Tensor {
        let (_, t) = ids.size2().expect("ids are (B, T)");
        let logits = self.forward(ids, train);
        let v = logits.size()[2];
        let predicted = logits.narrow(1, 0, t - 1).reshape([-1, v]);
        let targets = ids.narrow(1, 1, t - 1).reshape([-1]);
        predicted.cross_entropy_loss::<Tensor>(&targets, None, reduction, -100, 0.0)
    }

    /// Parallel residual (GPT-J/CodeGen): x + attn(ln(x)) + mlp(ln(x)).  xs: (B, T, C) -> (B, T, C)
    fn block(&self, block: &Block, xs: &Tensor, start: i64, cache: Option<&mut (Tensor, Tensor)>, train: bool) -> Tensor {
        let normed = block.ln_1.forward(xs);
        let attn = self.attention(block, &normed, start, cache, train);
        let hidden = normed.linear(&block.fc_in_weight, Some(&block.fc_in_bias)).gelu("tanh");
        let mlp = hidden.linear(&block.fc_out_weight, Some(&block.fc_out_bias)).dropout(self.config.resid_pdrop, train);
        xs + attn + mlp
    }

    /// Causal self-attention with CodeGen's qkv layout.  xs: (B, T, C) -> (B, T, C)
    fn attention(&self, block: &Block, xs: &Tensor, start: i64, cache: Option<&mut (Tensor, Tensor)>, train: bool) -> Tensor {
        let (b, t, c) = xs.size3().expect("attention input is (B, T, C)");
        let h = self.config.n_head as i64;
        let d = c / h;
        // (B, T, 3C) -> (B, T, 4, 3C/4): each chunk holds (query, value, key) for H/4 heads.
        let qkv = xs.linear::<Tensor>(&block.qkv_proj, None).reshape([b, t, MP_NUM, 3 * c / MP_NUM]);
        let part = |i: i64| qkv.narrow(3, i * c / MP_NUM, c / MP_NUM).reshape([b, t, h, d]);
        let (query, value, key) = (part(0), part(1), part(2));
        let query = self.rotary.apply(&query, start).permute([0, 2, 1, 3]);
        let mut key = self.rotary.apply(&key, start).permute([0, 2, 1, 3]);
        let mut value = value.permute([0, 2, 1, 3]);
        let mut causal = true;
        if let Some((past_k, past_v)) = cache {
            if past_k.defined() {
                key = Tensor::cat(&[&*past_k, &key], 2);
                value = Tensor::cat(&[&*past_v, &value], 2);
                // A continuation token attends to everything before it.
                assert!(t == 1, "after the prompt, decode one token at a time");
                causal = false;
            }
            *past_k = key.shallow_clone();
            *past_v = value.shallow_clone();
        }
        let dropout = if train { self.config.attn_pdrop } else { 0.0 };
        let out = Tensor::scaled_dot_product_attention::<Tensor>(&query, &key, &value, None, dropout, causal, None, false);
        let out = out.permute([0, 2, 1, 3]).reshape([b, t, c]).linear::<Tensor>(&block.out_proj, None);
        out.dropout(self.config.resid_pdrop, train)
    }
}
