//! CodeGen (HF `modeling_codegen.py`) in tch: one LayerNorm and a parallel residual per block,
//! qkv_proj split as [mp_num=4] chunks of (query, value, key), GPT-J rotary, causal attention
//! through `scaled_dot_product_attention`, gelu_new MLP, untied lm_head with bias.
//! Shapes: B batch, T tokens, C = n_embd, H heads, D = C/H, V vocab rows.

use tch::{Kind, Reduction, Tensor};
use zerotune_hf::CodeGenConfig;

use super::kv::{BatchCache, KvCache, Step};
use super::params::ParamSet;
use super::rotary::{Angles, Rotary};
use super::shared::{project, token_loss, Stack};

/// CodeGen's qkv_proj chunk count, as an i64 for tensor shapes.
const MP_NUM: i64 = zerotune_hf::MP_NUM as i64;

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

/// Where a block's attention finds its positions and past keys.
enum Context<'a> {
    /// Tokens at positions `start..`, causal among themselves, appended to `cache` when given.
    Sequence { start: i64, cache: Option<&'a mut (Tensor, Tensor)> },
    /// One token per row, at the step's positions: its key and value are written into the batch
    /// cache's `layer`, and it attends to its row's positions up to its own.
    Batch { step: &'a Step, angles: &'a Angles, layer: &'a mut (Tensor, Tensor) },
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

    /// One new token per row of `cache`, each at its own position (the row's length): rows of
    /// different lengths decode together, and each row's logits are those it would get alone.
    /// ids: (N, 1) -> (N, V)
    pub fn decode(&self, ids: &Tensor, cache: &mut BatchCache) -> Tensor {
        let step = cache.step();
        let angles = self.rotary.angles_at(&step.positions);
        let mut xs = Tensor::embedding(&self.wte, ids, -1, false, false);
        for (block, layer) in self.blocks.iter().zip(cache.layers.iter_mut()) {
            xs = self.block(block, &xs, Context::Batch { step: &step, angles: &angles, layer }, false);
        }
        cache.advance();
        self.logits(&self.ln_f.forward(&xs)).squeeze_dim(1)
    }

    /// The final hidden states after ln_f, appending to `cache` when given.  ids: (B, T) -> (B, T, C)
    fn hidden(&self, ids: &Tensor, mut cache: Option<&mut KvCache>, train: bool) -> Tensor {
        let start = cache.as_ref().map_or(0, |c| c.len());
        let mut h = self.embed(ids, train);
        for (l, block) in self.blocks.iter().enumerate() {
            let layer = cache.as_deref_mut().map(|c| c.layer(l));
            h = self.block(block, &h, Context::Sequence { start, cache: layer }, train);
        }
        self.ln_f.forward(&h)
    }

    /// Logits in f32 (HF upcasts them).  (B, T, C) -> (B, T, V)
    fn logits(&self, h: &Tensor) -> Tensor {
        let rows = if h.size()[1] == 1 { h.size()[0] } else { 0 };
        project(h, &self.lm_head_weight, Some(&self.lm_head_bias), rows).to_kind(Kind::Float)
    }

    /// Token embeddings with embedding dropout.  ids: (B, T) -> (B, T, C)
    fn embed(&self, ids: &Tensor, train: bool) -> Tensor {
        Tensor::embedding(&self.wte, ids, -1, false, false).dropout(self.config.embd_pdrop, train)
    }

    /// Parallel residual (GPT-J/CodeGen): x + attn(ln(x)) + mlp(ln(x)).  xs: (B, T, C) -> (B, T, C)
    fn block(&self, block: &Block, xs: &Tensor, context: Context, train: bool) -> Tensor {
        let normed = block.ln_1.forward(xs);
        let rows = matches!(context, Context::Batch { .. }).then(|| xs.size()[0]).unwrap_or(0);
        let linear = |x: &Tensor, w: &Tensor, b: Option<&Tensor>| project(x, w, b, rows);
        let attn = self.attention(block, &normed, context, train);
        let hidden = linear(&normed, &block.fc_in_weight, Some(&block.fc_in_bias)).gelu("tanh");
        let mlp = linear(&hidden, &block.fc_out_weight, Some(&block.fc_out_bias)).dropout(self.config.resid_pdrop, train);
        xs + attn + mlp
    }

    /// Causal self-attention with CodeGen's qkv layout.  xs: (B, T, C) -> (B, T, C)
    fn attention(&self, block: &Block, xs: &Tensor, context: Context, train: bool) -> Tensor {
        let (b, t, c) = xs.size3().expect("attention input is (B, T, C)");
        let rows = matches!(context, Context::Batch { .. }).then_some(b).unwrap_or(0);
        let h = self.config.n_head as i64;
        let d = c / h;
        // (B, T, 3C) -> (B, T, 4, 3C/4): each chunk holds (query, value, key) for H/4 heads.
        let qkv = project(xs, &block.qkv_proj, None, rows).reshape([b, t, MP_NUM, 3 * c / MP_NUM]);
        let part = |i: i64| qkv.narrow(3, i * c / MP_NUM, c / MP_NUM).reshape([b, t, h, d]);
        let (query, value, key) = (part(0), part(1), part(2));
        let dropout = if train { self.config.attn_pdrop } else { 0.0 };
        let out = match context {
            Context::Sequence { start, cache } => {
                let query = self.rotary.apply(&query, start).permute([0, 2, 1, 3]);
                let mut key = self.rotary.apply(&key, start).permute([0, 2, 1, 3]);
                let mut value = value.permute([0, 2, 1, 3]);
                let (mut causal, mut mask) = (true, None);
                if let Some((past_k, past_v)) = cache {
                    if past_k.defined() {
                        key = Tensor::cat(&[&*past_k, &key], 2);
                        value = Tensor::cat(&[&*past_v, &value], 2);
                        // After the cached tokens, query i (at position start + i) attends to
                        // every key up to its own position; one token attends to them all.
                        causal = false;
                        if t > 1 {
                            let keys = Tensor::arange(start + t, (Kind::Int64, xs.device())).view([1, start + t]);
                            mask = Some(keys.le_tensor(&(Tensor::arange(t, (Kind::Int64, xs.device())) + start).view([t, 1])));
                        }
                    }
                    *past_k = key.shallow_clone();
                    *past_v = value.shallow_clone();
                }
                Tensor::scaled_dot_product_attention(&query, &key, &value, mask.as_ref(), dropout, causal, None, false)
            }
            Context::Batch { step, angles, layer: (cache_k, cache_v) } => {
                let query = self.rotary.rotate(&query, angles).permute([0, 2, 1, 3]);
                let key = self.rotary.rotate(&key, angles).permute([0, 2, 1, 3]);
                let value = value.permute([0, 2, 1, 3]);
                super::attend::decode_step(&query, (&key, &value), (cache_k, cache_v), &step.attended, None).unwrap_or_else(|| {
                    // Each row's new entries to its own position: (N, H, 1, D) indices.
                    let index = step.positions.view([-1, 1, 1, 1]).expand_as(&key);
                    let _ = cache_k.scatter_(2, &index, &key);
                    let _ = cache_v.scatter_(2, &index, &value);
                    let (keys, values) = (cache_k.narrow(2, 0, step.width), cache_v.narrow(2, 0, step.width));
                    Tensor::scaled_dot_product_attention(&query, &keys, &values, step.mask(), 0.0, false, None, false)
                })
            }
        };
        let out = project(&out.permute([0, 2, 1, 3]).reshape([b, t, c]), &block.out_proj, None, rows);
        out.dropout(self.config.resid_pdrop, train)
    }
}

impl Stack for CodeGen {
    fn hidden(&self, ids: &Tensor, cache: Option<&mut KvCache>, train: bool) -> Tensor {
        CodeGen::hidden(self, ids, cache, train)
    }

    fn logits(&self, h: &Tensor) -> Tensor {
        CodeGen::logits(self, h)
    }

    fn layers(&self) -> usize {
        self.blocks.len()
    }

    fn has_dropout(&self) -> bool {
        let c = &self.config;
        c.embd_pdrop > 0.0 || c.resid_pdrop > 0.0 || c.attn_pdrop > 0.0
    }

    fn embed(&self, ids: &Tensor, train: bool) -> Tensor {
        CodeGen::embed(self, ids, train)
    }

    fn block(&self, layer: usize, xs: &Tensor, train: bool) -> Tensor {
        CodeGen::block(self, &self.blocks[layer], xs, Context::Sequence { start: 0, cache: None }, train)
    }

    fn head_loss(&self, ids: &Tensor, top: &Tensor, reduction: Reduction) -> Tensor {
        token_loss(ids, &self.logits(&self.ln_f.forward(top)), reduction)
    }
}
