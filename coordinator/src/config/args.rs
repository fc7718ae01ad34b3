//! `coordinator train` flags, in HF's spelling (run_clm.py / TrainingArguments / the deepspeed
//! launcher), grouped by concern; `coordinator tokenize` shares the data group, and `coordinator
//! estimate` takes the same flags with --train_file and --output_dir optional. Values with a
//! fixed set of spellings parse into enums here, so the plan never matches on strings.

use std::path::PathBuf;
use std::str::FromStr;

use zerotune_data::{HygieneArgs, SourceArgs};
pub use zerotune_proto::device::DeviceSpec;
use zerotune_proto::plan::ScheduleKind;

use crate::error::CoordinatorError;

/// Every `train` flag. Boolean flags work alone or with a value (`--fp16`, `--fp16 true`), as
/// with HfArgumentParser.
#[derive(clap::Args, Debug, Clone)]
#[command(rename_all = "snake_case")]
pub struct TrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub training: TrainingArgs,
    #[command(flatten)]
    pub launch: LaunchArgs,
}

/// Where the weights and the tokenizer come from.
#[derive(clap::Args, Debug, Clone)]
#[command(rename_all = "snake_case")]
pub struct ModelArgs {
    /// HF model directory to fine-tune (config.json + weights + tokenizer): CodeGen, or a Llama,
    /// Qwen2 or StarCoder2 (DeepSeek-Coder, CodeLlama, Qwen2.5-Coder, StarCoder2) model.
    #[arg(long)]
    pub model_name_or_path: Option<PathBuf>,
    /// Train from scratch: a built-in config (tiny, codegen-350M, codegen-2B, codegen-6B,
    /// codegen-16B) or a config.json path / directory.
    #[arg(long)]
    pub config_name: Option<String>,
    /// Directory holding tokenizer.json or vocab.json + merges.txt (default: the model's).
    #[arg(long)]
    pub tokenizer_name: Option<PathBuf>,
    /// Train a byte-level BPE tokenizer of this many tokens on the training data.
    #[arg(long)]
    pub train_tokenizer: Option<usize>,
}

/// The documents and how they become token blocks (`train` and `tokenize`).
#[derive(clap::Args, Debug, Clone)]
#[command(rename_all = "snake_case")]
pub struct DataArgs {
    /// Training data: .jsonl/.json, .csv, .txt, or a source directory (files2jsonl built in).
    /// Required but for `coordinator estimate`, which plans without data.
    #[arg(long, required = true)]
    pub train_file: Option<PathBuf>,
    /// Validation data; without it --validation_split_percentage of the documents is held out.
    #[arg(long)]
    pub validation_file: Option<PathBuf>,
    #[command(flatten)]
    pub source: SourceArgs,
    /// Secrets, duplicates, leaks and document size: the data pipeline's settings.
    #[command(flatten)]
    pub hygiene: HygieneArgs,
    /// Percent of the documents held out for validation when there is no --validation_file
    /// (0 to 100).
    #[arg(long, default_value_t = 5)]
    pub validation_split_percentage: u32,
    /// Tokens per training block (default: min(1024, n_positions)).
    #[arg(long)]
    pub block_size: Option<usize>,
    /// Where token caches live (default: ~/.cache/zerotune/tokens).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
}

