//! CodeGen (HF `modeling_codegen.py`) in tch: one LayerNorm and a parallel residual per block,
//! qkv_proj split as [mp_num=4] chunks of (query, value, key), GPT-J rotary, causal attention
//! through `scaled_dot_product_attention`, gelu_new MLP, untied lm_head with bias.
//! Shapes: B batch, T tokens, C = n_embd, H heads, D = C/H, V vocab rows.
//! Gradient checkpointing (`loss_backward`) keeps only each block's input through the forward
//! pass and recomputes the block in the backward pass, as `torch.utils.checkpoint` does for HF's
//! `gradient_checkpointing_enable()`.

use tch::{Kind, Reduction, TchError, Tensor};
use zerotune_hf::CodeGenConfig;

use super::kv::{BatchCache, KvCache, Step};
use super::params::ParamSet;
use super::rotary::{Angles, Rotary};

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

    /// Logits in f32 (HF upcasts them).  ids: (B, T) int64 -> (B, T, V)
    pub fn forward(&self, ids: &Tensor, train: bool) -> Tensor {
        self.forward_cached(ids, None, train)
    }

    /// Forward pass that appends to `cache` when given (prompt first, then one token at a time).
    pub fn forward_cached(&self, ids: &Tensor, cache: Option<&mut KvCache>, train: bool) -> Tensor {
        self.logits(&self.hidden(ids, cache, train))
    }

    /// The prompt's pass that fills `cache`, with the logits of its last position only (all
    /// positions when `all`): the lm_head over a long prompt costs as much as a few layers.
    /// ids: (B, T) -> (B, 1 or T, V)
    pub fn prefill(&self, ids: &Tensor, cache: &mut KvCache, all: bool) -> Tensor {
        let h = self.hidden(ids, Some(cache), false);
        let t = h.size()[1];
        self.logits(&if all { h } else { h.narrow(1, t - 1, 1) })
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

    /// The final hidden states after ln_f.  ids: (B, T) -> (B, T, C)
    fn hidden(&self, ids: &Tensor, cache: Option<&mut KvCache>, train: bool) -> Tensor {
        self.hidden_seeded(ids, cache, train, &DropoutSeeds::draw(train && self.has_dropout()))
    }

    fn hidden_seeded(&self, ids: &Tensor, mut cache: Option<&mut KvCache>, train: bool, seeds: &DropoutSeeds) -> Tensor {
        let start = cache.as_ref().map_or(0, |c| c.len());
        let mut h = self.embed(ids, train, seeds);
        for (l, block) in self.blocks.iter().enumerate() {
            seeds.block(l);
            let layer = cache.as_deref_mut().map(|c| {
                if c.layers.len() <= l {
                    c.layers.push((Tensor::new(), Tensor::new()));
                }
                &mut c.layers[l]
            });
            h = self.block(block, &h, Context::Sequence { start, cache: layer }, train);
        }
        self.ln_f.forward(&h)
    }

    /// Logits in f32 (HF upcasts them).  (B, T, C) -> (B, T, V)
    fn logits(&self, h: &Tensor) -> Tensor {
        let rows = if h.size()[1] == 1 { h.size()[0] } else { 0 };
        project(h, &self.lm_head_weight, Some(&self.lm_head_bias), rows).to_kind(Kind::Float)
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
        self.loss_of_hidden(ids, &self.hidden(ids, None, train), reduction)
    }

    /// The token loss from the final hidden states `h` (B, T, C) of `ids` (B, T).
    fn loss_of_hidden(&self, ids: &Tensor, h: &Tensor, reduction: Reduction) -> Tensor {
        let (_, t) = ids.size2().expect("ids are (B, T)");
        let logits = self.logits(h);
        let v = logits.size()[2];
        let predicted = logits.narrow(1, 0, t - 1).reshape([-1, v]);
        let targets = ids.narrow(1, 1, t - 1).reshape([-1]);
        predicted.cross_entropy_loss::<Tensor>(&targets, None, reduction, -100, 0.0)
    }

    /// The training loss of `ids` (B, T), with the gradients of `loss * grad_scale` added into the
    /// parameters' `.grad`; returns the loss (scalar f32, detached). With `checkpointing` the blocks
    /// run forward without autograd, keeping only their inputs (B, T, C) each; the backward pass
    /// then goes block by block from the top, recomputing each block with autograd from its saved
    /// input (dropout replays its seed) and back-propagating the gradient of its output into its
    /// parameters and its input. Same operations on the same values: the same gradients.
    pub fn loss_backward(&self, ids: &Tensor, train: bool, grad_scale: f64, checkpointing: bool) -> Result<Tensor, TchError> {
        let seeds = DropoutSeeds::draw(train && self.has_dropout());
        let loss = if checkpointing {
            self.checkpointed_backward(ids, train, grad_scale, &seeds)?
        } else {
            let loss = self.loss_of_hidden(ids, &self.hidden_seeded(ids, None, train, &seeds), Reduction::Mean);
            loss.f_mul_scalar(grad_scale)?.f_backward()?;
            loss
        };
        // Both paths leave the generator in the same state, whatever the recomputation drew.
        seeds.finish(self.blocks.len());
        Ok(loss.detach())
    }

    fn checkpointed_backward(&self, ids: &Tensor, train: bool, grad_scale: f64, seeds: &DropoutSeeds) -> Result<Tensor, TchError> {
        let sequence = || Context::Sequence { start: 0, cache: None };
        let embedded = self.embed(ids, train, seeds);
        let mut inputs = Vec::with_capacity(self.blocks.len());
        let mut h = embedded.detach();
        {
            let _guard = tch::no_grad_guard();
            for (l, block) in self.blocks.iter().enumerate() {
                seeds.block(l);
                let out = self.block(block, &h, sequence(), train);
                inputs.push(std::mem::replace(&mut h, out));
            }
        }
        let top = h.set_requires_grad(true);
        let loss = self.loss_of_hidden(ids, &self.ln_f.forward(&top), Reduction::Mean);
        loss.f_mul_scalar(grad_scale)?.f_backward()?;
        let mut grad = top.grad();
        drop(top);
        for (l, block) in self.blocks.iter().enumerate().rev() {
            let input = inputs.pop().expect("one input per block").set_requires_grad(true);
            seeds.block(l);
            let out = self.block(block, &input, sequence(), train);
            backward_with(&out, &grad)?;
            grad = input.grad();
        }
        backward_with(&embedded, &grad)?;
        Ok(loss)
    }

    /// Token embeddings with embedding dropout.  ids: (B, T) -> (B, T, C)
    fn embed(&self, ids: &Tensor, train: bool, seeds: &DropoutSeeds) -> Tensor {
        seeds.embedding();
        Tensor::embedding(&self.wte, ids, -1, false, false).dropout(self.config.embd_pdrop, train)
    }

    /// Whether training draws dropout masks at all.
    fn has_dropout(&self) -> bool {
        let c = &self.config;
        c.embd_pdrop > 0.0 || c.resid_pdrop > 0.0 || c.attn_pdrop > 0.0
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
                super::attend::decode_step(&query, (&key, &value), (cache_k, cache_v), &step.attended).unwrap_or_else(|| {
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

/// Back-propagates `grad` (the gradient of `out`, same shape) through `out`'s graph, adding into
/// the leaves' `.grad`. tch's `backward` takes no gradient: the scalar (out · grad).sum() has
/// exactly `grad` as its gradient with respect to `out` (1 x grad, rounded to itself).
fn backward_with(out: &Tensor, grad: &Tensor) -> Result<(), TchError> {
    out.f_mul(grad)?.f_sum(Kind::Float)?.f_backward()
}

/// Dropout seeds of one training pass, so a recomputed block draws the masks its first pass drew:
/// with dropout on, the pass draws one base seed from the run's generator and reseeds it before
/// the embedding and each block, and with its own value at the end; without dropout it touches
/// no generator (and the run's random stream is as without checkpointing).
struct DropoutSeeds(Option<i64>);

impl DropoutSeeds {
    fn draw(active: bool) -> Self {
        Self(active.then(|| Tensor::randint(i64::MAX, [1], (Kind::Int64, tch::Device::Cpu)).int64_value(&[0])))
    }

    fn embedding(&self) {
        self.reseed(0);
    }

    fn block(&self, layer: usize) {
        self.reseed(layer as i64 + 1);
    }

    fn finish(&self, layers: usize) {
        self.reseed(layers as i64 + 1);
    }

    fn reseed(&self, offset: i64) {
        if let Some(base) = self.0 {
            tch::manual_seed(base.wrapping_add(offset) & i64::MAX);
        }
    }
}

/// Rows from which a CPU decode step multiplies as w · xs^T.
const WEIGHT_MAJOR_ROWS: i64 = 8;

/// xs · w^T + b.  xs: (B, T, in), w: (out, in) -> (B, T, out). A CPU decode step of `rows` rows
/// (T = 1; 0 otherwise) of up to 8 goes to `matvec.rs`, which streams w once on all of torch's
/// threads (codegen-350M, 2 cores: one row 77 -> 42 ms per step, ~30 with `attend.rs`). Beyond
/// that, or without AVX2, MKL's small-M GEMM would repack all of w on every call, which costs
/// more than reading w once; computed as w · xs^T (M = out, N = rows) the weights stream through
/// once.
fn project(xs: &Tensor, w: &Tensor, b: Option<&Tensor>, rows: i64) -> Tensor {
    if rows > 0 {
        if let Some(y) = super::matvec::project(xs, w, b) {
            return y;
        }
    }
    if rows < WEIGHT_MAJOR_ROWS || xs.device() != tch::Device::Cpu {
        return xs.linear(w, b);
    }
    let (n, t, k) = xs.size3().expect("(B, T, in)");
    let out = w.mm(&xs.reshape([n * t, k]).tr()).tr().reshape([n, t, -1]);
    match b {
        Some(b) => out + b,
        None => out,
    }
}
