//! The coordinator: one per job. It turns run_clm-style flags and ds_config.json into a plan,
//! prepares and caches the token blocks, launches the workers, serves them over gRPC and records
//! what they report (metrics, checkpoints, the final model).

pub mod blame;
pub mod checkpoint;
pub mod completion_eval;
pub mod config;
pub mod dataset;
pub mod error;
pub mod estimate;
pub mod events;
pub mod gpu;
pub mod hosts;
pub mod job;
pub mod launch;
pub mod lock;
pub mod prepare;
pub mod progress;
pub mod report;
pub mod sampler;
pub mod service;

pub use error::{CoordinatorError, Result};
