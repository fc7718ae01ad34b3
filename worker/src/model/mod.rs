//! The model layer: `Model` is what training, eval, generate and serve run, whichever
//! architecture config.json names. One file per architecture with HF's names (`codegen.rs`,
//! `decoder.rs` for the Llama/Qwen2/StarCoder2 family); the layers they share (`rope.rs`,
//! `rotary.rs`, the training pass in `shared.rs`); the KV caches (`kv.rs`); the CPU decode kernels
//! (`matvec.rs`, `attend.rs`, `omp.rs`); and the weights as one flat buffer (`params.rs`), which
//! the optimizer and the collectives treat as plain memory. Nothing outside this module asks
//! which architecture it runs.

pub mod attend;
pub mod codegen;
pub mod decoder;
pub mod kv;
pub mod matvec;
mod omp;
pub mod params;
pub mod rope;
pub mod rotary;
mod shared;

pub use codegen::CodeGen;
pub use decoder::Decoder;
pub use kv::{BatchCache, KvCache};
pub use params::ParamSet;

use tch::{Reduction, TchError, Tensor};
use zerotune_hf::ModelConfig;

/// A model bound to its parameters.
pub struct Model {
    pub config: ModelConfig,
    architecture: Architecture,
}

enum Architecture {
    CodeGen(CodeGen),
    Decoder(Decoder),
}

/// Runs the same call on whichever architecture `$model` holds.
macro_rules! each {
    ($model:expr, $m:ident => $call:expr) => {
        match &$model.architecture {
            Architecture::CodeGen($m) => $call,
            Architecture::Decoder($m) => $call,
        }
    };
}

impl Model {
    /// Binds the model to `params` (which must follow `config`'s layout).
    pub fn new(config: &ModelConfig, params: &ParamSet) -> Model {
        let architecture = match config {
            ModelConfig::CodeGen(c) => Architecture::CodeGen(CodeGen::new(c, params)),
            ModelConfig::Decoder(c) => Architecture::Decoder(Decoder::new(c, params)),
        };
        Model { config: config.clone(), architecture }
    }

    /// Logits in f32 (HF upcasts them).  ids: (B, T) int64 -> (B, T, V)
    pub fn forward(&self, ids: &Tensor, train: bool) -> Tensor {
        each!(self, m => shared::forward_cached(m, ids, None, train))
    }

    /// Forward pass that appends to `cache` when given (prompt first, then one token at a time).
    pub fn forward_cached(&self, ids: &Tensor, cache: Option<&mut KvCache>, train: bool) -> Tensor {
        each!(self, m => shared::forward_cached(m, ids, cache, train))
    }

    /// The prompt's pass that fills `cache`, with the logits of its last position only (all
    /// positions when `all`).  ids: (B, T) -> (B, 1 or T, V)
    pub fn prefill(&self, ids: &Tensor, cache: &mut KvCache, all: bool) -> Tensor {
        each!(self, m => shared::prefill(m, ids, cache, all))
    }

    /// One new token per row of `cache`, each at its own position (the row's length): rows of
    /// different lengths decode together, and each row's logits are those it would get alone.
    /// ids: (N, 1) -> (N, V)
    pub fn decode(&self, ids: &Tensor, cache: &mut BatchCache) -> Tensor {
        each!(self, m => m.decode(ids, cache))
    }

    /// Mean next-token cross-entropy (HF labels = input_ids).  ids: (B, T) -> scalar f32
    pub fn loss(&self, ids: &Tensor, train: bool) -> Tensor {
        each!(self, m => shared::loss(m, ids, train, Reduction::Mean))
    }

    /// Summed next-token cross-entropy, for evaluation over many batches.
    pub fn loss_sum(&self, ids: &Tensor) -> Tensor {
        each!(self, m => shared::loss(m, ids, false, Reduction::Sum))
    }

    /// The training loss (detached), its gradients times `grad_scale` added into the parameters'
    /// `.grad`, with or without gradient checkpointing (`shared::loss_backward`).
    pub fn loss_backward(&self, ids: &Tensor, train: bool, grad_scale: f64, checkpointing: bool) -> Result<Tensor, TchError> {
        each!(self, m => shared::loss_backward(m, ids, train, grad_scale, checkpointing))
    }
}
