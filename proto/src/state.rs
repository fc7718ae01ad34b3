//! The JSON files of a checkpoint that both sides read: `trainer_state.json` (HF Trainer's keys,
//! plus where the sampler stands), written by the coordinator, and `optimizer/layout.json` (how
//! the ranks' optimizer slices join into the whole state), written by rank 0.

use serde::{Deserialize, Serialize};

use crate::plan::LossScaler;

/// `checkpoint-<step>/trainer_state.json`.
pub const TRAINER_STATE_FILE: &str = "trainer_state.json";
/// `checkpoint-<step>/optimizer/`: the optimizer slices and their layout.
pub const OPTIMIZER_DIR: &str = "optimizer";
/// The layout's name within `OPTIMIZER_DIR`.
pub const LAYOUT_FILE: &str = "layout.json";

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
    /// HF's log history: one record per logged step (loss, learning rate, grad norm, ...) and per
    /// evaluation (eval_loss, perplexity), each with its `step` and `epoch`, from the run's first
    /// step on (a resumed run carries the history it resumed from).
    pub log_history: Vec<serde_json::Value>,
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
