//! `coordinator train` flags (run_clm.py / HF TrainingArguments names) plus `--deepspeed
//! ds_config.json`, resolved into one validated `TrainPlan` the way HF Trainer resolves "auto".
//! Only the plan reaches library code; every error names the flag or config key at fault.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;
use zerotune_hf::CodeGenConfig;

use crate::hosts::{self, Node, Placement};
use crate::launch::Launcher;
use zerotune_proto::plan::{AdamW, LossScaler, Precision, ScheduleKind, DEFAULT_REDUCE_BUCKET};

use crate::error::{CoordinatorError, Result};
use zerotune_data::{Filter, SourceArgs};

/// Flags keep HF's spelling (`--per_device_train_batch_size`); boolean flags work alone or with a
/// value (`--fp16`, `--fp16 true`), as with HfArgumentParser.
#[derive(clap::Args, Debug, Clone)]
#[command(rename_all = "snake_case")]
pub struct TrainArgs {
    /// HF-layout CodeGen directory to fine-tune (config.json + weights + tokenizer).
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
    /// Training data: .jsonl/.json, .csv, .txt, or a source directory (files2jsonl built in).
    #[arg(long)]
    pub train_file: PathBuf,
    /// Validation data; without it --validation_split_percentage of the documents is held out.
    #[arg(long)]
    pub validation_file: Option<PathBuf>,
    #[command(flatten)]
    pub source: SourceArgs,
    #[arg(long, default_value_t = 5)]
    pub validation_split_percentage: u32,
    /// Tokens per training block (default: min(1024, n_positions)).
    #[arg(long)]
    pub block_size: Option<usize>,
    /// Where token caches live (default: ~/.cache/zerotune/tokens).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 8)]
    pub per_device_train_batch_size: usize,
    #[arg(long, default_value_t = 8)]
    pub per_device_eval_batch_size: usize,
    #[arg(long, default_value_t = 1)]
    pub gradient_accumulation_steps: usize,
    #[arg(long, default_value_t = 5e-5)]
    pub learning_rate: f64,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 0.9)]
    pub adam_beta1: f64,
    #[arg(long, default_value_t = 0.999)]
    pub adam_beta2: f64,
    #[arg(long, default_value_t = 1e-8)]
    pub adam_epsilon: f64,
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    #[arg(long, default_value_t = 3.0)]
    pub num_train_epochs: f64,
    /// Total optimizer steps; overrides --num_train_epochs when positive.
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    pub max_steps: i64,
    /// linear, cosine, constant or constant_with_warmup.
    #[arg(long, default_value = "linear")]
    pub lr_scheduler_type: String,
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: u64,
    #[arg(long, default_value_t = 0.0)]
    pub warmup_ratio: f64,
    #[arg(long, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub fp16: Option<bool>,
    #[arg(long, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub bf16: Option<bool>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[arg(long)]
    pub output_dir: PathBuf,
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
    /// DeepSpeed config (ZeRO, batch, optimizer, scheduler, fp16/bf16; "auto" allowed).
    #[arg(long)]
    pub deepspeed: Option<PathBuf>,
    /// cpu, cuda[:N] or auto (cuda when a GPU is present).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// The worker binary (default: `worker` next to this executable).
    #[arg(long)]
    pub worker_bin: Option<PathBuf>,
    /// GPU ranks on this machine (one worker process per GPU, like `deepspeed --num_gpus`).
    #[arg(long)]
    pub num_gpus: Option<usize>,
    /// CPU ranks on this machine (one worker process each), for machines without GPUs.
    #[arg(long)]
    pub num_workers: Option<usize>,
    /// Continue from a checkpoint: a `checkpoint-<step>` directory, or `latest` (in --output_dir).
    #[arg(long)]
    pub resume_from_checkpoint: Option<String>,
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
    /// local, ssh, slurm or manual (print the worker commands); default: ssh when the hostfile
    /// names another machine, otherwise local.
    #[arg(long)]
    pub launcher: Option<String>,
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
}

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

/// ZeRO settings from ds_config.json.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Zero {
    pub stage: u8,
    pub offload_optimizer: bool,
    /// Elements per rank in one stage-2 gradient reduce-scatter.
    pub reduce_bucket_size: usize,
}

