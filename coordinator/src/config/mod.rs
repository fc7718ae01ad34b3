//! `coordinator train` flags (run_clm.py / HF TrainingArguments names, `args.rs`) plus
//! `--deepspeed ds_config.json` (`ds_config.rs`), resolved into one validated `TrainPlan` the way
//! HF Trainer resolves "auto", with the ranks' placement (`placement.rs`). Only the plan reaches
//! library code; every error names the flag or config key at fault. A plan is made to train, or
//! only to be estimated (`Purpose`), which needs no data, output dir, tokenizer, GPU or hostfile.

mod args;
mod ds_config;
mod ds_keys;
mod placement;

pub use args::{Bytes, DataArgs, DeviceSpec, GpuModel, LaunchArgs, LauncherKind, ModelArgs, ResumeFrom, TrainArgs, TrainingArgs};
pub use ds_config::{Auto, DsConfig};
pub use placement::Launcher;
pub use zerotune_proto::records::ZeroSettings;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use zerotune_data::{Filter, Hygiene};
use zerotune_hf::manifest::NonFinite;
use zerotune_hf::CodeGenConfig;
use zerotune_proto::plan::{AdamW, LossScaler, Precision, ScheduleKind, DEFAULT_REDUCE_BUCKET};

use crate::error::{os_err, CoordinatorError, Result};
use crate::hosts::Placement;

/// Where the initial weights come from.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelChoice {
    Pretrained(PathBuf),
    Scratch(Box<CodeGenConfig>),
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

impl Device {
    /// What a worker is told: each GPU rank sees its one GPU (CUDA_VISIBLE_DEVICES) as `cuda`.
    pub fn worker_flag(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Cuda(_) => "cuda",
        }
    }
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
    /// `--block_size` as asked; `None`: the model's default (`CodeGenConfig::default_block_size`),
    /// which `prepare` resolves into `Prepared::block_size`. Never filled in later.
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

/// A path flag's value, refused naming `flag` and `what` it is when absent; an estimate does
/// without (an empty path, never read).
fn needed(value: &Option<PathBuf>, purpose: Purpose, flag: &'static str, what: &'static str) -> Result<PathBuf> {
    match (value, purpose) {
        (Some(path), _) => Ok(path.clone()),
        (None, Purpose::Estimate) => Ok(PathBuf::new()),
        (None, Purpose::Train) => Err(CoordinatorError::Missing { flag, what }),
    }
}

impl DataArgs {
    /// The data section of a plan (`block_size` as given).
    pub fn plan(&self) -> Result<DataPlan> {
        self.plan_for(Purpose::Train)
    }

    /// The same; an estimate needs no --train_file (its block size is --block_size, or the
    /// model's).
    pub fn plan_for(&self, purpose: Purpose) -> Result<DataPlan> {
        let train_file = needed(&self.train_file, purpose, "--train_file", "the training data (.jsonl, .csv, .txt or a directory)")?;
        // Only read without --validation_file, as in HF run_clm.
        let percent = self.validation_split_percentage;
        if self.validation_file.is_none() && percent > 100 {
            let reason = "must be in [0, 100] (the percent of documents held out)";
            return Err(CoordinatorError::flag("--validation_split_percentage", percent, reason));
        }
        Ok(DataPlan {
            train_file,
            validation_file: self.validation_file.clone(),
            text_column: self.source.text_column_name.clone(),
            validation_split_percentage: self.validation_split_percentage,
            block_size: self.block_size,
            filter: self.source.filter()?,
            hygiene: self.hygiene.hygiene()?,
            cache_dir: self.cache_dir.clone().unwrap_or_else(default_cache_dir),
        })
    }
}

impl TrainPlan {
    /// Validates flags and the DeepSpeed config into a plan to train.
    pub fn resolve(args: &TrainArgs) -> Result<Self> {
        Self::resolve_for(args, Purpose::Train)
    }

