//! The model: CodeGen exactly as HF `modeling_codegen.py` and the Llama decoder family
//! (`decoder.rs`, its forward pass so far), CodeGen's rotary embedding, its KV caches, and
//! its weights as one flat buffer (`params`), which the optimizer and the collectives treat as plain memory.

pub mod attend;
pub mod codegen;
pub mod decoder;
pub mod kv;
pub mod matvec;
mod omp;
pub mod params;
pub mod rotary;

pub use codegen::CodeGen;
pub use kv::{BatchCache, KvCache};
pub use params::ParamSet;