/// The validated run.
#[derive(Clone, Debug)]
pub struct TrainPlan {
    pub model: ModelChoice,
    pub tokenizer: TokenizerChoice,
    pub train_file: PathBuf,
    pub validation_file: Option<PathBuf>,
    pub text_column: String,
    pub validation_split_percentage: u32,
    pub block_size: Option<usize>,
    pub filter: Filter,
    pub cache_dir: PathBuf,
    pub output_dir: PathBuf,
    pub overwrite_output_dir: bool,
    pub world_size: usize,
    pub micro_batch: usize,
    pub eval_batch: usize,
    pub accumulation: usize,
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
    pub do_eval: bool,
    pub logging_steps: u64,
    pub eval_steps: Option<u64>,
    /// Positions of the completion evaluation at the end (0: none).
    pub completion_eval_positions: usize,
    pub save_steps: Option<u64>,
    pub save_total_limit: Option<usize>,
    pub device: String,
    pub worker_bin: PathBuf,
    pub zero: Zero,
    pub resume_from_checkpoint: Option<String>,
    pub max_restarts: u32,
    /// `--num_gpus` was given: GPU ranks talk over NCCL even when there is one.
    pub num_gpus_given: bool,
    /// Where each rank runs (global rank order).
    pub placements: Vec<Placement>,
    pub launcher: Launcher,
    pub master_addr: Option<String>,
    pub master_port: u16,
    pub tls: Option<Tls>,
    pub ddp_timeout: std::time::Duration,
    pub heartbeat_timeout: std::time::Duration,
}

/// The coordinator's TLS identity and the CA its workers trust, as PEM.
#[derive(Clone, Debug)]
pub struct Tls {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    pub ca: Vec<u8>,
}

fn read_pem(path: &Path, flag_name: &str) -> Result<Vec<u8>> {
    let pem = std::fs::read(path).map_err(|e| flag(format!("{flag_name} {}: {e}", path.display())))?;
    if !pem.starts_with(b"-----BEGIN") {
        return Err(flag(format!("{flag_name} {}: not a PEM file (expected -----BEGIN ...)", path.display())));
    }
    Ok(pem)
}

fn tls(args: &TrainArgs) -> Result<Option<Tls>> {
    match (&args.tls_cert, &args.tls_key) {
        (None, None) if args.tls_ca.is_none() => Ok(None),
        (Some(cert), Some(key)) => {
            let cert_pem = read_pem(cert, "--tls_cert")?;
            let ca = match &args.tls_ca {
                Some(ca) => read_pem(ca, "--tls_ca")?,
                None => cert_pem.clone(),
            };
            Ok(Some(Tls { cert: cert_pem, key: read_pem(key, "--tls_key")?, ca }))
        }
        _ => Err(flag("TLS needs both --tls_cert and --tls_key (and optionally --tls_ca)")),
    }
}

