//! The coordinator: one per job. It turns run_clm-style flags and ds_config.json into a plan,
//! prepares and caches the token blocks, launches the workers, serves them over gRPC and records
//! what they report (metrics, checkpoints, the final model).

pub mod advice;
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
pub mod rotation;
pub mod sampler;
pub mod service;
pub mod slurm;

pub use error::{CoordinatorError, Result};

/// Held by the unit tests that start processes, while they do, and by the lock test: a process
/// forked meanwhile holds a copy of the lock's descriptor until its exec, so a lock just released
/// would still look held.
#[cfg(test)]
pub(crate) fn forking() -> std::sync::MutexGuard<'static, ()> {
    static FORKING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    FORKING.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
