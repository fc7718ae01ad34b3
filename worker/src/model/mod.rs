//! The model: CodeGen exactly as HF `modeling_codegen.py`, its rotary embedding, and its weights as
//! one flat buffer (`params`), which the optimizer and the collectives treat as plain memory.

pub mod codegen;
pub mod params;
pub mod rotary;

pub use codegen::{CodeGen, KvCache};
pub use params::ParamSet;