/// The optimization, evaluation and output flags of HF TrainingArguments.
#[derive(clap::Args, Debug, Clone)]
#[command(rename_all = "snake_case")]
pub struct TrainingArgs {
    #[arg(long, default_value_t = 8)]
    pub per_device_train_batch_size: usize,
    #[arg(long, default_value_t = 8)]
    pub per_device_eval_batch_size: usize,
    #[arg(long, default_value_t = 1)]
    pub gradient_accumulation_steps: usize,
    #[arg(long, default_value_t = 5e-5, allow_negative_numbers = true)]
    pub learning_rate: f64,
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 0.9, allow_negative_numbers = true)]
    pub adam_beta1: f64,
    #[arg(long, default_value_t = 0.999, allow_negative_numbers = true)]
    pub adam_beta2: f64,
    #[arg(long, default_value_t = 1e-8, allow_negative_numbers = true)]
    pub adam_epsilon: f64,
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub max_grad_norm: f64,
    #[arg(long, default_value_t = 3.0, allow_negative_numbers = true)]
    pub num_train_epochs: f64,
    /// Total optimizer steps; overrides --num_train_epochs when positive.
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    pub max_steps: i64,
    #[arg(long, default_value = "linear", value_parser = parse_schedule)]
    pub lr_scheduler_type: ScheduleKind,
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: u64,
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub warmup_ratio: f64,
    #[arg(long, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub fp16: Option<bool>,
    #[arg(long, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub bf16: Option<bool>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Where the run writes; required but for `coordinator estimate`.
    #[arg(long, required = true)]
    pub output_dir: Option<PathBuf>,
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false", action = clap::ArgAction::Set)]
    pub overwrite_output_dir: bool,
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false", action = clap::ArgAction::Set)]
    pub do_train: bool,
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false", action = clap::ArgAction::Set)]
    pub do_eval: bool,
    #[arg(long, default_value_t = 500)]
    pub logging_steps: u64,
    /// Evaluate every N steps (with --do_eval); without it only at the end.
    #[arg(long)]
    pub eval_steps: Option<u64>,
    /// With --do_eval, next-line completion on this many positions of the validation documents
    /// at the end, the starting model against the final one (`worker eval`); 0 turns it off.
    #[arg(long, default_value_t = 200)]
    pub completion_eval_positions: usize,
    /// Save a checkpoint every N steps; 0 saves only the final model.
    #[arg(long, default_value_t = 500)]
    pub save_steps: u64,
    /// Keep at most this many checkpoints (oldest removed first).
    #[arg(long)]
    pub save_total_limit: Option<usize>,
    /// Continue from a checkpoint: a `checkpoint-<step>` directory, or `latest` (in --output_dir).
    #[arg(long)]
    pub resume_from_checkpoint: Option<ResumeFrom>,
    /// Resume although the block size or the global batch (micro x accumulation x world) differs
    /// from the checkpoint's (HF's flag): the new shape's data order is taken up at the
    /// checkpoint's step, so some blocks may be seen twice or not at all.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false", action = clap::ArgAction::Set)]
    pub ignore_data_skip: bool,
    /// Load weights or a checkpoint holding NaN or infinite values (refused by default, naming the tensor).
    #[arg(long)]
    pub allow_nonfinite: bool,
    /// DeepSpeed config (ZeRO, batch, optimizer, scheduler, fp16/bf16; "auto" allowed).
    #[arg(long)]
    pub deepspeed: Option<PathBuf>,
    /// Recompute each block's activations in the backward pass instead of keeping them (less
    /// memory, about a third more compute); also set by ds_config `activation_checkpointing`.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false", action = clap::ArgAction::Set)]
    pub gradient_checkpointing: bool,
    /// The offloaded optimizer moves gradients and weights in tiles of this many elements (for
    /// tests and tuning; transfers of one tile overlap the host's work on the next).
    #[arg(long, default_value_t = zerotune_proto::plan::DEFAULT_OFFLOAD_TILE)]
    pub offload_tile_elements: usize,
}