/// The ranks (hostfile or this machine, narrowed by --include/--exclude/--num_nodes/--num_gpus)
/// and how to start them.
fn placements_and_launcher(args: &TrainArgs, device: &str) -> Result<(Vec<Placement>, Launcher)> {
    let (gpus, workers) = (args.num_gpus, args.num_workers);
    match (gpus, workers) {
        (Some(_), Some(_)) => return Err(flag("pass either --num_gpus (GPU ranks) or --num_workers (CPU ranks), not both")),
        (Some(0), _) | (_, Some(0)) => return Err(flag("--num_gpus / --num_workers must be at least 1")),
        (Some(n), None) if device == "cpu" => {
            return Err(flag(format!("--num_gpus {n} with --device cpu: use --num_workers {n} for CPU ranks")))
        }
        (None, Some(n)) if device != "cpu" => {
            return Err(flag(format!("--num_workers {n} starts CPU ranks: add --device cpu, or use --num_gpus for GPUs")))
        }
        _ => {}
    }
    let per_node = gpus.or(workers);
    if args.launcher.as_deref() == Some("slurm") {
        let env = |key: &str| std::env::var(key).ok();
        return Ok((hosts::slurm_placements(&env, args.num_nodes, per_node)?, Launcher::Slurm));
    }
    let nodes = match &args.hostfile {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| flag(format!("--hostfile {}: {e}", path.display())))?;
            hosts::parse_hostfile(&text, path)?
        }
        None if args.num_nodes.is_some_and(|n| n > 1) => {
            return Err(flag("--num_nodes > 1 needs --hostfile (one \"hostname slots=N\" per line)"))
        }
        None => {
            // This machine: its GPUs (for --include/--exclude) or the ranks asked for.
            let visible = (0..64).take_while(|i| Path::new(&format!("/dev/nvidia{i}")).exists()).count();
            let slots = match per_node {
                Some(n) => n,
                None if device != "cpu" && (args.include.is_some() || args.exclude.is_some()) => visible.max(1),
                None => 1,
            };
            vec![Node { host: "localhost".into(), slots: (0..slots).collect() }]
        }
    };
    let selection = hosts::Selection {
        include: args.include.as_deref(),
        exclude: args.exclude.as_deref(),
        num_nodes: args.num_nodes,
        num_gpus: if args.hostfile.is_some() { per_node } else { None },
    };
    let placements = hosts::placements(&hosts::select(nodes, &selection)?);
    let remote = placements.iter().any(|p| !hosts::is_local(&p.host));
    let launcher = match args.launcher.as_deref() {
        None if remote => Launcher::Ssh { command: ssh_command(&args.ssh_command)? },
        None | Some("local") => {
            if remote {
                let host = placements.iter().find(|p| !hosts::is_local(&p.host)).map(|p| p.host.clone()).unwrap_or_default();
                return Err(flag(format!("--launcher local cannot start ranks on {host}: use ssh, slurm or manual")));
            }
            Launcher::Local
        }
        Some("ssh") => Launcher::Ssh { command: ssh_command(&args.ssh_command)? },
        Some("slurm") => Launcher::Slurm,
        Some("manual") => Launcher::Manual,
        Some(other) => return Err(flag(format!("--launcher {other:?}: expected local, ssh, slurm or manual"))),
    };
    Ok((placements, launcher))
}

fn ssh_command(spec: &str) -> Result<Vec<String>> {
    let words: Vec<String> = spec.split_whitespace().map(String::from).collect();
    if words.is_empty() {
        return Err(flag("--ssh_command is empty"));
    }
    Ok(words)
}

fn flag(message: impl Into<String>) -> CoordinatorError {
    CoordinatorError::Flag(message.into())
}

