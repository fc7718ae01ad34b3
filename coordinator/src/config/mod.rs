//! `coordinator train` flags (run_clm.py / HF TrainingArguments names, `args.rs`) plus
//! `--deepspeed ds_config.json` (`ds_config.rs`), resolved into one validated `TrainPlan` the way
//! HF Trainer resolves "auto", with the ranks' placement (`placement.rs`). Only the plan reaches
//! library code; every error names the flag or config key at fault. A plan is made to train, or
//! only to be estimated (`Purpose`), which needs no data, output dir, tokenizer, GPU or hostfile.

mod args;
mod ds_config;
mod ds_keys;
mod placement;
mod resolve;

pub use args::{Bytes, DataArgs, DeviceSpec, GpuModel, LaunchArgs, LauncherKind, ModelArgs, ResumeFrom, TrainArgs, TrainingArgs};
pub use ds_config::{Auto, DsConfig};
pub use placement::Launcher;
pub use resolve::{config_by_name, default_cache_dir, sibling_binary};
pub use zerotune_proto::records::ZeroSettings;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use zerotune_data::{Filter, Hygiene};
use zerotune_hf::manifest::NonFinite;
use zerotune_hf::ModelConfig;
use zerotune_proto::plan::{AdamW, LossScaler, Precision, ScheduleKind};

use crate::error::{CoordinatorError, Result};
use crate::hosts::Placement;

/// Where the initial weights come from.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelChoice {
    Pretrained(PathBuf),
    Scratch(Box<ModelConfig>),
}

#[derive(Clone, Debug, PartialEq)]
pub enum TokenizerChoice {
    Dir(PathBuf),
    Train { vocab_size: usize },
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Warmup {
    Steps(u64),
    Ratio(f64),
}

/// What a plan is made for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// A run: every flag it needs, checked.
    Train,
    /// Only the memory plan (`coordinator estimate`), from any machine: the plan is never run, so
    /// the paths it does not need (--train_file, --output_dir, --worker_bin, a from-scratch
    /// model's tokenizer) may be absent and are left empty; `--device auto` means GPU ranks when
    /// --num_gpus or --gpu_model is given; --num_nodes needs no hostfile.
    Estimate,
}

/// The device every rank computes on (`--device auto` resolved).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    /// GPU ranks; `Some(n)`: the one rank runs on GPU n.
    Cuda(Option<usize>),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(None) => f.write_str("cuda"),
            Self::Cuda(Some(n)) => write!(f, "cuda:{n}"),
        }
    }
}

/// The documents and their token blocks.
#[derive(Clone, Debug)]
pub struct DataPlan {
    pub train_file: PathBuf,
    pub validation_file: Option<PathBuf>,
    pub text_column: String,
    pub validation_split_percentage: u32,
    /// `--block_size` as asked; `None`: the model's default (`ModelConfig::default_block_size`),
    /// which `prepare` resolves into `PreparedRun::block_size`. Never filled in later.
    pub block_size: Option<usize>,
    pub filter: Filter,
    /// Secrets, dedup, leakage and document size settings of the data pipeline.
    pub hygiene: Hygiene,
    pub cache_dir: PathBuf,
}

/// Per-rank batch sizes (the world is the number of placements).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchPlan {
    pub micro: usize,
    pub eval: usize,
    pub accumulation: usize,
}

/// The optimization: length, schedule, optimizer, precision, seed.
#[derive(Clone, Debug)]
pub struct TrainingPlan {
    pub epochs: f64,
    pub max_steps: Option<u64>,
    pub warmup: Warmup,
    pub schedule: ScheduleKind,
    /// A ds_config `total_num_steps` that the computed total must equal.
    pub ds_total_steps: Option<u64>,
    pub optimizer: AdamW,
    pub max_grad_norm: f64,
    pub precision: Precision,
    pub loss_scaler: LossScaler,
    pub seed: u64,
    /// Recompute each block's activations in the backward pass (--gradient_checkpointing or a
    /// ds_config `activation_checkpointing` section).
    pub gradient_checkpointing: bool,
    /// Elements per tile of the offloaded optimizer step (--offload_tile_elements).
    pub offload_tile: usize,
}