/// Where the ranks run and how they are started and watched (the deepspeed launcher's flags).
#[derive(clap::Args, Debug, Clone)]
#[command(rename_all = "snake_case")]
pub struct LaunchArgs {
    /// cpu, cuda, cuda:N (that one GPU) or auto (cuda when a GPU is present).
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
    /// The worker binary (default: `worker` next to this executable).
    #[arg(long)]
    pub worker_bin: Option<PathBuf>,
    /// GPU ranks on this machine (one worker process per GPU, like `deepspeed --num_gpus`).
    #[arg(long)]
    pub num_gpus: Option<usize>,
    /// CPU ranks on this machine (one worker process each), for machines without GPUs.
    #[arg(long)]
    pub num_workers: Option<usize>,
    /// Seconds without any rank finishing a step (or a save, or an evaluation) before the job is
    /// declared hung and stopped (HF's --ddp_timeout; the first step gets the same allowance).
    #[arg(long, default_value_t = 1800)]
    pub ddp_timeout: u64,
    /// Seconds a rank may go without a heartbeat (stopped, frozen or unreachable) before it is
    /// declared failed; workers that hear nothing from the coordinator for as long exit.
    #[arg(long, default_value_t = zerotune_proto::plan::DEFAULT_HEARTBEAT_TIMEOUT_S)]
    pub heartbeat_timeout: u64,
    /// If a worker fails, resume from the latest checkpoint up to this many times.
    #[arg(long, default_value_t = 0)]
    pub max_restarts: u32,
    /// DeepSpeed hostfile: one `hostname slots=N` per line; ranks are node-major in its order.
    #[arg(long)]
    pub hostfile: Option<PathBuf>,
    /// Use the first N hosts of the hostfile.
    #[arg(long)]
    pub num_nodes: Option<usize>,
    /// Only these hosts/slots, e.g. `worker-0@worker-1:0,2` or `localhost:1,2`.
    #[arg(long)]
    pub include: Option<String>,
    /// All but these hosts/slots (same syntax as --include).
    #[arg(long)]
    pub exclude: Option<String>,
    /// Address workers use to reach the coordinator (multi-node; default: this host's name).
    #[arg(long)]
    pub master_addr: Option<String>,
    /// Port the coordinator listens on for a multi-node job (0: any free port).
    #[arg(long, default_value_t = 29500)]
    pub master_port: u16,
    /// Default: ssh when the hostfile names another machine, otherwise local.
    #[arg(long, value_enum)]
    pub launcher: Option<LauncherKind>,
    /// Serve workers over TLS with this certificate (PEM); needs --tls_key.
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// CA certificate (PEM) workers verify the coordinator with (default: --tls_cert, self-signed).
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// The remote shell for --launcher ssh (any program called as `CMD host script`).
    #[arg(long, default_value = "ssh -o BatchMode=yes")]
    pub ssh_command: String,
    /// Memory of each GPU to plan for, with its unit (e.g. 24GiB, 80GB, 16000MiB; default:
    /// --gpu_model's, else queried from the GPU, or this machine's RAM for CPU ranks). A job the
    /// memory planner finds too large for it is refused before any worker starts.
    #[arg(long)]
    pub gpu_memory: Option<Bytes>,
    /// Plan for this GPU instead of this machine's: its memory (as nvidia-smi reports it) and
    /// compute capability, which decides the precision (fp32 on a P40); --gpu_memory still
    /// overrides the memory. With `estimate` it plans GPU ranks on a machine without one.
    #[arg(long, value_enum)]
    pub gpu_model: Option<GpuModel>,
}

/// `--gpu_model`: the GPUs the planner knows (their memory and compute capability: `gpu.rs`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuModel {
    /// Tesla P40, 24 GB, Pascal.
    P40,
    /// Tesla V100 32 GB, Volta.
    V100,
    /// A100 40 GB, Ampere.
    #[value(name = "a100-40gb")]
    A100With40Gb,
    /// A100 80 GB, Ampere.
    #[value(name = "a100-80gb")]
    A100With80Gb,
    /// H100 80 GB, Hopper.
    H100,
    /// H200 141 GB, Hopper.
    H200,
}

impl GpuModel {
    /// The flag's value, as clap spells it.
    pub fn name(self) -> String {
        clap::ValueEnum::to_possible_value(&self).expect("no variant is skipped").get_name().to_string()
    }
}

/// A byte count as spelled: a number and a unit, B, KB/MB/GB/TB (powers of 1000) or
/// KiB/MiB/GiB/TiB (of 1024). A bare number parses (as bytes) but keeps that it had no unit, so
/// that a memory size of `24` can be refused rather than read as 24 bytes (`with_unit`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bytes {
    pub bytes: u64,
    /// The spelling had a unit (`24GiB`, `4096B`); `24` alone has none.
    pub has_unit: bool,
}

impl Bytes {
    /// The byte count of flag `name`, refused when it was given without a unit.
    pub fn with_unit(self, name: &'static str) -> Result<u64, CoordinatorError> {
        if self.has_unit {
            return Ok(self.bytes);
        }
        let n = self.bytes;
        let reason =
            format!("a size needs a unit, or it would be {n} bytes: add one, e.g. {name} {n}GiB (GiB/MiB: powers of 1024, GB/MB: of 1000)");
        Err(CoordinatorError::flag(name, n, reason))
    }
}

