//! What the user sees and what is logged: a progress line (loss, lr, tokens/s, ETA) on stderr, and
//! `metrics.jsonl` with one JSON object per logging step and per evaluation (HF's log_history).

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Instant;

use zerotune_hf::layout::METRICS_FILE;
use zerotune_proto::records::{EvalRecord, MetricRecord, TrainRecord};
use zerotune_proto::v1::StepReport;

use crate::error::{io_err, Result};

pub struct Progress {
    total_steps: u64,
    steps_per_epoch: u64,
    logging_steps: u64,
    metrics: std::io::BufWriter<std::fs::File>,
    metrics_path: std::path::PathBuf,
    /// Every logged record, for trainer_state.json: a resumed run's starts with the history of
    /// the checkpoint it resumed from.
    pub history: Vec<MetricRecord>,
    started: Option<(Instant, u64)>,
    tokens: u64,
    window: Vec<StepReport>,
    tty: bool,
}

impl Progress {
    /// Progress of a run; a resumed run (`append`) continues the existing metrics.jsonl.
    pub fn new(output_dir: &Path, total_steps: u64, steps_per_epoch: u64, logging_steps: u64, append: bool) -> Result<Self> {
        let metrics_path = output_dir.join(METRICS_FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(&metrics_path)
            .map_err(io_err(&metrics_path))?;
        Ok(Self {
            total_steps,
            steps_per_epoch,
            logging_steps,
            metrics: std::io::BufWriter::new(file),
            metrics_path,
            history: vec![],
            started: None,
            tokens: 0,
            window: vec![],
            tty: std::io::stderr().is_terminal(),
        })
    }

    /// Continues the history of a run resumed at `step` from a checkpoint with `log_history`.
    /// Records past `step` are dropped (ranks run ahead while a checkpoint completes, so its
    /// history can hold a step or two more): the resumed run logs those steps again.
    pub fn resume_history(&mut self, log_history: Vec<MetricRecord>, step: u64) {
        let before = log_history.into_iter().filter(|r| r.step().is_none_or(|s| s <= step));
        self.history.splice(0..0, before);
    }

    pub fn epoch(&self, step: u64) -> f64 {
        step as f64 / self.steps_per_epoch as f64
    }

    /// Tokens/s since the first step finished (start-up excluded).
    fn throughput(&self) -> Option<f64> {
        let (t0, tokens0) = self.started?;
        let secs = t0.elapsed().as_secs_f64();
        (secs > 0.0).then(|| (self.tokens - tokens0) as f64 / secs)
    }

    pub fn step(&mut self, report: StepReport) -> Result<()> {
        self.tokens += report.tokens;
        if self.started.is_none() {
            self.started = Some((Instant::now(), self.tokens));
        }
        let step = report.step;
        self.window.push(report);
        let tps = self.throughput();
        let last = self.window.last().expect("just pushed");
        let eta = tps.filter(|_| step > 1).map(|_| {
            let (t0, _) = self.started.expect("started");
            t0.elapsed().as_secs_f64() / (step - 1) as f64 * (self.total_steps - step) as f64
        });
        let line = format!(
            "step {step}/{} [{}] loss {:.4} lr {:.3e} {} ETA {}",
            self.total_steps,
            bar(step, self.total_steps, 20),
            last.loss,
            last.learning_rate,
            tps.map_or("-".into(), |t| format!("{:.0} tok/s", t)),
            eta.map_or("-".into(), format_secs),
        );
        if self.tty {
            eprint!("\r{line}\x1b[K");
        }
        if step.is_multiple_of(self.logging_steps) || step == self.total_steps {
            let n = self.window.len() as f64;
            let fp16 = last.loss_scale != 1.0;
            let record = TrainRecord {
                step,
                epoch: self.epoch(step),
                loss: self.window.iter().map(|r| r.loss).sum::<f64>() / n,
                learning_rate: last.learning_rate,
                grad_norm: Some(last.grad_norm).filter(|g| g.is_finite()),
                tokens_per_second: tps,
                loss_scale: fp16.then_some(last.loss_scale),
                skipped_steps: fp16.then(|| self.window.iter().filter(|r| r.skipped).count() as u64),
            };
            self.window.clear();
            if !self.tty {
                eprintln!("{line}");
            }
            self.record(MetricRecord::Train(record))?;
        }
        Ok(())
    }

    pub fn eval(&mut self, step: u64, loss_sum: f64, tokens: u64) -> Result<()> {
        let loss = loss_sum / tokens.max(1) as f64;
        let perplexity = loss.exp();
        if self.tty {
            eprintln!();
        }
        eprintln!("eval at step {step}: loss {loss:.4}, perplexity {perplexity:.2}");
        self.record(MetricRecord::Eval(EvalRecord { step, epoch: self.epoch(step), eval_loss: loss, perplexity }))
    }

    pub fn note(&self, message: &str) {
        if self.tty {
            eprintln!();
        }
        eprintln!("{message}");
    }

    fn record(&mut self, record: MetricRecord) -> Result<()> {
        let io = io_err(&self.metrics_path);
        serde_json::to_writer(&mut self.metrics, &record).expect("a record serialises");
        self.metrics.write_all(b"\n").and_then(|_| self.metrics.flush()).map_err(io)?;
        self.history.push(record);
        Ok(())
    }

    pub fn last_eval(&self) -> Option<&EvalRecord> {
        self.history.iter().rev().find_map(MetricRecord::as_eval)
    }
}

fn bar(done: u64, total: u64, width: usize) -> String {
    let filled = (done as usize * width) / total.max(1) as usize;
    format!("{}{}", "#".repeat(filled), ".".repeat(width - filled))
}

fn format_secs(secs: f64) -> String {
    let s = secs.round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps(history: &[MetricRecord]) -> Vec<u64> {
        history.iter().map(|r| r.step().unwrap()).collect()
    }

    fn record(json: serde_json::Value) -> MetricRecord {
        serde_json::from_value(json).unwrap()
    }

    /// A run resumed at step 4 keeps the records up to 4 (an evaluation at 4 included), drops the
    /// later ones the checkpoint may hold, and appends its own.
    #[test]
    fn a_resumed_history_continues_the_checkpoint_s() {
        let dir = tempfile::tempdir().unwrap();
        let mut progress = Progress::new(dir.path(), 8, 8, 1, true).unwrap();
        let train = |step| serde_json::json!({"step": step, "epoch": 0.1, "loss": 1.0, "learning_rate": 1e-3, "grad_norm": 1.0, "tokens_per_second": null});
        let mut saved: Vec<MetricRecord> = (1..=6).map(|step| record(train(step))).collect();
        saved.insert(4, record(serde_json::json!({"step": 4, "epoch": 0.1, "eval_loss": 2.0, "perplexity": 7.4})));
        progress.resume_history(saved, 4);
        progress.step(StepReport { step: 5, loss: 0.5, learning_rate: 1e-3, tokens: 10, loss_scale: 1.0, ..Default::default() }).unwrap();
        assert_eq!(steps(&progress.history), [1, 2, 3, 4, 4, 5]);
        assert!(matches!(progress.history[4], MetricRecord::Eval(EvalRecord { eval_loss: 2.0, .. })));
        assert!(matches!(progress.history[5], MetricRecord::Train(TrainRecord { loss: 0.5, .. })));
        let written = std::fs::read_to_string(dir.path().join(METRICS_FILE)).unwrap();
        assert_eq!(serde_json::from_str::<MetricRecord>(written.trim()).unwrap(), progress.history[5], "metrics.jsonl holds the record");
    }
}