impl TrainPlan {
    /// Validates flags and the DeepSpeed config into a plan.
    pub fn resolve(args: &TrainArgs) -> Result<Self> {
        if !args.do_train {
            return Err(flag("nothing to do: pass --do_train (evaluation-only runs are not supported yet)"));
        }
        let model = match (&args.model_name_or_path, &args.config_name) {
            (Some(dir), None) => ModelChoice::Pretrained(dir.clone()),
            (None, Some(name)) => ModelChoice::Scratch(Box::new(config_by_name(name)?)),
            (Some(_), Some(_)) => {
                return Err(flag("pass either --model_name_or_path (fine-tune) or --config_name (from scratch), not both"))
            }
            (None, None) => return Err(flag("no model: pass --model_name_or_path DIR, or --config_name tiny to train from scratch")),
        };
        let tokenizer = match (&args.train_tokenizer, &args.tokenizer_name, &model) {
            (Some(_), Some(_), _) => return Err(flag("pass either --tokenizer_name or --train_tokenizer, not both")),
            (Some(vocab_size), None, _) if *vocab_size < 300 => {
                return Err(flag(format!(
                    "--train_tokenizer {vocab_size}: a byte-level BPE needs at least 300 tokens (256 bytes + merges)"
                )))
            }
            (Some(vocab_size), None, _) => TokenizerChoice::Train { vocab_size: *vocab_size },
            (None, Some(dir), _) => TokenizerChoice::Dir(dir.clone()),
            (None, None, ModelChoice::Pretrained(dir)) => TokenizerChoice::Dir(dir.clone()),
            (None, None, ModelChoice::Scratch(_)) => {
                return Err(flag("--config_name needs a tokenizer: pass --tokenizer_name DIR or --train_tokenizer VOCAB_SIZE"))
            }
        };
        let device = resolve_device(&args.device)?;
        let (placements, launcher) = placements_and_launcher(args, &device)?;
        let world_size = placements.len();
        let schedule = match args.lr_scheduler_type.as_str() {
            "linear" => ScheduleKind::Linear,
            "cosine" => ScheduleKind::Cosine,
            "constant" => ScheduleKind::Constant,
            "constant_with_warmup" => ScheduleKind::ConstantWithWarmup,
            other => return Err(flag(format!("--lr_scheduler_type {other:?}: expected linear, cosine, constant or constant_with_warmup"))),
        };
        if !(0.0..1.0).contains(&args.warmup_ratio) {
            return Err(flag(format!("--warmup_ratio {} must be in [0, 1)", args.warmup_ratio)));
        }
        let warmup = if args.warmup_steps > 0 { Warmup::Steps(args.warmup_steps) } else { Warmup::Ratio(args.warmup_ratio) };
        for (name, value) in [
            ("--per_device_train_batch_size", args.per_device_train_batch_size),
            ("--per_device_eval_batch_size", args.per_device_eval_batch_size),
            ("--gradient_accumulation_steps", args.gradient_accumulation_steps),
        ] {
            if value == 0 {
                return Err(flag(format!("{name} must be at least 1")));
            }
        }
        let mut plan = Self {
            model,
            tokenizer,
            train_file: args.train_file.clone(),
            validation_file: args.validation_file.clone(),
            text_column: args.source.text_column_name.clone(),
            validation_split_percentage: args.validation_split_percentage,
            block_size: args.block_size,
            filter: args.source.filter()?,
            cache_dir: args.cache_dir.clone().unwrap_or_else(default_cache_dir),
            output_dir: args.output_dir.clone(),
            overwrite_output_dir: args.overwrite_output_dir,
            world_size,
            micro_batch: args.per_device_train_batch_size,
            eval_batch: args.per_device_eval_batch_size,
            accumulation: args.gradient_accumulation_steps,
            epochs: args.num_train_epochs,
            max_steps: (args.max_steps > 0).then_some(args.max_steps as u64),
            warmup,
            schedule,
            ds_total_steps: None,
            optimizer: AdamW {
                lr: args.learning_rate,
                beta1: args.adam_beta1,
                beta2: args.adam_beta2,
                eps: args.adam_epsilon,
                weight_decay: args.weight_decay,
            },
            max_grad_norm: args.max_grad_norm,
            precision: Precision::Fp32,
            loss_scaler: LossScaler::default(),
            seed: args.seed,
            do_eval: args.do_eval,
            logging_steps: args.logging_steps.max(1),
            eval_steps: args.eval_steps.filter(|&n| n > 0 && args.do_eval),
            completion_eval_positions: if args.do_eval { args.completion_eval_positions } else { 0 },
            save_steps: (args.save_steps > 0).then_some(args.save_steps),
            save_total_limit: args.save_total_limit,
            device: device.clone(),
            worker_bin: match &args.worker_bin {
                Some(path) => path.clone(),
                None => sibling_binary("worker")?,
            },
            // Without a ds_config: ranks keep whole optimizers, and a CPU rank's optimizer is
            // already in host memory, so it runs the host kernel.
            zero: Zero { stage: 0, offload_optimizer: device == "cpu", reduce_bucket_size: DEFAULT_REDUCE_BUCKET },
            resume_from_checkpoint: args.resume_from_checkpoint.clone(),
            max_restarts: args.max_restarts,
            num_gpus_given: args.num_gpus.is_some() || (device != "cpu" && (args.hostfile.is_some() || args.include.is_some())),
            placements,
            launcher,
            master_addr: args.master_addr.clone(),
            master_port: args.master_port,
            tls: tls(args)?,
            ddp_timeout: std::time::Duration::from_secs(args.ddp_timeout.max(1)),
            heartbeat_timeout: std::time::Duration::from_secs(args.heartbeat_timeout.max(1)),
        };
        let (fp16, bf16) = (args.fp16.unwrap_or(false), args.bf16.unwrap_or(false));
        if let Some(path) = &args.deepspeed {
            apply_ds_config(&mut plan, args, path, fp16, bf16)?;
        } else {
            plan.precision = precision(fp16, bf16, args.bf16.is_none() && device != "cpu")?;
        }
        if plan.precision == Precision::Fp16 && device == "cpu" {
            return Err(flag("--fp16 needs a GPU (--device cuda); on CPU train in fp32 (the default) or --bf16"));
        }
        Ok(plan)
    }