    /// Validates flags and the DeepSpeed config into a plan for `purpose`.
    pub fn resolve_for(args: &TrainArgs, purpose: Purpose) -> Result<Self> {
        let (t, l) = (&args.training, &args.launch);
        if !t.do_train {
            return Err(CoordinatorError::flags(
                &["--do_train"],
                "nothing to do: pass --do_train (evaluation-only runs are not supported yet)",
            ));
        }
        check_numbers(t)?;
        let (model, tokenizer) = model_and_tokenizer(&args.model, purpose)?;
        let device = resolve_device(l, purpose);
        let (placements, launcher) = placement::placements_and_launcher(l, device, purpose)?;
        let estimate = purpose == Purpose::Estimate;
        let output_dir = needed(&t.output_dir, purpose, "--output_dir", "where the run writes its checkpoints and model")?;
        let gpu_memory = planned_memory(l, device)?;
        let warmup = if t.warmup_steps > 0 { Warmup::Steps(t.warmup_steps) } else { Warmup::Ratio(t.warmup_ratio) };
        for (name, value) in [
            ("--per_device_train_batch_size", t.per_device_train_batch_size),
            ("--per_device_eval_batch_size", t.per_device_eval_batch_size),
            ("--gradient_accumulation_steps", t.gradient_accumulation_steps),
        ] {
            if value == 0 {
                return Err(CoordinatorError::flag(name, value, "must be at least 1"));
            }
        }
        let mut plan = Self {
            purpose,
            model,
            tokenizer,
            data: args.data.plan_for(purpose)?,
            batch: BatchPlan {
                micro: t.per_device_train_batch_size,
                eval: t.per_device_eval_batch_size,
                accumulation: t.gradient_accumulation_steps,
            },
            training: TrainingPlan {
                epochs: t.num_train_epochs,
                max_steps: (t.max_steps > 0).then_some(t.max_steps as u64),
                warmup,
                schedule: t.lr_scheduler_type,
                ds_total_steps: None,
                optimizer: AdamW {
                    lr: t.learning_rate,
                    beta1: t.adam_beta1,
                    beta2: t.adam_beta2,
                    eps: t.adam_epsilon,
                    weight_decay: t.weight_decay,
                },
                max_grad_norm: t.max_grad_norm,
                precision: Precision::Fp32,
                loss_scaler: LossScaler::default(),
                seed: t.seed,
                gradient_checkpointing: t.gradient_checkpointing,
                offload_tile: t.offload_tile_elements.max(1),
            },
            // Without a ds_config: ranks keep whole optimizers, and a CPU rank's optimizer is
            // already in host memory, so it runs the host kernel.
            zero: ZeroSettings { stage: 0, offload_optimizer: device == Device::Cpu, reduce_bucket_size: DEFAULT_REDUCE_BUCKET },
            output: OutputPlan {
                dir: output_dir,
                overwrite: t.overwrite_output_dir,
                logging_steps: t.logging_steps.max(1),
                do_eval: t.do_eval,
                eval_steps: t.eval_steps.filter(|&n| n > 0 && t.do_eval),
                completion_eval_positions: if t.do_eval { t.completion_eval_positions } else { 0 },
                save_steps: (t.save_steps > 0).then_some(t.save_steps),
                save_total_limit: t.save_total_limit,
                resume_from: t.resume_from_checkpoint.clone(),
                ignore_data_skip: t.ignore_data_skip,
                nonfinite: if t.allow_nonfinite { NonFinite::Allow } else { NonFinite::Refuse },
            },
            launch: LaunchPlan {
                device,
                worker_bin: match &l.worker_bin {
                    Some(path) => path.clone(),
                    None if estimate => PathBuf::new(),
                    None => sibling_binary("worker")?,
                },
                placements,
                launcher,
                num_gpus_given: l.num_gpus.is_some() || (device != Device::Cpu && (l.hostfile.is_some() || l.include.is_some())),
                master_addr: l.master_addr.clone(),
                master_port: l.master_port,
                tls: if estimate { None } else { placement::tls(l)? },
                ddp_timeout: Duration::from_secs(l.ddp_timeout.max(1)),
                heartbeat_timeout: Duration::from_secs(l.heartbeat_timeout.max(1)),
                max_restarts: l.max_restarts,
                gpu_memory,
                gpu_model: l.gpu_model,
            },
        };
        let (fp16, bf16) = (t.fp16.unwrap_or(false), t.bf16.unwrap_or(false));
        if let Some(path) = &t.deepspeed {
            DsConfig::read(path)?.apply(&mut plan, args, path)?;
        } else {
            plan.training.precision = precision(fp16, bf16, t.bf16.is_none() && device != Device::Cpu)?;
        }
        if plan.training.precision == Precision::Fp16 && device == Device::Cpu {
            return Err(CoordinatorError::flags(
                &["--fp16", "--device"],
                "--fp16 needs a GPU (--device cuda); on CPU train in fp32 (the default) or --bf16",
            ));
        }
        Ok(plan)
    }

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

/// --gpu_memory in bytes (given with its unit), once --gpu_model is known to name GPU ranks' GPU.
fn planned_memory(l: &LaunchArgs, device: Device) -> Result<Option<u64>> {
    if let (Some(model), Device::Cpu) = (l.gpu_model, device) {
        let message = format!(
            "--gpu_model {} plans GPU ranks, but these are CPU ranks (--device cpu, or auto without a GPU here): pass --device cuda, or drop --gpu_model",
            model.name()
        );
        return Err(CoordinatorError::flags(&["--gpu_model", "--device"], message));
    }
    l.gpu_memory.map(|b| b.with_unit("--gpu_memory")).transpose()
}

/// A flag's name, its value, whether the value is in range, and the rule in words.
type NumberRule<'a> = (&'static str, f64, &'a dyn Fn(f64) -> bool, &'static str);

