//! Flags and the DeepSpeed config resolved into a `TrainPlan`: every number checked before
//! anything is written, the model and tokenizer chosen, `--device auto` decided, each section of
//! the plan built from its flags, then the ds_config and the precision rule applied.

use std::path::{Path, PathBuf};
use std::time::Duration;

use zerotune_hf::manifest::NonFinite;
use zerotune_hf::ModelConfig;
use zerotune_proto::plan::{AdamW, LossScaler, Precision, DEFAULT_REDUCE_BUCKET};

use super::placement;
use super::{
    BatchPlan, DataArgs, DataPlan, Device, DeviceSpec, DsConfig, LaunchArgs, LaunchPlan, ModelArgs, ModelChoice, OutputPlan, Purpose,
    TokenizerChoice, TrainArgs, TrainPlan, TrainingArgs, TrainingPlan, Warmup, ZeroSettings,
};
use crate::error::{os_err, CoordinatorError, Result};

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
        let t = &args.training;
        if !t.do_train {
            return Err(CoordinatorError::flags(
                &["--do_train"],
                "nothing to do: pass --do_train (evaluation-only runs are not supported yet)",
            ));
        }
        check_numbers(t)?;
        let (model, tokenizer) = model_and_tokenizer(&args.model, purpose)?;
        let device = resolve_device(&args.launch, purpose);
        let output_dir = needed(&t.output_dir, purpose, "--output_dir", "where the run writes its checkpoints and model")?;
        let (batch, data) = (batch_plan(t)?, args.data.plan_for(purpose)?);
        // Last: it looks for the worker binary and reads the TLS files, after every flag's check.
        let launch = launch_plan(&args.launch, device, purpose)?;
        let mut plan = Self {
            purpose,
            model,
            tokenizer,
            batch,
            data,
            training: training_plan(t),
            // Without a ds_config: ranks keep whole optimizers, and a CPU rank's optimizer is
            // already in host memory, so it runs the host kernel.
            zero: ZeroSettings { stage: 0, offload_optimizer: device == Device::Cpu, reduce_bucket_size: DEFAULT_REDUCE_BUCKET },
            output: output_plan(t, output_dir),
            launch,
        };
        apply_precision(&mut plan, args)?;
        Ok(plan)
    }
}

/// The precision: the ds_config's when there is one, else --fp16 / --bf16 (bf16 by default on a
/// GPU unless --bf16 false); fp16 needs a GPU.
fn apply_precision(plan: &mut TrainPlan, args: &TrainArgs) -> Result<()> {
    let (t, device) = (&args.training, plan.launch.device);
    let (fp16, bf16) = (t.fp16.unwrap_or(false), t.bf16.unwrap_or(false));
    if let Some(path) = &t.deepspeed {
        DsConfig::read(path)?.apply(plan, args, path)?;
    } else {
        plan.training.precision = precision(fp16, bf16, t.bf16.is_none() && device != Device::Cpu)?;
    }
    if plan.training.precision == Precision::Fp16 && device == Device::Cpu {
        return Err(CoordinatorError::flags(
            &["--fp16", "--device"],
            "--fp16 needs a GPU (--device cuda); on CPU train in fp32 (the default) or --bf16",
        ));
    }
    Ok(())
}

/// The batch sizes, each at least 1.
fn batch_plan(t: &TrainingArgs) -> Result<BatchPlan> {
    for (name, value) in [
        ("--per_device_train_batch_size", t.per_device_train_batch_size),
        ("--per_device_eval_batch_size", t.per_device_eval_batch_size),
        ("--gradient_accumulation_steps", t.gradient_accumulation_steps),
    ] {
        if value == 0 {
            return Err(CoordinatorError::flag(name, value, "must be at least 1"));
        }
    }
    Ok(BatchPlan { micro: t.per_device_train_batch_size, eval: t.per_device_eval_batch_size, accumulation: t.gradient_accumulation_steps })
}

/// The optimization as the flags give it, in fp32 until the precision is applied.
fn training_plan(t: &TrainingArgs) -> TrainingPlan {
    TrainingPlan {
        epochs: t.num_train_epochs,
        max_steps: (t.max_steps > 0).then_some(t.max_steps as u64),
        warmup: if t.warmup_steps > 0 { Warmup::Steps(t.warmup_steps) } else { Warmup::Ratio(t.warmup_ratio) },
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
    }
}

/// What the run writes, when, and what it resumes from.
fn output_plan(t: &TrainingArgs, dir: PathBuf) -> OutputPlan {
    OutputPlan {
        dir,
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
    }
}

/// Where the ranks run and how they are started; an estimate needs no worker binary or TLS files.
fn launch_plan(l: &LaunchArgs, device: Device, purpose: Purpose) -> Result<LaunchPlan> {
    let (placements, launcher) = placement::placements_and_launcher(l, device, purpose)?;
    let estimate = purpose == Purpose::Estimate;
    let gpu_memory = planned_memory(l, device)?;
    Ok(LaunchPlan {
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
    })
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

pub(super) fn precision(fp16: bool, bf16: bool, gpu_default_bf16: bool) -> Result<Precision> {
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
pub fn config_by_name(name: &str) -> Result<ModelConfig> {
    if let Some(config) = ModelConfig::builtin(name) {
        return Ok(config);
    }
    let path = Path::new(name);
    if path.is_dir() {
        return Ok(ModelConfig::from_dir(path)?);
    }
    if path.is_file() {
        return Ok(ModelConfig::from_file(path)?);
    }
    let reason = format!("not a built-in config ({}) nor a config.json path", ModelConfig::builtin_names());
    Err(CoordinatorError::flag("--config_name", format!("{name:?}"), reason))
}
