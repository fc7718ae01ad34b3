//! `worker eval`: did fine-tuning help? Next-line completion on held-out documents, the base
//! model against the fine-tuned one on the same positions and prompts: greedy decoding to the
//! first newline, batched through the engine; exact match, edit similarity, and the held-out loss
//! and perplexity over the same documents. Writes completion_eval.json and predictions.jsonl.

pub mod metrics;
pub mod positions;

use std::io::Write;
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};
use zerotune_data::{Document, Filter};
use zerotune_hf::layout;
use zerotune_hf::manifest::NonFinite;
pub use zerotune_proto::records::{CompletionEval, EvalModel, Prediction, Scores};

use crate::engine::{Engine, Prompt};
use crate::error::{io_err, EmptyEval, Result, WorkerError};
use crate::generate::{Loaded, Precision};
use crate::sample::{Rng, SamplingParams, TokenSampler};
use crate::text::TextState;
use positions::{candidates, cut_left, draw, Position};

/// What to evaluate and how, from `worker eval`'s flags.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    pub model: PathBuf,
    pub base: Option<PathBuf>,
    /// Held-out data: a file or source directory, read like training data, or `-` (JSON Lines
    /// on standard input, as `coordinator train --do_eval` hands over its validation split).
    pub validation: PathBuf,
    pub text_column: String,
    pub filter: Filter,
    pub output_dir: PathBuf,
    pub num_positions: usize,
    pub context_tokens: usize,
    pub max_new_tokens: usize,
    /// Tokens per block of the held-out loss (default min(1024, n_positions), as training).
    pub block_size: Option<usize>,
    pub seed: u64,
    /// Positions decoding together.
    pub batch: usize,
    pub device: Device,
    pub precision: Precision,
    /// Weights holding NaN or infinite values: refused or loaded (--allow_nonfinite).
    pub nonfinite: NonFinite,
}

/// The evaluation's outcome: each model's scores, base first when given.
#[derive(Clone, Debug)]
pub struct Report {
    pub positions: usize,
    pub candidates: usize,
    pub models: Vec<(EvalModel, Scores)>,
}

impl Report {
    /// A markdown table, base and fine-tuned side by side.
    pub fn table(&self) -> String {
        let mut out = format!("| {} positions |", self.positions);
        let header: Vec<&str> =
            self.models.iter().map(|(model, _)| if *model == EvalModel::Base { "base" } else { "fine-tuned" }).collect();
        out += &format!(" {} |\n|---|{}\n", header.join(" | "), "---|".repeat(header.len()));
        type Cell = fn(&Scores) -> String;
        let rows: [(&str, Cell); 4] = [
            ("exact match %", |s| format!("{:.1}", s.exact_match)),
            ("edit similarity", |s| format!("{:.1}", s.edit_similarity)),
            ("held-out loss", |s| format!("{:.4}", s.loss)),
            ("perplexity", |s| format!("{:.2}", s.perplexity)),
        ];
        for (label, cell) in rows {
            let cells: Vec<String> = self.models.iter().map(|(_, s)| cell(s)).collect();
            out += &format!("| {label} | {} |\n", cells.join(" | "));
        }
        out
    }
}

/// Runs the evaluation and writes its files into `output_dir`.
pub fn run(options: &EvalOptions) -> Result<Report> {
    check_numbers(options)?;
    let documents = zerotune_data::load_documents(&options.validation, &options.text_column, &options.filter)?;
    let (positions, total) = positions_in(options, &documents)?;
    check_tokenizers(options)?;
    let mut models: Vec<(EvalModel, &Path)> = vec![];
    if let Some(base) = &options.base {
        models.push((EvalModel::Base, base));
    }
    models.push((EvalModel::FineTuned, &options.model));
    let mut report = Report { positions: positions.len(), candidates: total, models: vec![] };
    let mut lines = vec![];
    for (name, dir) in models {
        let loaded = Loaded::open(dir, options.device, options.precision, options.nonfinite)?;
        let scores = evaluate(&loaded, name, options, &documents, &positions, &mut lines)?;
        report.models.push((name, scores));
    }
    write_outputs(&options.output_dir, &report, &lines)?;
    Ok(report)
}

