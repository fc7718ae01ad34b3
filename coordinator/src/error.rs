//! The coordinator's errors: each names the flag, file or line at fault and says what to do.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// A flag or ds_config.json value is wrong; the message names it.
    #[error("{0}")]
    Flag(String),
    #[error("{path}: {message}")]
    Data { path: PathBuf, message: String },
    #[error("{path}:{line}: {message}")]
    Line { path: PathBuf, line: usize, message: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Model(#[from] zerotune_hf::Error),
    /// Input documents that cannot be read; the message names the file and line.
    #[error(transparent)]
    Input(#[from] zerotune_data::DataError),
    /// A resume that would go backwards or change the data order.
    #[error("--resume_from_checkpoint {}: {reason}", dir.display())]
    Resume { dir: PathBuf, reason: crate::job::ResumeConflict },
    #[error("worker rank {rank} ({host}) failed: {message}")]
    Worker { rank: u32, host: String, message: String },
    /// A process that runs every rank (srun) failed.
    #[error("{0}")]
    Launcher(String),
    #[error("gRPC server: {0}")]
    Server(String),
    /// The memory planner finds the job too large: its table, why, and what to pass instead.
    #[error("{table}memory planner: {refusal} ({hint})")]
    Memory { table: String, refusal: Box<crate::estimate::Refusal>, hint: &'static str },
}

pub type Result<T> = std::result::Result<T, CoordinatorError>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> CoordinatorError {
    let path = path.into();
    move |source| CoordinatorError::Io { path, source }
}
