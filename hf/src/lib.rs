//! HF model directories without libtorch: any supported architecture's config.json (`model.rs`:
//! CodeGen's, `config.rs`, or the Llama decoder family's, `decoder/`), tensors read from any HF
//! weight layout (safetensors, pytorch_model.bin, sharded indexes), and sharded safetensors writing.

pub mod config;
pub mod decoder;
pub mod dtype;
pub mod layout;
pub mod manifest;
pub mod model;
pub mod os;
pub mod read;
pub mod tokenizer;
pub mod write;

pub use config::{CodeGenConfig, MP_NUM};
pub use decoder::DecoderConfig;
pub use dtype::Dtype;
pub use layout::model_dir;
pub use model::{Init, ModelConfig};
pub use read::{f32_bytes, RawTensor, WeightFiles};

use std::path::PathBuf;

/// Everything that can go wrong reading or writing a model directory, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Io(#[from] PathIo),
    #[error("{path}: not valid JSON: {source}")]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error(
        "{dir}: no model weights found (looked for model.safetensors, model.safetensors.index.json, \
         pytorch_model.bin, pytorch_model.bin.index.json)"
    )]
    NoWeights { dir: PathBuf },
    #[error("{dir}: the checkpoint lacks {count} tensor(s) the config needs, e.g. {first}")]
    MissingTensors { dir: PathBuf, count: usize, first: String },
    #[error("{path}: tensor {name} has shape {found:?} but config.json implies {expected:?} (a checkpoint of another size or a resized vocabulary?)")]
    ShapeMismatch { path: PathBuf, name: String, found: Vec<usize>, expected: Vec<usize> },
    #[error("{path}: tensor {name} holds {count} NaN or infinite values: the weights are damaged or diverged; use another checkpoint, or pass --allow_nonfinite to load them anyway")]
    NonFinite { path: PathBuf, name: String, count: u64 },
    #[error("{path}: the file shrank while it was being read (bytes up to {needed} are gone): another program truncated or replaced it; run again once it is complete")]
    Shrank { path: PathBuf, needed: u64 },
    #[error("{path}: tensor {name} is stored as {dtype:?}, which is not a floating-point type")]
    NotFloat { path: PathBuf, name: String, dtype: Dtype },
}

pub type Result<T> = std::result::Result<T, Error>;

/// A file operation that failed, naming the file: every crate's `Io` error carries one.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct PathIo {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// Names `path` in the I/O error of an operation on it (`.map_err(io_err(&path))?`).
pub fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> PathIo {
    let path = path.into();
    move |source| PathIo { path, source }
}

/// Reads the config.json at `path` and parses it with `parse`, naming the file in any error.
pub(crate) fn read_config<T>(path: &std::path::Path, parse: impl FnOnce(serde_json::Value) -> std::result::Result<T, String>) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let value = serde_json::from_str(&text).map_err(|source| Error::Json { path: path.into(), source })?;
    parse(value).map_err(|message| invalid(path, message))
}

pub(crate) fn invalid(path: impl Into<PathBuf>, message: impl Into<String>) -> Error {
    Error::Invalid { path: path.into(), message: message.into() }
}