/// What the run writes and when: logs, evaluations, checkpoints.
#[derive(Clone, Debug)]
pub struct OutputPlan {
    pub dir: PathBuf,
    pub overwrite: bool,
    pub logging_steps: u64,
    pub do_eval: bool,
    pub eval_steps: Option<u64>,
    /// Positions of the completion evaluation at the end (0: none).
    pub completion_eval_positions: usize,
    pub save_steps: Option<u64>,
    pub save_total_limit: Option<usize>,
    pub resume_from: Option<ResumeFrom>,
    /// Resume although the block size or global batch changed (--ignore_data_skip).
    pub ignore_data_skip: bool,
    /// Weights holding NaN or infinite values: refused, or loaded with a warning (--allow_nonfinite).
    pub nonfinite: NonFinite,
}

/// Where the ranks run, how they are started, and how long they may stay silent.
#[derive(Clone, Debug)]
pub struct LaunchPlan {
    pub device: Device,
    pub worker_bin: PathBuf,
    /// Where each rank runs (global rank order).
    pub placements: Vec<Placement>,
    pub launcher: Launcher,
    /// `--num_gpus` was given: GPU ranks talk over NCCL even when there is one.
    pub num_gpus_given: bool,
    pub master_addr: Option<String>,
    pub master_port: u16,
    pub tls: Option<Tls>,
    pub ddp_timeout: Duration,
    pub heartbeat_timeout: Duration,
    pub max_restarts: u32,
    /// --gpu_memory: bytes per device to plan for instead of the queried ones.
    pub gpu_memory: Option<u64>,
    /// --gpu_model: the GPU to plan for (memory, compute capability) instead of the queried one.
    pub gpu_model: Option<GpuModel>,
}

/// The validated run.
#[derive(Clone, Debug)]
pub struct TrainPlan {
    /// A run, or only its memory plan (whose unneeded paths are empty).
    pub purpose: Purpose,
    pub model: ModelChoice,
    pub tokenizer: TokenizerChoice,
    pub data: DataPlan,
    pub batch: BatchPlan,
    pub training: TrainingPlan,
    pub zero: ZeroSettings,
    pub output: OutputPlan,
    pub launch: LaunchPlan,
}

/// The coordinator's TLS identity and the CA its workers trust, as PEM.
#[derive(Clone, Debug)]
pub struct Tls {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    pub ca: Vec<u8>,
}

impl TrainPlan {
    /// Ranks in the job.
    pub fn world_size(&self) -> usize {
        self.launch.placements.len()
    }

    /// Sequences in one optimizer step, over all ranks.
    pub fn global_batch(&self) -> usize {
        self.batch.micro * self.batch.accumulation * self.world_size()
    }

    /// The plan to continue on the ranks not on `lost` hosts (renumbered in order), with the same
    /// global batch, so the same data in the same steps: gradient accumulation grows as the world
    /// shrinks. Refused, naming every factor, when the batch does not divide among what is left.
    pub fn without_hosts(&self, lost: &BTreeSet<String>) -> Result<TrainPlan> {
        let placements: Vec<Placement> = self
            .launch
            .placements
            .iter()
            .filter(|p| !lost.contains(&p.host))
            .enumerate()
            .map(|(rank, p)| Placement { rank, ..p.clone() })
            .collect();
        let (world, global, micro) = (placements.len(), self.global_batch(), self.batch.micro);
        let lost_list = lost.iter().cloned().collect::<Vec<_>>().join(", ");
        if world == 0 {
            return Err(CoordinatorError::NoRankLeft { lost: lost_list });
        }
        if global % (micro * world) != 0 {
            let (accumulation, old_world) = (self.batch.accumulation, self.world_size());
            return Err(CoordinatorError::BatchDoesNotFit { lost: lost_list, world, global, micro, accumulation, old_world });
        }
        let mut fewer = self.clone();
        fewer.batch.accumulation = global / (micro * world);
        fewer.launch.placements = placements;
        Ok(fewer)
    }

    /// Warmup in steps for a run of `total` steps (HF: ceil(total * warmup_ratio)).
    pub fn warmup_steps(&self, total: u64) -> u64 {
        match self.training.warmup {
            Warmup::Steps(n) => n,
            Warmup::Ratio(r) => (total as f64 * r).ceil() as u64,
        }
    }
}

#[cfg(test)]
mod tests;
