//! The documents a job trains and evaluates on, without libtorch: a source tree through
//! files2jsonl (filters and skip counts), or `.jsonl`/`.json`/`.csv`/`.txt` input, each document
//! with its text and where it came from; and the seeded generator that orders them. The
//! coordinator and `worker eval` read data the same way.

pub mod documents;
pub mod files2jsonl;
pub mod rng;

pub use documents::{load_documents, Document};
pub use files2jsonl::Filter;

/// How documents are read, as flags (`coordinator train`, `tokenize`, `worker eval` share them).
#[derive(Clone, Debug, clap::Args)]
#[command(rename_all = "snake_case")]
pub struct SourceArgs {
    /// The column holding the text in .jsonl/.json/.csv input.
    #[arg(long, default_value = "text")]
    pub text_column_name: String,
    /// Source directories: keep only these extensions (comma separated, e.g. rs,py).
    #[arg(long, value_delimiter = ',')]
    pub source_extensions: Vec<String>,
    /// Source directories: skip paths matching this glob (repeatable).
    #[arg(long)]
    pub source_exclude: Vec<String>,
    /// Source directories: skip files larger than this many bytes.
    #[arg(long, default_value_t = 1_000_000)]
    pub max_file_bytes: u64,
}

impl SourceArgs {
    pub fn filter(&self) -> Result<Filter> {
        Filter::new(self.max_file_bytes, &self.source_extensions, &self.source_exclude)
    }
}

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