impl FromStr for Bytes {
    type Err = String;

    fn from_str(spec: &str) -> Result<Self, String> {
        let s = spec.trim();
        let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
        let (number, unit) = s.split_at(split);
        let unit = unit.trim().to_ascii_lowercase();
        let factor: f64 = match unit.as_str() {
            "" | "b" => 1.0,
            "kb" => 1e3,
            "mb" => 1e6,
            "gb" => 1e9,
            "tb" => 1e12,
            "kib" => 1024.0,
            "mib" => 1024f64.powi(2),
            "gib" => 1024f64.powi(3),
            "tib" => 1024f64.powi(4),
            other => return Err(format!("{spec:?}: unknown unit {other:?} (expected e.g. 24GiB, 80GB or 16000MiB)")),
        };
        match number.parse::<f64>() {
            Ok(n) if n > 0.0 && n.is_finite() => Ok(Self { bytes: (n * factor).round() as u64, has_unit: !unit.is_empty() }),
            _ => Err(format!("{spec:?}: expected a positive size such as 24GiB")),
        }
    }
}

/// `--launcher`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LauncherKind {
    /// Processes on this machine.
    Local,
    /// One remote shell per rank (--ssh_command).
    Ssh,
    /// One `srun` for every rank, inside a Slurm allocation.
    Slurm,
    /// Print each rank's command for you to start.
    Manual,
}

/// `--resume_from_checkpoint`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResumeFrom {
    /// The checkpoint `latest` names in --output_dir.
    Latest,
    /// A `checkpoint-<step>` directory.
    Dir(PathBuf),
}

impl FromStr for ResumeFrom {
    type Err = String;

    fn from_str(spec: &str) -> Result<Self, String> {
        match spec {
            "" => Err("expected `latest` or a checkpoint-<step> directory".into()),
            "latest" => Ok(Self::Latest),
            dir => Ok(Self::Dir(dir.into())),
        }
    }
}

/// HF's `--lr_scheduler_type` names.
fn parse_schedule(name: &str) -> Result<ScheduleKind, String> {
    match name {
        "linear" => Ok(ScheduleKind::Linear),
        "cosine" => Ok(ScheduleKind::Cosine),
        "constant" => Ok(ScheduleKind::Constant),
        "constant_with_warmup" => Ok(ScheduleKind::ConstantWithWarmup),
        other => Err(format!("{other:?}: expected linear, cosine, constant or constant_with_warmup")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_parse_into_their_enums() {
        assert_eq!("latest".parse(), Ok(ResumeFrom::Latest));
        assert_eq!("out/checkpoint-4".parse(), Ok(ResumeFrom::Dir("out/checkpoint-4".into())));
        assert_eq!(parse_schedule("constant_with_warmup"), Ok(ScheduleKind::ConstantWithWarmup));
        assert!(parse_schedule("poly").unwrap_err().contains("expected linear"));
        let sized = |bytes| Ok(Bytes { bytes, has_unit: true });
        assert_eq!("24GiB".parse(), sized(24 << 30));
        assert_eq!("80GB".parse(), sized(80_000_000_000));
        assert_eq!("1.5 GiB".parse(), sized(3 << 29));
        assert_eq!("4096B".parse(), sized(4096));
        // A bare number is bytes with no unit, which a memory size refuses, naming the flag.
        let bare: Bytes = "24".parse().unwrap();
        assert_eq!(bare, Bytes { bytes: 24, has_unit: false });
        let err = bare.with_unit("--gpu_memory").unwrap_err();
        assert!(matches!(&err, CoordinatorError::Flag { flag: "--gpu_memory", value, .. } if value == "24"), "{err:?}");
        let err = err.to_string();
        assert!(err.starts_with("--gpu_memory 24: a size needs a unit") && err.contains("e.g. --gpu_memory 24GiB"), "{err}");
        assert_eq!("24GiB".parse::<Bytes>().unwrap().with_unit("--gpu_memory").unwrap(), 24 << 30);
        assert!("24 parsecs".parse::<Bytes>().unwrap_err().contains("unknown unit"));
        assert!("-1GiB".parse::<Bytes>().is_err() && "0GiB".parse::<Bytes>().is_err());
    }
}
