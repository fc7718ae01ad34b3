//! The job plan a worker receives at registration: plain, validated data (the coordinator has
//! already resolved flags, ds_config.json and "auto" values), serialised as JSON on the wire.

use serde::{Deserialize, Serialize};

/// Everything a worker needs to train, besides the batches themselves. The coordinator sets every
/// field: none has a default here, so a worker never runs on a value the coordinator did not choose.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerPlan {
    /// Where the initial weights come from.
    pub model: ModelSource,
    /// Parameter / activation precision on the device.
    pub precision: Precision,
    /// AdamW hyper-parameters (torch.optim.AdamW semantics).
    pub optimizer: AdamW,
    /// Learning-rate schedule over the whole run.
    pub schedule: Schedule,
    /// Global-norm gradient clipping threshold; 0 disables clipping.
    pub max_grad_norm: f64,
    /// Dynamic loss scaling, used only with `Precision::Fp16`.
    pub loss_scaler: LossScaler,
    /// Seed for initialisation and dropout.
    pub seed: u64,
    /// Micro-batches per optimizer step (for loss averaging).
    pub gradient_accumulation_steps: u32,
    /// ZeRO stage: 0 replicates the optimizer on every rank; 1 and 2 partition it (2 also
    /// reduce-scatters gradients every micro-step, so no rank holds the full gradient).
    pub zero_stage: u8,
    /// Stage 2 reduce-scatters gradients in buckets of this many elements, all ranks' blocks
    /// together, as DeepSpeed counts (ds_config `zero_optimization.reduce_bucket_size`), so no
    /// full-size buffer is needed.
    pub reduce_bucket_size: usize,
    /// Run AdamW on fp32 master weights and moments in host memory (ZeRO-Offload); otherwise
    /// with torch ops on the compute device.
    pub offload_optimizer: bool,
    /// The offloaded step moves gradients down and weights up in tiles of this many elements,
    /// overlapping each tile's transfers with the host's work on its neighbour.
    pub offload_tile: usize,
    /// Recompute each block's activations in the backward pass instead of keeping them (HF
    /// `--gradient_checkpointing`, ds_config `activation_checkpointing`): activation memory of one
    /// block plus one (B, T, C) input per block, for a second forward pass of compute.
    pub gradient_checkpointing: bool,
    /// Continue from this checkpoint instead of the model's initial weights.
    pub resume: Option<Resume>,
    /// How ranks talk to each other.
    pub collectives: Collectives,
    /// --heartbeat_timeout in milliseconds: the coordinator fails a rank silent for this long,
    /// and a rank whose coordinator has not answered for this long exits.
    pub heartbeat_timeout_ms: u64,
}

impl WorkerPlan {
    /// How often a rank beats: six times per timeout, between 0.25 and 5 seconds.
    pub fn heartbeat_interval(&self) -> std::time::Duration {
        heartbeat_interval(std::time::Duration::from_millis(self.heartbeat_timeout_ms))
    }
}

/// Six beats per `timeout`, between 0.25 and 5 seconds apart.
pub fn heartbeat_interval(timeout: std::time::Duration) -> std::time::Duration {
    (timeout / 6).clamp(std::time::Duration::from_millis(250), std::time::Duration::from_secs(5))
}

/// The default --heartbeat_timeout.
pub const DEFAULT_HEARTBEAT_TIMEOUT_S: u64 = 30;

/// The collectives backend of a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Collectives {
    /// One rank, nothing to exchange.
    None,
    /// CPU ranks: a TCP ring.
    Ring,
    /// GPU ranks: NCCL (also for a single GPU launched with --num_gpus, as DeepSpeed does).
    Nccl,
}

/// ZeRO partitions are a multiple of this many elements (256 bytes of 16-bit values).
pub const PARTITION_ALIGN: usize = 128;

/// Elements per rank's ZeRO partition of `numel` elements over `world` ranks: equal, aligned, at
/// least one alignment unit (the padded flat buffer is `world` x this). The worker shards by it;
/// the memory planner counts by it.
pub fn zero_partition(numel: usize, world: usize) -> usize {
    numel.div_ceil(world).div_ceil(PARTITION_ALIGN).max(1) * PARTITION_ALIGN
}

/// DeepSpeed's default `reduce_bucket_size`.
pub const DEFAULT_REDUCE_BUCKET: usize = 500_000_000;

/// Elements per tile of the offloaded step: 16 MB each way at 16 bits, a few milliseconds of host
/// work, so the per-tile synchronisation is noise and the first and last transfers are short.
pub const DEFAULT_OFFLOAD_TILE: usize = 1 << 23;

/// A complete checkpoint to resume from: `dir` is `checkpoint-<step>/`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Resume {
    pub dir: String,
    pub step: u64,
}

/// Initial weights: a checkpoint directory, or a fresh model from a config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ModelSource {
    /// An HF-layout CodeGen directory (config.json + weights) readable by the worker.
    Pretrained { dir: String },
    /// Random initialisation (HF `_init_weights`) of this config.json content.
    Scratch { config: serde_json::Value },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    Fp32,
    Bf16,
    Fp16,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    Linear,
    Cosine,
    Constant,
    ConstantWithWarmup,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

/// DeepSpeed's dynamic loss scaler settings (`fp16` block of ds_config.json).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    /// Initial scale is 2^initial_scale_power.
    pub initial_scale_power: u32,
    /// Clean steps before the scale doubles.
    pub window: u32,
    /// Overflows tolerated (per window) before the scale halves.
    pub hysteresis: u32,
    pub min_scale: f64,
    /// Stop the run when an overflow happens at the minimum scale.
    pub abort_at_min_scale: bool,
}

impl Default for LossScaler {
    fn default() -> Self {
        Self { initial_scale_power: 16, window: 1000, hysteresis: 2, min_scale: 1.0, abort_at_min_scale: true }
    }
}