    /// The plan to continue on the ranks not on `lost` hosts (renumbered in order), with the same
    /// global batch, so the same data in the same steps: gradient accumulation grows as the world
    /// shrinks. Refused, naming every factor, when the batch does not divide among what is left.
    pub fn without_hosts(&self, lost: &BTreeSet<String>) -> Result<TrainPlan> {
        let placements: Vec<Placement> = self
            .placements
            .iter()
            .filter(|p| !lost.contains(&p.host))
            .enumerate()
            .map(|(rank, p)| Placement { rank, ..p.clone() })
            .collect();
        let (world, global) = (placements.len(), self.micro_batch * self.accumulation * self.world_size);
        let lost_list = lost.iter().cloned().collect::<Vec<_>>().join(", ");
        if world == 0 {
            return Err(flag(format!("no rank is left once the hosts that stopped answering ({lost_list}) are dropped")));
        }
        if global % (self.micro_batch * world) != 0 {
            return Err(flag(format!(
                "without {lost_list}, {world} rank(s) are left and cannot keep the global batch of {global} (micro {} x accumulation {} x world {}): \
                 it is not a multiple of micro {} x {world} ranks; continue by hand with --resume_from_checkpoint latest and a batch that fits",
                self.micro_batch, self.accumulation, self.world_size, self.micro_batch
            )));
        }
        Ok(TrainPlan { accumulation: global / (self.micro_batch * world), world_size: world, placements, ..self.clone() })
    }

    /// Warmup in steps for a run of `total` steps (HF: ceil(total * warmup_ratio)).
    pub fn warmup_steps(&self, total: u64) -> u64 {
        match self.warmup {
            Warmup::Steps(n) => n,
            Warmup::Ratio(r) => (total as f64 * r).ceil() as u64,
        }
    }
}

fn precision(fp16: bool, bf16: bool, gpu_default_bf16: bool) -> Result<Precision> {
    match (fp16, bf16) {
        (true, true) => Err(flag("--fp16 and --bf16 are mutually exclusive")),
        (true, false) => Ok(Precision::Fp16),
        (false, true) => Ok(Precision::Bf16),
        (false, false) if gpu_default_bf16 => Ok(Precision::Bf16),
        (false, false) => Ok(Precision::Fp32),
    }
}

