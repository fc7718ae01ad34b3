//! The data pipeline every command runs (`coordinator files2jsonl`, `tokenize`, `train`), one
//! linear pass of stages over plain data, each a function returning its counts:
//! collect (inputs and files2jsonl's filters) -> scrub (secrets) -> cut (`--max_document_bytes`)
//! -> dedup -> split -> leakage check; the coordinator then tokenizes and caches. The stages'
//! own counts make the `DataReport`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;

use crate::dedup::{self, Dup, Item};
use crate::report::{CollectCounts, CopyCounts, CutCounts, DataReport, Hygiene, Removed, SecretCounts, SecretsMode, SplitCounts};
use crate::secrets::{self, Scanner};
use crate::{files2jsonl, DataError, Document, Filter, Result};

/// A document and the name it is reported and deduplicated by: its url (a source file's path
/// under its root), else `input#row`.
#[derive(Clone, Debug)]
pub struct Named {
    pub name: String,
    pub doc: Document,
}

/// Where the documents come from.
#[derive(Clone, Debug)]
pub struct Inputs {
    pub train: PathBuf,
    pub validation: Option<PathBuf>,
    pub text_column: String,
    pub filter: Filter,
    /// Percent of the documents held out when there is no validation input.
    pub validation_split_percentage: u32,
    pub seed: u64,
}

/// What the pipeline hands to tokenization.
pub struct SplitDocuments {
    pub train: Vec<Document>,
    pub validation: Vec<Document>,
    pub report: DataReport,
}

/// collect -> scrub -> cut -> dedup -> split -> leakage, on training and validation data.
pub fn run(inputs: &Inputs, hygiene: &Hygiene) -> Result<SplitDocuments> {
    let mut report = DataReport { settings: hygiene.clone(), ..Default::default() };
    let mut clock = Clock(Instant::now());
    let (docs, counts) = collect(&inputs.train, &inputs.text_column, &inputs.filter)?;
    report.collect.push(counts);
    if docs.is_empty() {
        return Err(DataError::File { path: inputs.train.clone(), message: "has no documents: the training set is empty".into() });
    }
    let validation = match &inputs.validation {
        Some(path) => {
            let (val, counts) = collect(path, &inputs.text_column, &inputs.filter)?;
            report.collect.push(counts);
            Some(val)
        }
        None => None,
    };
    clock.lap(&mut report, "collect");
    let Cleaned { train: docs, signatures: sigs, validation } = clean(docs, validation, hygiene, &mut report, &mut clock)?;
    let (train, train_sigs, val, split_counts) = match validation {
        Some(val) => {
            let counts = SplitCounts { method: "validation_file".into(), train_documents: docs.len(), validation_documents: val.len() };
            (docs, sigs, val, counts)
        }
        None => {
            let (train, val, counts) = split(docs.into_iter().zip(sigs).collect(), inputs.validation_split_percentage, inputs.seed);
            let (train, train_sigs): (Vec<Named>, Vec<Vec<u32>>) = train.into_iter().unzip();
            (train, train_sigs, val.into_iter().map(|(n, _)| n).collect(), counts)
        }
    };
    report.split = split_counts;
    clock.lap(&mut report, "split");
    let (val, leaks) = leakage(&train, &train_sigs, val, hygiene.dedup, hygiene.dedup_threshold);
    report.leakage = leaks;
    clock.lap(&mut report, "leakage");
    if train.is_empty() {
        return Err(DataError::File {
            path: inputs.train.clone(),
            message: format!("the training split is empty after the data pipeline:\n{}", report.summary()),
        });
    }
    report.train_documents = train.len();
    report.validation_documents = val.len();
    report.merge_skipped();
    let docs = |v: Vec<Named>| v.into_iter().map(|n| n.doc).collect();
    Ok(SplitDocuments { train: docs(train), validation: docs(val), report })
}

/// files2jsonl: a source tree through collect -> scrub -> cut -> dedup (no split).
pub fn run_tree(root: &Path, filter: &Filter, hygiene: &Hygiene) -> Result<(Vec<Document>, DataReport)> {
    let mut report = DataReport { settings: hygiene.clone(), ..Default::default() };
    let mut clock = Clock(Instant::now());
    let (docs, counts) = collect(root, "text", filter)?;
    report.collect.push(counts);
    clock.lap(&mut report, "collect");
    let docs = clean(docs, None, hygiene, &mut report, &mut clock)?.train;
    report.train_documents = docs.len();
    report.merge_skipped();
    Ok((docs.into_iter().map(|n| n.doc).collect(), report))
}

/// What the stages between collect and split keep.
struct Cleaned {
    train: Vec<Named>,
    /// The training documents' MinHash signatures, for the leakage check.
    signatures: Vec<Vec<u32>>,
    validation: Option<Vec<Named>>,
}

