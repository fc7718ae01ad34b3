//! The documents a job trains and evaluates on, without libtorch: a source tree through
//! files2jsonl (filters and skip counts), or `.jsonl`/`.json`/`.csv`/`.txt` input, each document
//! with its text and where it came from. The coordinator and `worker eval` read data the same way.

pub mod documents;
pub mod files2jsonl;

pub use documents::{load_documents, Document};
pub use files2jsonl::Filter;

use std::path::PathBuf;

/// What can be wrong with input data; each names the file (and line) and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{path}:{line}: {message}")]
    Line { path: PathBuf, line: usize, message: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// A filter flag (a glob) is malformed; the message names it.
    #[error("{0}")]
    Flag(String),
}

pub type Result<T> = std::result::Result<T, DataError>;
