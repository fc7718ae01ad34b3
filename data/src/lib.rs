//! The documents a job trains and evaluates on, without libtorch: a source tree through
//! files2jsonl (filters and skip counts), or `.jsonl`/`.json`/`.csv`/`.txt` input, each document
//! with its text and where it came from; the hygiene stages (secrets.rs, dedup.rs) and the one
//! pipeline that runs them in order (pipeline.rs) with its report (report.rs); and the seeded
//! generator that orders documents. The coordinator and `worker eval` read data the same way.

pub mod dedup;
pub mod fim;
pub mod documents;
pub mod files2jsonl;
pub mod pipeline;
pub mod report;
pub mod rng;
pub mod secrets;

pub use dedup::DedupMode;
pub use documents::{load_documents, Document};
pub use files2jsonl::Filter;
pub use report::{DataReport, Hygiene, SecretsMode};

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

/// The hygiene flags (`coordinator train`, `tokenize` and `files2jsonl` share them).
#[derive(Clone, Debug, clap::Args)]
#[command(rename_all = "snake_case")]
pub struct HygieneArgs {
    /// What to do with a secret found in the data: redact its value as <SECRET:rule>, drop the
    /// file, fail listing file:line rule (before anything is written), or keep it.
    #[arg(long, value_enum, default_value_t = SecretsMode::Redact)]
    pub secrets: SecretsMode,
    /// Remove duplicate documents: none, exact (same text, any line endings) or near (MinHash).
    #[arg(long, value_enum, default_value_t = DedupMode::Near)]
    pub dedup: DedupMode,
    /// Near duplicates: the Jaccard similarity of word 5-shingles at or above which two
    /// documents are copies (0 < t <= 1).
    #[arg(long, default_value_t = 0.85, allow_negative_numbers = true)]
    pub dedup_threshold: f64,
    /// Documents larger than this many bytes are cut at line boundaries into pieces.
    #[arg(long, default_value_t = 4_000_000)]
    pub max_document_bytes: usize,
}

impl HygieneArgs {
    pub fn hygiene(&self) -> Result<Hygiene> {
        let t = self.dedup_threshold;
        if !(t > 0.0 && t <= 1.0) {
            return Err(DataError::Flag(format!("--dedup_threshold {t}: must be in (0, 1], e.g. 0.85")));
        }
        if self.max_document_bytes < 1024 {
            return Err(DataError::Flag(format!("--max_document_bytes {}: must be at least 1024", self.max_document_bytes)));
        }
        Ok(Hygiene { secrets: self.secrets, dedup: self.dedup, dedup_threshold: t, max_document_bytes: self.max_document_bytes })
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
    #[error(transparent)]
    Io(#[from] zerotune_hf::PathIo),
    /// A filter flag (a glob) is malformed; the message names it.
    #[error("{0}")]
    Flag(String),
    /// `--secrets fail` and secrets were found: `file:line rule` each, never the value.
    #[error("--secrets fail: {} secret(s) found, nothing was written:\n  {}\n(redact them with --secrets redact, the default, or drop the files with --secrets drop_file)", findings.len(), findings.join("\n  "))]
    Secrets { findings: Vec<String> },
}

pub type Result<T> = std::result::Result<T, DataError>;

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        hygiene: HygieneArgs,
    }

    fn hygiene(args: &[&str]) -> std::result::Result<Hygiene, String> {
        let cli = Cli::try_parse_from([&["test"], args].concat()).map_err(|e| e.to_string())?;
        cli.hygiene.hygiene().map_err(|e| e.to_string())
    }

    #[test]
    fn hygiene_flags_parse_and_out_of_range_values_are_refused_by_name() {
        assert_eq!(hygiene(&[]).unwrap(), Hygiene::default());
        let h =
            hygiene(&["--secrets", "drop_file", "--dedup", "exact", "--dedup_threshold", "0.9", "--max_document_bytes", "2048"]).unwrap();
        assert_eq!((h.secrets, h.dedup, h.dedup_threshold, h.max_document_bytes), (SecretsMode::DropFile, DedupMode::Exact, 0.9, 2048));
        for bad in ["0", "-0.5", "1.5", "NaN"] {
            assert!(hygiene(&["--dedup_threshold", bad]).unwrap_err().contains("--dedup_threshold"), "{bad}");
        }
        assert!(hygiene(&["--max_document_bytes", "10"]).unwrap_err().contains("--max_document_bytes 10"));
        assert!(hygiene(&["--secrets", "shout"]).is_err());
    }
}
