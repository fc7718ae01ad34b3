//! The worker: one process per GPU or CPU rank. It runs CodeGen through tch, trains with AdamW on
//! fp32 master weights, writes checkpoints in HF layout, generates text, and serves completions
//! over HTTP with continuous batching.

pub mod agent;
pub mod checkpoint;
pub mod comm;
pub mod device;
pub mod dtype;
pub mod engine;
pub mod error;
pub mod eval;
pub mod generate;
pub mod grads;
pub mod model;
pub mod optim;
pub mod precision;
pub mod prefix;
pub mod sample;
pub mod serve;
mod test_hook;
pub mod text;
pub mod train;
pub mod zero;

pub use error::{Result, WorkerError};
