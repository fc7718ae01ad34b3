//! The data report: what each pipeline stage kept, dropped and changed, as plain counts filled
//! in by the stages themselves (pipeline.rs), written as `data_report.json` and printed as a
//! summary. It names documents and lines, never a secret's value.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::dedup::DedupMode;
use crate::files2jsonl::Skip;
use crate::{DataError, Result};

/// What to do with a document holding a secret.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum SecretsMode {
    /// Replace each value with `<SECRET:rule>`.
    Redact,
    /// Leave the whole document out.
    DropFile,
    /// Stop before anything is written, listing `file:line rule`.
    Fail,
    /// Keep the text as it is (the findings are still reported).
    Keep,
}

/// The hygiene settings, validated (part of the token cache key).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Hygiene {
    pub secrets: SecretsMode,
    pub dedup: DedupMode,
    /// Jaccard similarity of word 5-shingles at or above which two documents are near copies.
    pub dedup_threshold: f64,
    /// Documents above this are cut at line boundaries into pieces of at most this size.
    pub max_document_bytes: usize,
}

impl Default for Hygiene {
    fn default() -> Self {
        Self { secrets: SecretsMode::Redact, dedup: DedupMode::Near, dedup_threshold: 0.85, max_document_bytes: 4_000_000 }
    }
}

impl Hygiene {
    /// The settings as one line, for the token cache key and the summary.
    pub fn key(&self) -> String {
        serde_json::to_string(self).expect("plain data serialises")
    }
}

/// Stage `collect`: what one input gave.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CollectCounts {
    pub input: String,
    pub documents: usize,
    pub bytes: usize,
    /// Files left out of a source tree, per reason (files2jsonl's filters).
    pub skipped: BTreeMap<String, usize>,
}

/// Stage `scrub`: the secrets found, per rule and where.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SecretCounts {
    pub per_rule: BTreeMap<String, usize>,
    /// `name:line rule`, in input order.
    pub findings: Vec<String>,
    pub documents_with_secrets: usize,
    pub values_redacted: usize,
    pub documents_dropped: usize,
}

/// Stage `cut`: documents above `--max_document_bytes`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CutCounts {
    pub documents_cut: usize,
    pub pieces: usize,
}

/// One document left out as a copy of another.
#[derive(Clone, Debug, Serialize)]
pub struct Removed {
    pub name: String,
    pub kept: String,
}

/// Stage `dedup` (and `leakage`): the copies removed.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CopyCounts {
    pub exact: usize,
    pub near: usize,
    pub removed: Vec<Removed>,
}

/// Stage `split`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SplitCounts {
    /// `validation_file`, or the percentage of documents held out.
    pub method: String,
    pub train_documents: usize,
    pub validation_documents: usize,
}

/// Stages `tokenize` and `cache`, filled in by the coordinator.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TokenCounts {
    pub block_size: usize,
    pub train_blocks: usize,
    pub validation_blocks: usize,
    pub cache: String,
    pub cache_hit: bool,
}

/// Everything the pipeline did to the data, in stage order.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DataReport {
    pub settings: Hygiene,
    pub collect: Vec<CollectCounts>,
    pub secrets: SecretCounts,
    pub cut: CutCounts,
    pub dedup: CopyCounts,
    pub split: SplitCounts,
    /// Validation documents removed as copies of training documents.
    pub leakage: CopyCounts,
    pub train_documents: usize,
    pub validation_documents: usize,
    /// Every reason a file or document was left out: the collect filters, `secret` (drop_file),
    /// `duplicate`, `near_duplicate`, `validation_leak`.
    pub skipped: BTreeMap<String, usize>,
    pub tokens: Option<TokenCounts>,
    /// Wall time of each stage.
    pub seconds: BTreeMap<String, f64>,
}

impl DataReport {
    /// The skip reasons of every stage, merged.
    pub fn merge_skipped(&mut self) {
        let mut all = BTreeMap::new();
        for c in &self.collect {
            for (k, v) in &c.skipped {
                *all.entry(k.clone()).or_insert(0) += v;
            }
        }
        for (reason, n) in [
            ("secret", self.secrets.documents_dropped),
            ("duplicate", self.dedup.exact),
            ("near_duplicate", self.dedup.near),
            ("validation_leak", self.leakage.exact + self.leakage.near),
        ] {
            if n > 0 {
                all.insert(reason.to_string(), n);
            }
        }
        self.skipped = all;
    }

