//! The JSON files of a checkpoint that both sides read: `trainer_state.json` (HF Trainer's keys,
//! plus where the sampler stands), written by the coordinator, and `optimizer/layout.json` (how
//! the ranks' optimizer slices join into the whole state), written by rank 0.

use serde::{Deserialize, Serialize};

use crate::plan::LossScaler;
use crate::records::MetricRecord;

/// The names of the checkpoint's files (one home: `zerotune_hf::layout`).
pub use zerotune_hf::layout::{LAYOUT_FILE, OPTIMIZER_DIR, TRAINER_STATE_FILE};

/// `trainer_state.json`: HF Trainer's keys, so HF tools read it, and what an exact resume needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done: the checkpoint's step.
    pub global_step: u64,
    /// Epochs done, fractional.
    pub epoch: f64,
    /// Optimizer steps of the whole run.
    pub max_steps: u64,
    /// Blocks per micro-batch on each rank (`--per_device_train_batch_size`).
    pub train_batch_size: usize,
    /// Micro-batches per optimizer step on each rank.
    pub gradient_accumulation_steps: usize,
    /// Ranks that wrote the checkpoint.
    pub world_size: u32,
    /// Tokens per training block (absent in checkpoints from before it was recorded).
    #[serde(default)]
    pub block_size: Option<usize>,
    /// Where the data order stands.
    pub sampler: SamplerPosition,
    /// The steps of the checkpoints this run saved, in save order, this one last; a resumed run
    /// carries those of the run it resumed from (empty in checkpoints from before it was recorded).
    /// Checkpoint rotation deletes in this order.
    #[serde(default)]
    pub checkpoints: Vec<u64>,
    /// The data the run trained on, so a resume onto other data is caught (absent in checkpoints
    /// from before it was recorded).
    #[serde(default)]
    pub data: Option<DataIdentity>,
    /// HF's log history: one record per logged step (loss, learning rate, grad norm, ...) and per
    /// evaluation (eval_loss, perplexity), each with its `step` and `epoch`, from the run's first
    /// step on (a resumed run carries the history it resumed from).
    pub log_history: Vec<MetricRecord>,
}

/// What identifies a run's data: a hash of the documents after hygiene (both splits, and the
/// hygiene settings), and their counts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataIdentity {
    /// blake3 of the hygiene settings and every document of both splits, hex.
    pub documents_hash: String,
    pub train_documents: usize,
    pub validation_documents: usize,
    pub train_blocks: usize,
    pub validation_blocks: usize,
}

impl DataIdentity {
    /// What differs in `self` (the run's) from `saved` (a checkpoint's), for a message: the counts
    /// that changed, or that only the content did. None when they are the same data.
    pub fn changes_from(&self, saved: &DataIdentity) -> Option<String> {
        if self == saved {
            return None;
        }
        let counts = [
            ("training documents", self.train_documents, saved.train_documents),
            ("validation documents", self.validation_documents, saved.validation_documents),
            ("training blocks", self.train_blocks, saved.train_blocks),
            ("validation blocks", self.validation_blocks, saved.validation_blocks),
        ];
        let changed: Vec<String> = counts
            .iter()
            .filter(|(_, now, then)| now != then)
            .map(|(what, now, then)| format!("{now} {what} where it has {then}"))
            .collect();
        Some(match changed.is_empty() {
            true => format!(
                "the documents differ from the checkpoint's (as many of each, other content: hash {} where it has {})",
                &self.documents_hash[..12.min(self.documents_hash.len())],
                &saved.documents_hash[..12.min(saved.documents_hash.len())]
            ),
            false => format!("the data differ from the checkpoint's: {}", changed.join(", ")),
        })
    }
}

/// The sampler's position at a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerPosition {
    /// Seed of the per-epoch shuffle.
    pub seed: u64,
    /// Whole epochs done.
    pub epoch: u64,
    /// Optimizer steps done in the current epoch.
    pub step_in_epoch: u64,
    /// Training blocks in the token cache.
    pub blocks: usize,
}

/// `optimizer/layout.json`: the rank slices `rank-XXXXX-of-XXXXX.safetensors` (fp32 `master`,
/// `exp_avg`, `exp_avg_sq` over one partition of the flat parameters) concatenate in rank order
/// to the whole state, so any world size can resume from them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptimizerLayout {
    /// Ranks that wrote the slices.
    pub world_size: usize,
    /// Parameters of the model (the flat buffer without ZeRO's padding).
    pub numel: usize,
    /// Each rank's `[start, end)` of the flat parameters, in rank order.
    pub partitions: Vec<[usize; 2]>,
    /// AdamW steps taken (fp16 steps skipped for overflow not counted).
    pub adam_steps: u64,
    /// The dynamic loss scaler (fp16 runs only).
    pub loss_scaler: Option<LossScalerState>,
    /// Where each parameter lies in the flat buffer.
    pub slots: Vec<LayoutSlot>,
}

/// One parameter in the flat buffer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayoutSlot {
    /// HF parameter name.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its first element's index in the flat buffer.
    pub offset: usize,
}

/// DeepSpeed's dynamic loss scaler between steps.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScalerState {
    /// The scale the next step's loss is multiplied by.
    pub scale: f64,
    /// The settings it runs with.
    pub settings: LossScaler,
    /// Overflows still tolerated before the scale halves.
    pub hysteresis_left: u32,
    /// Steps seen.
    pub iteration: i64,
    /// The iteration of the last overflow (-1: none).
    pub last_overflow_iteration: i64,
    /// Steps skipped for overflow so far.
    pub skipped: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(train_documents: usize, train_blocks: usize, hash: &str) -> DataIdentity {
        DataIdentity { documents_hash: hash.into(), train_documents, validation_documents: 2, train_blocks, validation_blocks: 5 }
    }

    #[test]
    fn a_change_of_data_names_the_counts_that_changed_or_the_content() {
        assert_eq!(data(31, 100, "ab").changes_from(&data(31, 100, "ab")), None);
        let counts = data(8, 40, "cd").changes_from(&data(31, 100, "ab")).unwrap();
        assert_eq!(
            counts,
            "the data differ from the checkpoint's: 8 training documents where it has 31, 40 training blocks where it has 100"
        );
        let content = data(31, 100, "cd").changes_from(&data(31, 100, "ab")).unwrap();
        assert!(content.contains("other content: hash cd where it has ab"), "{content}");
    }
}