/// The positions drawn from `documents`' candidate lines, and how many candidates there were.
fn positions_in(options: &EvalOptions, documents: &[Document]) -> Result<(Vec<Position>, usize)> {
    let nothing = |reason| WorkerError::NothingToEvaluate { file: options.validation.clone(), reason };
    if documents.is_empty() {
        return Err(nothing(EmptyEval::NoDocuments));
    }
    let per_doc: Vec<Vec<Position>> = documents.iter().enumerate().map(|(i, d)| candidates(i, &d.text)).collect();
    let total: usize = per_doc.iter().map(Vec::len).sum();
    if total == 0 {
        return Err(nothing(EmptyEval::NoLines));
    }
    let positions = draw(per_doc, options.num_positions, options.seed);
    if positions.len() < options.num_positions {
        tracing::info!(
            "eval: {} holds {total} candidate lines, fewer than --num_positions {}: evaluating all of them",
            options.validation.display(),
            options.num_positions
        );
    }
    Ok((positions, total))
}

/// A base model is compared on the same token ids only: its tokenizer must be the model's.
fn check_tokenizers(options: &EvalOptions) -> Result<()> {
    let Some(base) = &options.base else { return Ok(()) };
    let load = |dir: &Path| zerotune_hf::tokenizer::load(&zerotune_hf::model_dir(dir));
    if load(base)?.get_vocab(true) != load(&options.model)?.get_vocab(true) {
        return Err(WorkerError::TokenizersDiffer { base: base.clone(), model: options.model.clone() });
    }
    Ok(())
}

/// One model's scores: its greedy completion of every position (each added to `lines`), and its
/// held-out loss over `documents` in blocks.
fn evaluate(
    loaded: &Loaded,
    name: EvalModel,
    options: &EvalOptions,
    documents: &[Document],
    positions: &[Position],
    lines: &mut Vec<Prediction>,
) -> Result<Scores> {
    let context = loaded.config.context();
    let limit = options.context_tokens.min(context.saturating_sub(options.max_new_tokens));
    if limit == 0 {
        return Err(WorkerError::NoRoomForPrompt { max_new_tokens: options.max_new_tokens, context });
    }
    let block = options.block_size.unwrap_or(loaded.config.default_block_size());
    if block > context {
        return Err(WorkerError::BlockAboveContext { block, context });
    }
    let prompts: Vec<Vec<u32>> = positions
        .iter()
        .map(|p| Ok(cut_left(&loaded.encode(&documents[p.doc].text[..p.start])?, limit).to_vec()))
        .collect::<Result<_>>()?;
    let started = std::time::Instant::now();
    let predictions = predict(loaded, &prompts, options.max_new_tokens, options.batch);
    let predicting = started.elapsed().as_secs_f64();
    let (mut em, mut es) = (0.0, 0.0);
    for (p, prediction) in positions.iter().zip(&predictions) {
        let (exact, similarity) = (metrics::exact_match(prediction, &p.target), metrics::edit_similarity(prediction, &p.target));
        em += exact;
        es += similarity;
        lines.push(Prediction {
            model: name,
            url: url(documents, p.doc),
            line: p.line,
            prompt_tail: prompt_tail(&documents[p.doc].text[..p.start]),
            target: p.target.clone(),
            prediction: prediction.clone(),
            exact_match: exact,
            edit_similarity: similarity,
        });
    }
    let started = std::time::Instant::now();
    let (loss, tokens) = held_out_loss(loaded, documents, block)?;
    tracing::info!(
        "eval {}: {} positions predicted in {predicting:.2} s ({:.3}/s); held-out loss over {tokens} tokens in {:.2} s",
        name.name(),
        positions.len(),
        positions.len() as f64 / predicting,
        started.elapsed().as_secs_f64()
    );
    let n = positions.len() as f64;
    Ok(Scores { exact_match: em / n, edit_similarity: es / n, loss, perplexity: loss.exp() })
}

/// Refuses, before anything is read, numbers that would make the evaluation meaningless.
fn check_numbers(options: &EvalOptions) -> Result<()> {
    let checks: [(&'static str, usize, bool, &'static str); 4] = [
        ("--num_positions", options.num_positions, options.num_positions >= 1, "must be at least 1 (the lines to predict)"),
        (
            "--context_tokens",
            options.context_tokens,
            options.context_tokens >= 1,
            "must be at least 1 (the prompt tokens before each line)",
        ),
        ("--max_new_tokens", options.max_new_tokens, options.max_new_tokens >= 1, "must be at least 1 (the tokens a prediction may take)"),
        (
            "--block_size",
            options.block_size.unwrap_or(2),
            options.block_size.is_none_or(|block| block >= 2),
            "a block needs at least 2 tokens (each is predicted from those before it)",
        ),
    ];
    match checks.into_iter().find(|(_, _, ok, _)| !ok) {
        Some((flag, value, _, rule)) => Err(WorkerError::Flag { flag, value: value.to_string(), rule }),
        None => Ok(()),
    }
}

