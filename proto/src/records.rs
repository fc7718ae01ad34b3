//! The run directory's records, typed once for every writer and reader: `run.json` (what the run
//! was), `metrics.jsonl` and trainer_state.json's `log_history` (one record per logging step and
//! per evaluation, HF's keys), `completion_eval.json` (the evaluation's scores) and
//! `predictions.jsonl` (each prediction). Field order is the order on disk. Their file names are
//! `zerotune_hf::layout`'s.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::plan::{Precision, WorkerPlan};

/// The ZeRO settings of a run (ds_config's `zero_optimization`, resolved).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZeroSettings {
    pub stage: u8,
    pub offload_optimizer: bool,
    /// Elements per rank in one stage-2 gradient reduce-scatter.
    pub reduce_bucket_size: usize,
}

/// `run.json`: the resolved run, written once its data is prepared.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// The model directory trained from, or "from scratch".
    pub model_name_or_path: String,
    pub num_parameters: u64,
    pub precision: Precision,
    pub learning_rate: f64,
    pub train_file: PathBuf,
    pub validation_file: Option<PathBuf>,
    pub token_cache: PathBuf,
    pub train_blocks: usize,
    pub validation_blocks: usize,
    pub block_size: usize,
    pub world_size: usize,
    pub per_device_train_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub total_steps: u64,
    pub device: String,
    pub zero_optimization: ZeroSettings,
    /// The model's HF config.json.
    pub model_config: serde_json::Value,
    pub worker_plan: WorkerPlan,
}

/// One logging step's record: the mean loss over the steps since the last one, the rest of the
/// step it was logged at.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainRecord {
    pub step: u64,
    pub epoch: f64,
    pub loss: f64,
    pub learning_rate: f64,
    /// Before clipping; null when it was not finite.
    pub grad_norm: Option<f64>,
    /// Since the first step finished; null before.
    pub tokens_per_second: Option<f64>,
    /// fp16 only: the loss scale after the step, and the steps skipped on overflow in the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped_steps: Option<u64>,
}

/// One evaluation's record: mean token loss over the validation blocks and its exp.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    pub step: u64,
    pub epoch: f64,
    pub eval_loss: f64,
    pub perplexity: f64,
}

/// A line of metrics.jsonl and an entry of `log_history`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MetricRecord {
    /// Tried first: only it has `eval_loss`.
    Eval(EvalRecord),
    Train(TrainRecord),
    /// A record of another shape (another tool's, or an older zerotune's), kept as it was.
    Other(serde_json::Value),
}

impl MetricRecord {
    /// The step it was logged at, if it says.
    pub fn step(&self) -> Option<u64> {
        match self {
            Self::Eval(r) => Some(r.step),
            Self::Train(r) => Some(r.step),
            Self::Other(v) => v.get("step")?.as_u64(),
        }
    }

    pub fn as_train(&self) -> Option<&TrainRecord> {
        match self {
            Self::Train(r) => Some(r),
            _ => None,
        }
    }

    pub fn as_eval(&self) -> Option<&EvalRecord> {
        match self {
            Self::Eval(r) => Some(r),
            _ => None,
        }
    }
}

/// A model's scores in `completion_eval.json`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    /// Mean exact match of the predicted line, 0 to 100.
    pub exact_match: f64,
    /// Mean edit similarity of the predicted line, 0 to 100.
    pub edit_similarity: f64,
    /// Held-out mean token loss, and its exp.
    pub loss: f64,
    pub perplexity: f64,
}

/// Which model of an evaluation a score or prediction is: the starting one or the fine-tuned one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvalModel {
    Base,
    FineTuned,
}

impl EvalModel {
    /// Its name in the files and the tables: `base`, `fine_tuned`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Base => "base",
            Self::FineTuned => "fine_tuned",
        }
    }
}

/// `completion_eval.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompletionEval {
    /// Positions predicted (the same for every model).
    pub positions: usize,
    /// Lines that could have been drawn.
    pub candidate_lines: usize,
    pub models: BTreeMap<EvalModel, Scores>,
}

/// A line of `predictions.jsonl`: one model's completion at one position.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    pub model: EvalModel,
    /// The document's url, or `document N`.
    pub url: String,
    /// 1-based line of the predicted line in its document.
    pub line: usize,
    /// The last lines before the position (at most 3), for the report.
    pub prompt_tail: String,
    pub target: String,
    pub prediction: String,
    /// 0 or 100.
    pub exact_match: f64,
    /// 0 to 100.
    pub edit_similarity: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_records_keep_their_shape_on_disk() {
        let train = r#"{"step":3,"epoch":0.5,"loss":2.25,"learning_rate":0.001,"grad_norm":1.5,"tokens_per_second":null}"#;
        let fp16 = r#"{"step":4,"epoch":0.5,"loss":2.0,"learning_rate":0.001,"grad_norm":null,"tokens_per_second":10.0,"loss_scale":1024.0,"skipped_steps":1}"#;
        let eval = r#"{"step":4,"epoch":0.5,"eval_loss":2.5,"perplexity":12.18}"#;
        let other = r#"{"step":5,"train_runtime":3.5}"#;
        for line in [train, fp16, eval, other] {
            let record: MetricRecord = serde_json::from_str(line).unwrap();
            assert_eq!(serde_json::to_string(&record).unwrap(), line, "round trip");
        }
        let read = |line| serde_json::from_str::<MetricRecord>(line).unwrap();
        assert!(matches!(read(train), MetricRecord::Train(TrainRecord { step: 3, grad_norm: Some(_), loss_scale: None, .. })));
        assert!(matches!(read(eval), MetricRecord::Eval(EvalRecord { step: 4, .. })));
        assert_eq!((read(other).step(), read(fp16).step()), (Some(5), Some(4)));
    }

    #[test]
    fn evaluation_files_keep_their_names() {
        let eval = CompletionEval {
            positions: 2,
            candidate_lines: 9,
            models: [(EvalModel::FineTuned, Scores { exact_match: 0.5, edit_similarity: 75.0, loss: 1.0, perplexity: 2.5 })].into(),
        };
        let json = serde_json::to_string(&eval).unwrap();
        assert!(json.starts_with(r#"{"positions":2,"candidate_lines":9,"models":{"fine_tuned":{"exact_match":0.5,"#), "{json}");
        assert_eq!(serde_json::from_str::<CompletionEval>(&json).unwrap(), eval);
        assert_eq!(serde_json::to_value(EvalModel::Base).unwrap(), "base");
    }
}