/// The stages between collect and split: scrub and cut (training and validation documents), then
/// dedup (training documents).
fn clean(
    docs: Vec<Named>,
    validation: Option<Vec<Named>>,
    hygiene: &Hygiene,
    report: &mut DataReport,
    clock: &mut Clock,
) -> Result<Cleaned> {
    let (docs, validation, secrets) = scrub_stage(docs, validation, hygiene.secrets, &Scanner::new())?;
    report.secrets = secrets;
    clock.lap(report, "scrub");
    let (docs, counts) = cut(docs, hygiene.max_document_bytes);
    report.cut = counts;
    let validation = validation.map(|val| {
        let (val, counts) = cut(val, hygiene.max_document_bytes);
        report.cut.documents_cut += counts.documents_cut;
        report.cut.pieces += counts.pieces;
        val
    });
    clock.lap(report, "cut");
    let (docs, sigs, counts) = dedup(docs, hygiene.dedup, hygiene.dedup_threshold);
    report.dedup = counts;
    clock.lap(report, "dedup");
    Ok(Cleaned { train: docs, signatures: sigs, validation })
}

/// Stage times into the report: each lap is the time since the last.
struct Clock(Instant);

impl Clock {
    fn lap(&mut self, report: &mut DataReport, stage: &str) {
        report.seconds.insert(stage.to_string(), self.0.elapsed().as_secs_f64());
        self.0 = Instant::now();
    }
}

/// Stage collect: the documents of one input with their names, and the filter's skip counts.
pub fn collect(path: &Path, text_column: &str, filter: &Filter) -> Result<(Vec<Named>, CollectCounts)> {
    let input = path.display().to_string();
    let mut counts = CollectCounts { input: input.clone(), ..Default::default() };
    let docs = if path.is_dir() {
        let collected = files2jsonl::collect(path, filter)?;
        for (reason, n) in &collected.skipped {
            counts.skipped.insert(reason.name().to_string(), *n);
        }
        collected.files.into_iter().map(|f| Document { text: f.text, url: Some(f.url) }).collect()
    } else {
        crate::load_documents(path, text_column, filter)?
    };
    let named: Vec<Named> = docs
        .into_iter()
        .enumerate()
        .map(|(i, doc)| Named { name: doc.url.clone().unwrap_or_else(|| format!("{input}#{}", i + 1)), doc })
        .collect();
    counts.documents = named.len();
    counts.bytes = named.iter().map(|n| n.doc.text.len()).sum();
    Ok((named, counts))
}

/// Stage scrub on the training and validation documents: every finding as `name:line rule`;
/// under `--secrets fail` any finding is an error listing them all (nothing is written yet).
pub fn scrub_stage(
    docs: Vec<Named>,
    validation: Option<Vec<Named>>,
    mode: SecretsMode,
    scanner: &Scanner,
) -> Result<(Vec<Named>, Option<Vec<Named>>, SecretCounts)> {
    let mut counts = SecretCounts::default();
    let found = scan(&docs, scanner, &mut counts);
    let val_found = validation.as_ref().map(|v| scan(v, scanner, &mut counts));
    if mode == SecretsMode::Fail && !counts.findings.is_empty() {
        return Err(DataError::Secrets { findings: counts.findings });
    }
    let docs = scrub(docs, found, mode, &mut counts);
    let validation = validation.zip(val_found).map(|(v, f)| scrub(v, f, mode, &mut counts));
    Ok((docs, validation, counts))
}

/// The findings of each document, counted per rule and listed as `name:line rule`.
pub fn scan(docs: &[Named], scanner: &Scanner, counts: &mut SecretCounts) -> Vec<Vec<secrets::Finding>> {
    let found: Vec<Vec<secrets::Finding>> = docs.par_iter().map(|n| scanner.scan(&n.doc.text)).collect();
    for (n, findings) in docs.iter().zip(&found) {
        counts.documents_with_secrets += usize::from(!findings.is_empty());
        for f in findings {
            *counts.per_rule.entry(f.rule.to_string()).or_insert(0) += 1;
            counts.findings.push(format!("{}:{} {}", n.name, f.line, f.rule));
        }
    }
    found
}

/// Redacts the values (`redact`), or drops the documents holding any (`drop_file`).
pub fn scrub(docs: Vec<Named>, found: Vec<Vec<secrets::Finding>>, mode: SecretsMode, counts: &mut SecretCounts) -> Vec<Named> {
    let mut out = Vec::with_capacity(docs.len());
    for (mut n, findings) in docs.into_iter().zip(found) {
        match (findings.is_empty(), mode) {
            (true, _) | (false, SecretsMode::Keep | SecretsMode::Fail) => out.push(n),
            (false, SecretsMode::DropFile) => counts.documents_dropped += 1,
            (false, SecretsMode::Redact) => {
                n.doc.text = secrets::redact(&n.doc.text, &findings);
                counts.values_redacted += findings.len();
                out.push(n)
            }
        }
    }
    out
}