/// Every number of the optimization, finite and in its range, before anything is written.
fn check_numbers(t: &TrainingArgs) -> Result<()> {
    let above_0 = |v: f64| v > 0.0;
    let at_least_0 = |v: f64| v >= 0.0;
    let beta = |v: f64| (0.0..1.0).contains(&v);
    let rules: [NumberRule; 8] = [
        ("--learning_rate", t.learning_rate, &above_0, "must be above 0"),
        ("--weight_decay", t.weight_decay, &at_least_0, "must be 0 or more"),
        ("--adam_beta1", t.adam_beta1, &beta, "must be in [0, 1)"),
        ("--adam_beta2", t.adam_beta2, &beta, "must be in [0, 1)"),
        ("--adam_epsilon", t.adam_epsilon, &above_0, "must be above 0"),
        ("--max_grad_norm", t.max_grad_norm, &at_least_0, "must be 0 (no clipping) or more"),
        ("--warmup_ratio", t.warmup_ratio, &|v| (0.0..=1.0).contains(&v), "must be in [0, 1]"),
        // Only read when --max_steps does not set the length.
        ("--num_train_epochs", if t.max_steps > 0 { 1.0 } else { t.num_train_epochs }, &above_0, "must be above 0 (or give --max_steps)"),
    ];
    for (name, value, in_range, rule) in rules {
        if !value.is_finite() || !in_range(value) {
            return Err(CoordinatorError::flag(name, value, rule));
        }
    }
    Ok(())
}