    /// A few lines for the terminal: one per stage that did something.
    pub fn summary(&self) -> String {
        let mut lines = vec![];
        for c in &self.collect {
            let outputs =
                c.skipped.get(Skip::ZerotuneOutput.name()).map_or(String::new(), |n| format!(" (skipped {n} zerotune output dir(s))"));
            lines.push(format!("collect: {} documents ({} bytes) from {}{outputs}", c.documents, c.bytes, c.input));
        }
        let s = &self.secrets;
        let rules: Vec<String> = s.per_rule.iter().map(|(r, n)| format!("{n} {r}")).collect();
        let action = match self.settings.secrets {
            SecretsMode::Redact => format!("{} values redacted", s.values_redacted),
            SecretsMode::DropFile => format!("{} documents dropped", s.documents_dropped),
            SecretsMode::Keep => "kept (--secrets keep)".to_string(),
            SecretsMode::Fail => "none".to_string(),
        };
        match rules.is_empty() {
            true => lines.push("secrets: none found".to_string()),
            false => lines.push(format!(
                "secrets: {} in {} documents ({}): {action}",
                s.findings.len(),
                s.documents_with_secrets,
                rules.join(", ")
            )),
        }
        if self.cut.documents_cut > 0 {
            lines.push(format!(
                "cut: {} documents above --max_document_bytes {} into {} pieces at line boundaries",
                self.cut.documents_cut, self.settings.max_document_bytes, self.cut.pieces
            ));
        }
        let dedup = serde_json::to_value(self.settings.dedup).expect("an enum serialises");
        lines.push(format!(
            "dedup ({}, threshold {}): {} exact and {} near duplicates removed",
            dedup.as_str().unwrap_or_default(),
            self.settings.dedup_threshold,
            self.dedup.exact,
            self.dedup.near
        ));
        if !self.split.method.is_empty() {
            lines.push(format!(
                "split ({}): {} train / {} validation documents; {} validation leaks removed ({} exact, {} near)",
                self.split.method,
                self.split.train_documents,
                self.split.validation_documents,
                self.leakage.exact + self.leakage.near,
                self.leakage.exact,
                self.leakage.near
            ));
        }
        let skipped: Vec<String> = self.skipped.iter().map(|(r, n)| format!("{n} {r}")).collect();
        lines.push(format!(
            "kept {} train / {} validation documents{}",
            self.train_documents,
            self.validation_documents,
            if skipped.is_empty() { String::new() } else { format!("; skipped {}", skipped.join(", ")) }
        ));
        if let Some(t) = &self.tokens {
            lines.push(format!(
                "tokens: {} train / {} validation blocks of {} ({}{})",
                t.train_blocks,
                t.validation_blocks,
                t.block_size,
                t.cache,
                if t.cache_hit { ", cache hit" } else { "" }
            ));
        }
        lines.join("\n")
    }

    /// Writes the report as pretty JSON to `path`.
    pub fn write(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self).expect("plain data serialises");
        std::fs::write(path, json + "\n").map_err(|source| DataError::from(zerotune_hf::io_err(path)(source)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skip_reasons_merge_and_the_summary_names_each_stage() {
        let mut r = DataReport {
            collect: vec![CollectCounts { input: "src".into(), documents: 5, bytes: 100, skipped: BTreeMap::from([("binary".into(), 2)]) }],
            secrets: SecretCounts {
                per_rule: BTreeMap::from([("github_token".into(), 1)]),
                findings: vec!["a.py:3 github_token".into()],
                documents_with_secrets: 1,
                values_redacted: 1,
                documents_dropped: 0,
            },
            dedup: CopyCounts { exact: 1, near: 2, removed: vec![] },
            leakage: CopyCounts { exact: 0, near: 1, removed: vec![] },
            split: SplitCounts { method: "5%".into(), train_documents: 3, validation_documents: 1 },
            train_documents: 3,
            validation_documents: 0,
            ..Default::default()
        };
        r.merge_skipped();
        let want: Vec<(&str, usize)> = vec![("binary", 2), ("duplicate", 1), ("near_duplicate", 2), ("validation_leak", 1)];
        assert_eq!(r.skipped.iter().map(|(k, v)| (k.as_str(), *v)).collect::<Vec<_>>(), want);
        let s = r.summary();
        for part in [
            "5 documents (100 bytes) from src",
            "1 github_token",
            "1 values redacted",
            "1 exact and 2 near",
            "1 validation leaks",
            "2 binary",
        ] {
            assert!(s.contains(part), "{part} missing from:\n{s}");
        }
        let json: serde_json::Value = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(json["settings"]["secrets"], "redact");
        assert_eq!(json["settings"]["dedup"], "near");
    }

    #[test]
    fn the_settings_key_changes_with_each_setting() {
        let base = Hygiene::default();
        let keys = [
            base.key(),
            Hygiene { secrets: SecretsMode::Keep, ..base.clone() }.key(),
            Hygiene { dedup: DedupMode::Exact, ..base.clone() }.key(),
            Hygiene { dedup_threshold: 0.9, ..base.clone() }.key(),
            Hygiene { max_document_bytes: 10, ..base.clone() }.key(),
        ];
        let distinct: std::collections::BTreeSet<&String> = keys.iter().collect();
        assert_eq!(distinct.len(), keys.len());
    }
}
