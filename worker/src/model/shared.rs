//! What every architecture's passes share, whatever its blocks hold: the forward pass and the
//! prompt's prefill over its hidden states, the projection that routes a CPU decode step to
//! `matvec.rs`, the token loss, dropout seeds that a recomputed block replays, and the backward
//! pass with or without gradient checkpointing.

use tch::{Kind, Reduction, TchError, Tensor};

use super::kv::KvCache;

/// A model as its passes see it: an embedding, `layers()` blocks over a whole sequence, a head
/// that turns the last block's output into the token loss, and the hidden states and logits of a
/// pass that may append to a cache.
pub(super) trait Stack {
    /// The final hidden states (after the final norm), appending to `cache` when given.
    /// ids: (B, T) -> (B, T, C)
    fn hidden(&self, ids: &Tensor, cache: Option<&mut KvCache>, train: bool) -> Tensor;
    /// Logits in f32.  (B, T, C) -> (B, T, V)
    fn logits(&self, h: &Tensor) -> Tensor;
    fn layers(&self) -> usize;
    /// Whether training draws dropout masks at all.
    fn has_dropout(&self) -> bool;
    /// ids: (B, T) -> (B, T, C)
    fn embed(&self, ids: &Tensor, train: bool) -> Tensor;
    /// Block `layer` over tokens at positions 0.. without a cache.  (B, T, C) -> (B, T, C)
    fn block(&self, layer: usize, xs: &Tensor, train: bool) -> Tensor;
    /// The final norm, the head and the loss of `ids` from the last block's output.
    fn head_loss(&self, ids: &Tensor, top: &Tensor, reduction: Reduction) -> Tensor;
}

/// The training loss of `ids` (B, T), with the gradients of `loss * grad_scale` added into the
/// parameters' `.grad`; returns the loss (scalar f32, detached). With `checkpointing` the blocks
/// run forward without autograd, keeping only their inputs (B, T, C) each; the backward pass
/// then goes block by block from the top, recomputing each block with autograd from its saved
/// input (dropout replays its seed) and back-propagating the gradient of its output into its
/// parameters and its input. Same operations on the same values: the same gradients, as
/// `torch.utils.checkpoint` gives HF's `gradient_checkpointing_enable()`.
pub(super) fn loss_backward(
    model: &impl Stack,
    ids: &Tensor,
    train: bool,
    grad_scale: f64,
    checkpointing: bool,
) -> Result<Tensor, TchError> {
    let seeds = DropoutSeeds::draw(train && model.has_dropout());
    let loss = if checkpointing {
        checkpointed_backward(model, ids, train, grad_scale, &seeds)?
    } else {
        let loss = model.head_loss(ids, &blocks(model, &model_embed(model, ids, train, &seeds), train, &seeds), Reduction::Mean);
        loss.f_mul_scalar(grad_scale)?.f_backward()?;
        loss
    };
    // Both paths leave the generator in the same state, whatever the recomputation drew.
    seeds.finish(model.layers());
    Ok(loss.detach())
}

/// Logits of every position, appending to `cache` when given.  ids: (B, T) -> (B, T, V)
pub(super) fn forward_cached(model: &impl Stack, ids: &Tensor, cache: Option<&mut KvCache>, train: bool) -> Tensor {
    model.logits(&model.hidden(ids, cache, train))
}

/// The prompt's pass that fills `cache`, with the logits of its last position only (all
/// positions when `all`): the lm_head over a long prompt costs as much as a few layers.
/// ids: (B, T) -> (B, 1 or T, V)
pub(super) fn prefill(model: &impl Stack, ids: &Tensor, cache: &mut KvCache, all: bool) -> Tensor {
    let h = model.hidden(ids, Some(cache), false);
    let t = h.size()[1];
    model.logits(&if all { h } else { h.narrow(1, t - 1, 1) })
}

/// The loss of a training or evaluation pass without a backward pass.
pub(super) fn loss(model: &impl Stack, ids: &Tensor, train: bool, reduction: Reduction) -> Tensor {
    let seeds = DropoutSeeds::draw(train && model.has_dropout());
    let top = blocks(model, &model_embed(model, ids, train, &seeds), train, &seeds);
    model.head_loss(ids, &top, reduction)
}

fn model_embed(model: &impl Stack, ids: &Tensor, train: bool, seeds: &DropoutSeeds) -> Tensor {
    seeds.embedding();
    model.embed(ids, train)
}

fn blocks(model: &impl Stack, embedded: &Tensor, train: bool, seeds: &DropoutSeeds) -> Tensor {
    let mut h = embedded.shallow_clone();
    for l in 0..model.layers() {
        seeds.block(l);
        h = model.block(l, &h, train);
    }
    h
}

fn checkpointed_backward(model: &impl Stack, ids: &Tensor, train: bool, grad_scale: f64, seeds: &DropoutSeeds) -> Result<Tensor, TchError> {
    let embedded = model_embed(model, ids, train, seeds);
    let mut inputs = Vec::with_capacity(model.layers());
    let mut h = embedded.detach();
    {
        let _guard = tch::no_grad_guard();
        for l in 0..model.layers() {
            seeds.block(l);
            let out = model.block(l, &h, train);
            inputs.push(std::mem::replace(&mut h, out));
        }
    }
    let top = h.set_requires_grad(true);
    let loss = model.head_loss(ids, &top, Reduction::Mean);
    loss.f_mul_scalar(grad_scale)?.f_backward()?;
    let mut grad = top.grad();
    drop(top);
    for l in (0..model.layers()).rev() {
        let input = inputs.pop().expect("one input per block").set_requires_grad(true);
        seeds.block(l);
        let out = model.block(l, &input, train);
        backward_with(&out, &grad)?;
        grad = input.grad();
    }
    backward_with(&embedded, &grad)?;
    Ok(loss)
}

/// Mean (or summed) next-token cross-entropy of each row of `ids` (B, T) predicting itself
/// shifted by one (HF labels = input_ids), from f32 logits (B, T, V).
pub(super) fn token_loss(ids: &Tensor, logits: &Tensor, reduction: Reduction) -> Tensor {
    let (_, t) = ids.size2().expect("ids are (B, T)");
    let v = logits.size()[2];
    let predicted = logits.narrow(1, 0, t - 1).reshape([-1, v]);
    let targets = ids.narrow(1, 1, t - 1).reshape([-1]);
    predicted.cross_entropy_loss::<Tensor>(&targets, None, reduction, -100, 0.0)
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
pub(super) fn project(xs: &Tensor, w: &Tensor, b: Option<&Tensor>, rows: i64) -> Tensor {
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