/// The model and its tokenizer; an estimate of a from-scratch model needs no tokenizer (its
/// config's vocabulary is planned; an empty directory stands for the tokenizer never loaded).
fn model_and_tokenizer(args: &ModelArgs, purpose: Purpose) -> Result<(ModelChoice, TokenizerChoice)> {
    let model = match (&args.model_name_or_path, &args.config_name) {
        (Some(dir), None) => ModelChoice::Pretrained(dir.clone()),
        (None, Some(name)) => ModelChoice::Scratch(Box::new(config_by_name(name)?)),
        (Some(_), Some(_)) => {
            let message = "pass either --model_name_or_path (fine-tune) or --config_name (from scratch), not both";
            return Err(CoordinatorError::flags(&["--model_name_or_path", "--config_name"], message));
        }
        (None, None) => {
            let message = "no model: pass --model_name_or_path DIR, or --config_name tiny to train from scratch";
            return Err(CoordinatorError::flags(&["--model_name_or_path", "--config_name"], message));
        }
    };
    let tokenizer = match (&args.train_tokenizer, &args.tokenizer_name, &model) {
        (Some(_), Some(_), _) => {
            return Err(CoordinatorError::flags(
                &["--tokenizer_name", "--train_tokenizer"],
                "pass either --tokenizer_name or --train_tokenizer, not both",
            ))
        }
        (Some(vocab_size), None, _) if *vocab_size < 300 => {
            return Err(CoordinatorError::flag(
                "--train_tokenizer",
                vocab_size,
                "a byte-level BPE needs at least 300 tokens (256 bytes + merges)",
            ))
        }
        (Some(vocab_size), None, _) => TokenizerChoice::Train { vocab_size: *vocab_size },
        (None, Some(dir), _) => TokenizerChoice::Dir(dir.clone()),
        (None, None, ModelChoice::Pretrained(dir)) => TokenizerChoice::Dir(dir.clone()),
        (None, None, ModelChoice::Scratch(_)) if purpose == Purpose::Estimate => TokenizerChoice::Dir(PathBuf::new()),
        (None, None, ModelChoice::Scratch(_)) => {
            let message = "--config_name needs a tokenizer: pass --tokenizer_name DIR or --train_tokenizer VOCAB_SIZE";
            return Err(CoordinatorError::flags(&["--config_name", "--tokenizer_name", "--train_tokenizer"], message));
        }
    };
    Ok((model, tokenizer))
}

fn precision(fp16: bool, bf16: bool, gpu_default_bf16: bool) -> Result<Precision> {
    match (fp16, bf16) {
        (true, true) => Err(CoordinatorError::flags(&["--fp16", "--bf16"], "--fp16 and --bf16 are mutually exclusive")),
        (true, false) => Ok(Precision::Fp16),
        (false, true) => Ok(Precision::Bf16),
        (false, false) if gpu_default_bf16 => Ok(Precision::Bf16),
        (false, false) => Ok(Precision::Fp32),
    }
}

/// `auto` is cuda where this machine has a GPU, and for an estimate of GPU ranks (--num_gpus or
/// --gpu_model) wherever it is made.
fn resolve_device(l: &LaunchArgs, purpose: Purpose) -> Device {
    let planned_gpus = purpose == Purpose::Estimate && (l.num_gpus.is_some() || l.gpu_model.is_some());
    match l.device {
        DeviceSpec::Auto if planned_gpus || Path::new("/dev/nvidiactl").exists() => Device::Cuda(None),
        DeviceSpec::Auto | DeviceSpec::Cpu => Device::Cpu,
        DeviceSpec::Cuda(index) => Device::Cuda(index),
    }
}

pub fn default_cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("zerotune").join("tokens")
}

/// A binary installed next to the running executable.
pub fn sibling_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().map_err(os_err("cannot locate this executable"))?;
    let path = exe.with_file_name(name);
    if !path.is_file() {
        return Err(CoordinatorError::MissingBinary { name: name.into(), exe });
    }
    Ok(path)
}

/// A built-in config name, or a config.json file / directory holding one.
pub fn config_by_name(name: &str) -> Result<CodeGenConfig> {
    if let Some(config) = CodeGenConfig::builtin(name) {
        return Ok(config);
    }
    let path = Path::new(name);
    if path.is_dir() {
        return Ok(CodeGenConfig::from_dir(path)?);
    }
    if path.is_file() {
        return Ok(CodeGenConfig::from_file(path)?);
    }
    let reason = format!("not a built-in config ({}) nor a config.json path", CodeGenConfig::BUILTIN_NAMES);
    Err(CoordinatorError::flag("--config_name", format!("{name:?}"), reason))
}

#[cfg(test)]
mod tests;