/// Stage cut: documents above `max_bytes` become pieces of at most `max_bytes`, cut after a
/// newline (a longer line is cut at a character boundary); piece k is named `name#partk`.
pub fn cut(docs: Vec<Named>, max_bytes: usize) -> (Vec<Named>, CutCounts) {
    let mut counts = CutCounts::default();
    let mut out = Vec::with_capacity(docs.len());
    for n in docs {
        if n.doc.text.len() <= max_bytes {
            out.push(n);
            continue;
        }
        let pieces = cut_points(&n.doc.text, max_bytes);
        counts.documents_cut += 1;
        counts.pieces += pieces.len();
        for (k, piece) in pieces.into_iter().enumerate() {
            let text = n.doc.text[piece].to_string();
            out.push(Named { name: format!("{}#part{}", n.name, k + 1), doc: Document { text, url: n.doc.url.clone() } });
        }
    }
    (out, counts)
}

/// Byte ranges of `text` of at most `max_bytes` each (at least one character), ending after a
/// newline where one is in reach.
pub fn cut_points(text: &str, max_bytes: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = vec![];
    let mut start = 0;
    while start < text.len() {
        let mut end = (start + max_bytes).min(text.len());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        if end < text.len() {
            match text[start..end].rfind('\n') {
                Some(nl) => end = start + nl + 1,
                None => {
                    if end == start {
                        end = start + text[start..].chars().next().map_or(1, char::len_utf8);
                    }
                }
            }
        }
        out.push(start..end);
        start = end;
    }
    out
}

fn items(docs: &[Named]) -> Vec<Item<'_>> {
    docs.iter().map(|n| Item { name: &n.name, text: &n.doc.text }).collect()
}

fn removed(docs: &[Named], found: &[Option<Dup>], of: &[Named], counts: &mut CopyCounts) {
    for (n, dup) in docs.iter().zip(found) {
        let kept = match dup {
            None => continue,
            Some(Dup::Exact { of: k }) => (counts.exact += 1, k).1,
            Some(Dup::Near { of: k }) => (counts.near += 1, k).1,
        };
        counts.removed.push(Removed { name: n.name.clone(), kept: of[*kept].name.clone() });
    }
}

/// Stage dedup: exact copies, then (`near`) near copies, one of each group kept; returns the
/// kept documents with their MinHash signatures (for the leakage check).
pub fn dedup(docs: Vec<Named>, mode: dedup::DedupMode, threshold: f64) -> (Vec<Named>, Vec<Vec<u32>>, CopyCounts) {
    let sigs = dedup::signatures(&items(&docs), mode);
    let found = dedup::find_copies(&items(&docs), &sigs, mode, threshold);
    let mut counts = CopyCounts::default();
    removed(&docs, &found, &docs, &mut counts);
    let (kept, sigs) = docs.into_iter().zip(sigs).zip(found).filter(|(_, d)| d.is_none()).map(|(kept, _)| kept).unzip();
    (kept, sigs, counts)
}

/// Stage split: a seeded shuffle, then `percent`% of whole documents (rounded, at least one
/// when there are two or more) go to validation; both keep input order.
pub fn split<T>(docs: Vec<T>, percent: u32, seed: u64) -> (Vec<T>, Vec<T>, SplitCounts) {
    let n = docs.len();
    let mut n_val = ((n as f64) * percent as f64 / 100.0).round() as usize;
    if percent > 0 && n >= 2 {
        n_val = n_val.clamp(1, n - 1);
    }
    let mut order: Vec<usize> = (0..n).collect();
    crate::rng::shuffle(&mut order, &mut crate::rng::SplitMix64::new(seed));
    let mut is_val = vec![false; n];
    order[..n_val].iter().for_each(|&i| is_val[i] = true);
    let (mut train, mut val) = (vec![], vec![]);
    for (doc, v) in docs.into_iter().zip(is_val) {
        if v {
            val.push(doc)
        } else {
            train.push(doc)
        }
    }
    let counts = SplitCounts { method: format!("{percent}% held out"), train_documents: train.len(), validation_documents: val.len() };
    (train, val, counts)
}

/// Stage leakage: validation documents that copy a training document (as `--dedup` defines a
/// copy) are removed from validation; `train_sigs` from `dedup`.
pub fn leakage(
    train: &[Named],
    train_sigs: &[Vec<u32>],
    val: Vec<Named>,
    mode: dedup::DedupMode,
    threshold: f64,
) -> (Vec<Named>, CopyCounts) {
    let found = dedup::find_leaks(&items(train), train_sigs, &items(&val), mode, threshold);
    let mut counts = CopyCounts::default();
    removed(&val, &found, train, &mut counts);
    let kept = val.into_iter().zip(found).filter(|(_, d)| d.is_none()).map(|(n, _)| n).collect();
    (kept, counts)
}

#[cfg(test)]
#[path = "pipeline_tests.rs"]
mod tests;