fn resolve_device(spec: &str) -> Result<String> {
    match spec {
        "auto" => Ok(if Path::new("/dev/nvidiactl").exists() { "cuda".into() } else { "cpu".into() }),
        "cpu" | "cuda" => Ok(spec.into()),
        s if s.strip_prefix("cuda:").is_some_and(|n| n.parse::<u32>().is_ok()) => Ok(s.into()),
        other => Err(flag(format!("--device {other:?}: expected auto, cpu, cuda or cuda:N"))),
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
    let exe = std::env::current_exe().map_err(|e| flag(format!("cannot locate this executable: {e}")))?;
    let path = exe.with_file_name(name);
    if !path.is_file() {
        return Err(flag(format!("{} not found next to {}; build it (cargo build) or pass --worker_bin", name, exe.display())));
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
    Err(flag(format!("--config_name {name:?}: not a built-in config ({}) nor a config.json path", CodeGenConfig::BUILTIN_NAMES)))
}

/// HF Trainer's DeepSpeed integration: "auto" takes the flag's value, any other value must agree
/// with it; batch, optimizer, scheduler, precision and ZeRO settings come into the plan.
fn apply_ds_config(plan: &mut TrainPlan, args: &TrainArgs, path: &Path, fp16: bool, bf16: bool) -> Result<()> {
    let text = std::fs::read_to_string(path).map_err(crate::error::io_err(path))?;
    let ds: Value = serde_json::from_str(&text).map_err(|e| flag(format!("--deepspeed {}: not valid JSON: {e}", path.display())))?;
    let bad = |m: String| flag(format!("--deepspeed {}: {m}", path.display()));
    let mut mismatches = vec![];
    let mut check = |key: &str, hf_name: &str, hf: Value| {
        let Some(ds_value) = lookup(&ds, key) else { return };
        if ds_value == "auto" {
            return;
        }
        let equal = match (ds_value.as_f64(), hf.as_f64()) {
            (Some(a), Some(b)) => (a - b).abs() <= 1e-12 * b.abs().max(1.0),
            _ => *ds_value == hf,
        };
        if !equal {
            mismatches.push(format!("- ds {key}={ds_value} vs hf {hf_name}={hf}"));
        }
    };
    let world = plan.world_size;
    check("train_micro_batch_size_per_gpu", "per_device_train_batch_size", args.per_device_train_batch_size.into());
    check("gradient_accumulation_steps", "gradient_accumulation_steps", args.gradient_accumulation_steps.into());
    let global = world * args.per_device_train_batch_size * args.gradient_accumulation_steps;
    check(
        "train_batch_size",
        &format!("world {world} x micro {} x accumulation {}", args.per_device_train_batch_size, args.gradient_accumulation_steps),
        global.into(),
    );
    check("gradient_clipping", "max_grad_norm", args.max_grad_norm.into());
    check("optimizer.params.lr", "learning_rate", args.learning_rate.into());
    check("optimizer.params.betas", "adam_beta1/adam_beta2", serde_json::json!([args.adam_beta1, args.adam_beta2]));
    check("optimizer.params.eps", "adam_epsilon", args.adam_epsilon.into());
    check("optimizer.params.weight_decay", "weight_decay", args.weight_decay.into());
    check("fp16.enabled", "fp16", fp16.into());
    check("bf16.enabled", "bf16", bf16.into());
    check("scheduler.params.warmup_max_lr", "learning_rate", args.learning_rate.into());
    if !mismatches.is_empty() {
        return Err(bad(format!(
            "values that mismatch the command line (set them to \"auto\" or make them agree):\n{}",
            mismatches.join("\n")
        )));
    }
    if let Some(kind) = lookup(&ds, "optimizer.type").and_then(Value::as_str) {
        if !matches!(kind, "Adam" | "AdamW") {
            return Err(bad(format!("optimizer.type {kind:?}: only Adam/AdamW (decoupled weight decay) is supported")));
        }
        if kind == "Adam" && lookup(&ds, "optimizer.params.adam_w_mode") == Some(&Value::Bool(false)) {
            return Err(bad("optimizer.params.adam_w_mode false (L2-coupled Adam) is not supported".into()));
        }
    }
    if let Some(scheduler) = lookup(&ds, "scheduler.type").and_then(Value::as_str) {
        plan.schedule = match scheduler {
            "WarmupLR" => ScheduleKind::ConstantWithWarmup,
            "WarmupDecayLR" => ScheduleKind::Linear,
            "WarmupCosineLR" => ScheduleKind::Cosine,
            other => return Err(bad(format!("scheduler.type {other:?}: supported are WarmupLR, WarmupDecayLR, WarmupCosineLR"))),
        };
        let warmup_type = lookup(&ds, "scheduler.params.warmup_type").and_then(Value::as_str).unwrap_or("log");
        if scheduler != "WarmupCosineLR" && warmup_type != "linear" {
            return Err(bad(format!("scheduler.params.warmup_type {warmup_type:?}: only \"linear\" warmup is supported (DeepSpeed defaults to \"log\"); set it, or drop the scheduler block to use --lr_scheduler_type")));
        }
        if let Some(min_lr) = lookup(&ds, "scheduler.params.warmup_min_lr").and_then(Value::as_f64) {
            if min_lr != 0.0 {
                return Err(bad(format!("scheduler.params.warmup_min_lr {min_lr}: only 0 is supported")));
            }
        }
        if let Some(n) = lookup(&ds, "scheduler.params.warmup_num_steps").and_then(Value::as_u64) {
            if args.warmup_steps > 0 && args.warmup_steps != n {
                return Err(bad(format!("scheduler.params.warmup_num_steps {n} vs hf warmup_steps {}", args.warmup_steps)));
            }
            plan.warmup = Warmup::Steps(n);
        }
        plan.ds_total_steps = lookup(&ds, "scheduler.params.total_num_steps").and_then(Value::as_u64);
    }
    let ds_fp16 = lookup(&ds, "fp16.enabled").and_then(Value::as_bool).unwrap_or(false);
    let ds_bf16 = lookup(&ds, "bf16.enabled").and_then(Value::as_bool).unwrap_or(false);
    plan.precision = precision(fp16 || ds_fp16, bf16 || ds_bf16, false)?;
    if plan.precision == Precision::Fp16 {
        if let Some(scale) = lookup(&ds, "fp16.loss_scale").and_then(Value::as_f64) {
            if scale != 0.0 {
                return Err(bad(format!("fp16.loss_scale {scale}: only dynamic loss scaling (0) is supported")));
            }
        }
        let get = |key: &str, default: f64| lookup(&ds, key).and_then(Value::as_f64).unwrap_or(default);
        plan.loss_scaler = LossScaler {
            initial_scale_power: get("fp16.initial_scale_power", 16.0) as u32,
            window: get("fp16.loss_scale_window", 1000.0) as u32,
            hysteresis: get("fp16.hysteresis", 2.0) as u32,
            min_scale: get("fp16.min_loss_scale", 1.0),
            abort_at_min_scale: true,
        };
    }
    let stage = lookup(&ds, "zero_optimization.stage").and_then(Value::as_u64).unwrap_or(0);
    if stage > 2 {
        return Err(bad(format!("zero_optimization.stage {stage}: zerotune implements ZeRO stages 0-2")));
    }
    let offload = lookup(&ds, "zero_optimization.offload_optimizer.device").and_then(Value::as_str).unwrap_or("none");
    let bucket = match lookup(&ds, "zero_optimization.reduce_bucket_size") {
        None => DEFAULT_REDUCE_BUCKET,
        Some(v) => v.as_f64().filter(|&n| n >= 1.0).map(|n| n as usize).ok_or_else(|| {
            bad(format!("zero_optimization.reduce_bucket_size {v}: expected a positive number of elements (\"auto\" is not supported)"))
        })?,
    };
    plan.zero = Zero { stage: stage as u8, offload_optimizer: offload == "cpu", reduce_bucket_size: bucket };
    Ok(())
}

/// `a.b.c` lookup in nested JSON objects.
fn lookup<'a>(value: &'a Value, dotted: &str) -> Option<&'a Value> {
    dotted.split('.').try_fold(value, |v, key| v.get(key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: TrainArgs,
    }

    fn parse(extra: &[&str]) -> TrainArgs {
        let mut argv = vec![
            "x",
            "--config_name",
            "tiny",
            "--train_tokenizer",
            "400",
            "--train_file",
            "d.jsonl",
            "--output_dir",
            "o",
            "--do_train",
            "--device",
            "cpu",
            "--worker_bin",
            "/bin/true",
        ];
        argv.extend_from_slice(extra);
        Cli::parse_from(argv).args
    }

    fn ds(json: &str) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ds.json");
        std::fs::write(&path, json).unwrap();
        let path = path.to_string_lossy().into_owned();
        (dir, path)
    }

    #[test]
    fn fewer_hosts_keep_the_global_batch_with_more_accumulation() {
        let dir = tempfile::tempdir().unwrap();
        let hostfile = dir.path().join("hostfile");
        std::fs::write(&hostfile, "a slots=2\nb slots=1\nc slots=1\n").unwrap();
        let hostfile = hostfile.to_string_lossy().into_owned();
        let args = ["--hostfile", &hostfile, "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "3"];
        let plan = TrainPlan::resolve(&parse(&args)).unwrap();
        assert_eq!((plan.world_size, plan.micro_batch * plan.accumulation * plan.world_size), (4, 24));
        let lost = |hosts: &[&str]| hosts.iter().map(|h| h.to_string()).collect::<BTreeSet<String>>();

        let fewer = plan.without_hosts(&lost(&["a"])).unwrap();
        assert_eq!((fewer.world_size, fewer.accumulation, fewer.micro_batch), (2, 6, 2));
        let ranks: Vec<(usize, &str, usize)> = fewer.placements.iter().map(|p| (p.rank, p.host.as_str(), p.slot)).collect();
        assert_eq!(ranks, [(0, "b", 0), (1, "c", 0)], "renumbered in order, slots kept");
        assert_eq!(plan.without_hosts(&lost(&["b"])).unwrap().accumulation, 4);
        let one = plan.without_hosts(&lost(&["a", "c"])).unwrap();
        assert_eq!((one.world_size, one.accumulation, one.placements[0].host.as_str()), (1, 12, "b"));

        let err = plan.without_hosts(&lost(&["a", "b", "c"])).unwrap_err().to_string();
        assert!(err.contains("no rank is left") && err.contains("a, b, c"), "{err}");
        let args = ["--hostfile", &hostfile, "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1"];
        let err = TrainPlan::resolve(&parse(&args)).unwrap().without_hosts(&lost(&["b"])).unwrap_err().to_string();
        assert!(
            err.contains("without b, 3 rank(s) are left and cannot keep the global batch of 4 (micro 1 x accumulation 1 x world 4)"),
            "{err}"
        );
    }

    #[test]
    fn auto_values_take_the_flags() {
        let (_d, path) = ds(r#"{"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto", "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
            "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
            "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}"#);
        let plan =
            TrainPlan::resolve(&parse(&["--deepspeed", &path, "--per_device_train_batch_size", "2", "--learning_rate", "1e-3"])).unwrap();
        assert_eq!((plan.micro_batch, plan.optimizer.lr), (2, 1e-3));
        assert_eq!(plan.zero, Zero { stage: 2, offload_optimizer: true, reduce_bucket_size: DEFAULT_REDUCE_BUCKET });
    }

    #[test]
    fn mismatches_name_every_factor() {
        let (_d, path) = ds(r#"{"train_micro_batch_size_per_gpu": 4, "train_batch_size": 96, "gradient_accumulation_steps": 8}"#);
        let err =
            TrainPlan::resolve(&parse(&["--deepspeed", &path, "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "8"]))
                .unwrap_err()
                .to_string();
        assert!(err.contains("train_batch_size=96 vs hf world 1 x micro 4 x accumulation 8=32"), "{err}");
        assert!(!err.contains("train_micro_batch_size_per_gpu="), "{err}");
    }

    #[test]
    fn log_warmup_and_stage_3_are_refused_clearly() {
        let (_d, path) = ds(r#"{"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}}}"#);
        let err = TrainPlan::resolve(&parse(&["--deepspeed", &path])).unwrap_err().to_string();
        assert!(err.contains("warmup_type \"log\""), "{err}");
        let (_d, path) = ds(r#"{"zero_optimization": {"stage": 3}}"#);
        assert!(TrainPlan::resolve(&parse(&["--deepspeed", &path])).unwrap_err().to_string().contains("stage 3"));
        let (_d, path) = ds(r#"{"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}"#);
        let err = TrainPlan::resolve(&parse(&["--deepspeed", &path])).unwrap_err().to_string();
        assert!(err.contains("reduce_bucket_size \"auto\": expected a positive number"), "{err}");
        let (_d, path) = ds(r#"{"zero_optimization": {"stage": 2, "reduce_bucket_size": 2e8}}"#);
        assert_eq!(TrainPlan::resolve(&parse(&["--deepspeed", &path])).unwrap().zero.reduce_bucket_size, 200_000_000);
    }

    #[test]
    fn flag_errors() {
        assert!(TrainPlan::resolve(&parse(&["--fp16"])).unwrap_err().to_string().contains("--fp16 needs a GPU"));
        assert!(TrainPlan::resolve(&parse(&["--lr_scheduler_type", "poly"])).unwrap_err().to_string().contains("--lr_scheduler_type"));
        let mut args = parse(&[]);
        args.do_train = false;
        assert!(TrainPlan::resolve(&args).unwrap_err().to_string().contains("--do_train"));
        let plan = TrainPlan::resolve(&parse(&["--fp16", "false", "--warmup_ratio", "0.1"])).unwrap();
        assert_eq!((plan.precision, plan.warmup_steps(95)), (Precision::Fp32, 10));
    }
}