/// The last lines before a position (for the report's examples), at most 3.
fn prompt_tail(prompt: &str) -> String {
    let lines: Vec<&str> = prompt.trim_end_matches('\n').split('\n').collect();
    lines[lines.len().saturating_sub(3)..].join("\n")
}

/// A document's `url`, or its place in the set when it has none.
fn url(documents: &[Document], doc: usize) -> String {
    documents[doc].url.clone().unwrap_or_else(|| format!("document {doc}"))
}

/// Each prompt's greedy completion up to its first newline (or `max_new_tokens`), `batch` at a
/// time through the engine: a prompt joins as soon as another finishes.
pub fn predict(loaded: &Loaded, prompts: &[Vec<u32>], max_new_tokens: usize, batch: usize) -> Vec<String> {
    let mut engine: Engine<usize> = Engine::new(&loaded.model, loaded.device, loaded.eos);
    let mut texts: Vec<TextState> = prompts.iter().map(|_| TextState::new(vec!["\n".into()])).collect();
    let mut next = 0;
    loop {
        let mut emitted = vec![];
        while engine.len() < batch.max(1) && next < prompts.len() {
            let prompt = Prompt { ids: prompts[next].clone(), max_new_tokens, logprobs: None, prompt_logprobs: false };
            emitted.extend(engine.admit(&prompt, vec![(next, TokenSampler::new(SamplingParams::default(), Rng::new(0, 0)))]).1);
            next += 1;
        }
        emitted.extend(engine.step());
        let mut stopped = vec![];
        for e in emitted {
            let text = &mut texts[e.key];
            if text.stopped() {
                continue;
            }
            if let Some(token) = e.token {
                if text.push(&loaded.tokenizer, token.id).stopped {
                    stopped.push(e.key);
                }
            }
            if e.finish.is_some() {
                text.finish(&loaded.tokenizer);
            }
        }
        engine.cancel(|key| stopped.contains(key));
        if engine.is_empty() && next == prompts.len() {
            return texts.iter().map(|t| t.text().to_string()).collect();
        }
    }
}

/// Mean token cross-entropy of `documents` joined with EOS and cut into blocks of `block`
/// tokens (the last, shorter block included, so a small set is still measured), and the number
/// of tokens it averages over.
fn held_out_loss(loaded: &Loaded, documents: &[Document], block: usize) -> Result<(f64, usize)> {
    let mut ids: Vec<i64> = vec![];
    for doc in documents {
        ids.extend(loaded.encode(&doc.text)?.into_iter().map(i64::from));
        ids.extend(loaded.eos.map(i64::from));
    }
    let _guard = tch::no_grad_guard();
    let (mut sum, mut tokens) = (0.0, 0usize);
    for chunk in ids.chunks(block.max(2)).filter(|c| c.len() >= 2) {
        let input = Tensor::from_slice(chunk).view([1, -1]).to_device(loaded.device);
        sum += loaded.model.loss_sum(&input).to_kind(Kind::Double).double_value(&[]);
        tokens += chunk.len() - 1;
    }
    if tokens == 0 {
        return Err(WorkerError::TooShortForLoss);
    }
    Ok((sum / tokens as f64, tokens))
}

/// completion_eval.json and predictions.jsonl, each written beside its place and renamed in.
fn write_outputs(dir: &Path, report: &Report, lines: &[Prediction]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let summary =
        CompletionEval { positions: report.positions, candidate_lines: report.candidates, models: report.models.iter().copied().collect() };
    let json = serde_json::to_value(&summary).expect("the evaluation serialises");
    zerotune_hf::write::write_json(&dir.join(layout::COMPLETION_EVAL_FILE), &json)?;
    let path = dir.join(layout::PREDICTIONS_FILE);
    let partial = layout::partial_path(&path, false);
    let mut out = std::io::BufWriter::new(std::fs::File::create(&partial).map_err(io_err(&partial))?);
    for line in lines {
        serde_json::to_writer(&mut out, line).map_err(|e| io_err(&partial)(e.into()))?;
        out.write_all(b"\n").map_err(io_err(&partial))?;
    }
    out.flush().map_err(io_err(&partial))?;
    drop(out);
    Ok(std::fs::rename(&partial, &path).map_err(io_err(&path))?)
}
