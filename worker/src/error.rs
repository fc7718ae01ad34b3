//! The worker's errors, each a sentence that tells the user what went wrong and what to do.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Model(#[from] zerotune_hf::Error),
    /// Input documents that cannot be read (`worker eval`); the message names the file and line.
    #[error(transparent)]
    Input(#[from] zerotune_data::DataError),
    #[error("the loss became {loss} at step {step}; stopped without saving (the last completed checkpoint is intact). Lower the learning rate or use --bf16")]
    NonFiniteLoss { step: u64, loss: f64 },
    #[error("the gradients became non-finite (norm {norm}) at step {step}; stopped without saving (the last completed checkpoint is intact). Lower the learning rate or use --bf16")]
    NonFiniteGradients { step: u64, norm: f64 },
    #[error(transparent)]
    LossScale(#[from] crate::optim::loss_scale::AtMinimum),
    #[error("device {0:?} is not available: {1}")]
    Device(String, String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// A collective failed because another rank went away.
    #[error("collective failed: {0}")]
    Peer(String),
    /// A flag's value out of its range: the flag, the value given and what it must be.
    #[error("{flag} {value}: {rule}")]
    Flag { flag: &'static str, value: String, rule: &'static str },
    /// Input that is not what the worker was promised (a config, a batch); the text says which.
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, WorkerError>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> WorkerError {
    let path = path.into();
    move |source| WorkerError::Io { path, source }
}
