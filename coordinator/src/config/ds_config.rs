//! `--deepspeed ds_config.json`, read as HF Trainer reads it: `"auto"` takes the flag's value,
//! any other value must agree with the flag; batch, optimizer, scheduler, precision and ZeRO
//! settings come into the plan. Keys are typed; a key DeepSpeed does not have (a typo such as
//! `zero_optimisation`) is refused by name, and the DeepSpeed keys zerotune does not apply (its
//! behaviour is fixed, or the feature is another tool's; `ds_keys.rs`) are accepted and ignored.

use std::collections::BTreeMap;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use zerotune_proto::plan::{LossScaler, Precision, ScheduleKind, DEFAULT_REDUCE_BUCKET};

use super::args::{TrainArgs, TrainingArgs};
use super::ds_keys;
use super::resolve::precision;
use super::{TrainPlan, Warmup, ZeroSettings};
use crate::error::{CoordinatorError, Result};

/// A value that may be `"auto"`: HF Trainer fills it from the matching flag.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Auto<T> {
    Auto,
    Value(T),
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Auto<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        if value == "auto" {
            return Ok(Self::Auto);
        }
        T::deserialize(value).map(Self::Value).map_err(serde::de::Error::custom)
    }
}

impl<T> Auto<T> {
    fn value(&self) -> Option<&T> {
        match self {
            Self::Auto => None,
            Self::Value(v) => Some(v),
        }
    }
}

/// Keys of a section that are not fields of its struct, checked against what DeepSpeed accepts.
type Rest = BTreeMap<String, Value>;

/// The parts of a DeepSpeed config that zerotune applies.
#[derive(Debug, Default, Deserialize)]
pub struct DsConfig {
    train_batch_size: Option<Auto<u64>>,
    train_micro_batch_size_per_gpu: Option<Auto<u64>>,
    gradient_accumulation_steps: Option<Auto<u64>>,
    gradient_clipping: Option<Auto<f64>>,
    optimizer: Option<Optimizer>,
    scheduler: Option<Scheduler>,
    fp16: Option<Fp16>,
    bf16: Option<Enabled>,
    zero_optimization: Option<ZeroSection>,
    /// Present: every block's activations are recomputed in the backward pass (as
    /// --gradient_checkpointing); its keys tune DeepSpeed's own implementation (accepted, `ds_keys.rs`).
    activation_checkpointing: Option<Rest>,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Debug, Deserialize)]
struct Optimizer {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    params: OptimizerParams,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Debug, Default, Deserialize)]
struct OptimizerParams {
    lr: Option<Auto<f64>>,
    betas: Option<Auto<[f64; 2]>>,
    eps: Option<Auto<f64>>,
    weight_decay: Option<Auto<f64>>,
    adam_w_mode: Option<bool>,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Debug, Deserialize)]
struct Scheduler {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    params: SchedulerParams,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Debug, Default, Deserialize)]
struct SchedulerParams {
    warmup_min_lr: Option<Auto<f64>>,
    warmup_max_lr: Option<Auto<f64>>,
    warmup_num_steps: Option<Auto<u64>>,
    warmup_type: Option<String>,
    total_num_steps: Option<Auto<u64>>,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Debug, Default, Deserialize)]
struct Fp16 {
    enabled: Option<Auto<bool>>,
    loss_scale: Option<f64>,
    initial_scale_power: Option<f64>,
    loss_scale_window: Option<f64>,
    hysteresis: Option<f64>,
    min_loss_scale: Option<f64>,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Debug, Default, Deserialize)]
struct Enabled {
    enabled: Option<Auto<bool>>,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Debug, Default, Deserialize)]
struct ZeroSection {
    stage: Option<u8>,
    offload_optimizer: Option<Offload>,
    reduce_bucket_size: Option<Auto<f64>>,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Debug, Default, Deserialize)]
struct Offload {
    device: Option<OffloadDevice>,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
enum OffloadDevice {
    None,
    Cpu,
    Nvme,
}

impl DsConfig {
    /// Reads and checks `path`: JSON syntax, every value's type, and every key's name.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(crate::error::io_err(path))?;
        let bad = |reason: String| CoordinatorError::DsConfig { path: path.into(), reason };
        let value: Value = serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let config: Self = serde_path_to_error::deserialize(value).map_err(|e| bad(format!("{}: {}", e.path(), e.inner())))?;
        // A ZeRO-3 config has keys of its own: say first that the stage is the matter.
        if let Some(stage) = config.zero_optimization.as_ref().and_then(|z| z.stage).filter(|&s| s > 2) {
            return Err(bad(format!("zero_optimization.stage {stage}: zerotune implements ZeRO stages 0-2")));
        }
        let unknown = config.unknown_keys();
        if !unknown.is_empty() {
            return Err(bad(format!(
                "{} (DeepSpeed has no such key; check the spelling, or remove it)",
                unknown.iter().map(|key| ds_keys::describe_unknown(key)).collect::<Vec<_>>().join("; ")
            )));
        }
        Ok(config)
    }

    /// Dotted names of the keys no section knows.
    fn unknown_keys(&self) -> Vec<String> {
        let zero = self.zero_optimization.as_ref();
        let sections: [(&str, Option<&Rest>); 9] = [
            ("", Some(&self.rest)),
            ("activation_checkpointing", self.activation_checkpointing.as_ref()),
            ("optimizer", self.optimizer.as_ref().map(|o| &o.rest)),
            ("optimizer.params", self.optimizer.as_ref().map(|o| &o.params.rest)),
            ("scheduler", self.scheduler.as_ref().map(|s| &s.rest)),
            ("scheduler.params", self.scheduler.as_ref().map(|s| &s.params.rest)),
            ("fp16", self.fp16.as_ref().map(|f| &f.rest)),
            ("zero_optimization", zero.map(|z| &z.rest)),
            ("zero_optimization.offload_optimizer", zero.and_then(|z| z.offload_optimizer.as_ref()).map(|o| &o.rest)),
        ];
        let bf16 = ("bf16", self.bf16.as_ref().map(|b| &b.rest));
        let mut unknown = vec![];
        for (section, rest) in sections.into_iter().chain([bf16]) {
            let accepted = ds_keys::accepted(section);
            for key in rest.into_iter().flat_map(|r| r.keys()) {
                if !accepted.contains(&key.as_str()) {
                    unknown.push(if section.is_empty() { key.clone() } else { format!("{section}.{key}") });
                }
            }
        }
        unknown
    }
}

impl Fp16 {
    /// The dynamic loss scaler the section asks for (a fixed `loss_scale` is refused).
    fn loss_scaler(&self) -> std::result::Result<LossScaler, String> {
        if let Some(scale) = self.loss_scale.filter(|&s| s != 0.0) {
            return Err(format!("fp16.loss_scale {scale}: only dynamic loss scaling (0) is supported"));
        }
        let default = LossScaler::default();
        // Whole numbers in range (DeepSpeed configs often write 1e3, or 1000.0).
        let whole = |key: &str, value: Option<f64>, default: u32, range: std::ops::RangeInclusive<u32>| match value {
            None => Ok(default),
            Some(v) if v.fract() == 0.0 && range.contains(&(v as u32)) && v >= 0.0 => Ok(v as u32),
            Some(v) => Err(format!("fp16.{key} {v}: expected a whole number in [{}, {}]", range.start(), range.end())),
        };
        let min_scale = self.min_loss_scale.unwrap_or(default.min_scale);
        if !(min_scale.is_finite() && min_scale > 0.0) {
            return Err(format!("fp16.min_loss_scale {min_scale}: expected a finite number above 0"));
        }
        Ok(LossScaler {
            // 2^64 and beyond is no longer a finite fp32 scale.
            initial_scale_power: whole("initial_scale_power", self.initial_scale_power, default.initial_scale_power, 0..=63)?,
            window: whole("loss_scale_window", self.loss_scale_window, default.window, 1..=u32::MAX)?,
            hysteresis: whole("hysteresis", self.hysteresis, default.hysteresis, 1..=u32::MAX)?,
            min_scale,
            abort_at_min_scale: true,
        })
    }
}

/// Collects the values that disagree with the command line.
#[derive(Default)]
struct Agreement(Vec<String>);

impl Agreement {
    fn check<T: Serialize>(&mut self, key: &str, ds: Option<&Auto<T>>, hf_name: &str, hf: impl Serialize) {
        let Some(ds) = ds.and_then(Auto::value) else { return };
        let (ds, hf) = (serde_json::to_value(ds).unwrap_or_default(), serde_json::to_value(hf).unwrap_or_default());
        let equal = match (ds.as_f64(), hf.as_f64()) {
            (Some(a), Some(b)) => (a - b).abs() <= 1e-12 * b.abs().max(1.0),
            _ => ds == hf,
        };
        if !equal {
            self.0.push(format!("- ds {key}={ds} vs hf {hf_name}={hf}"));
        }
    }
}

impl DsConfig {
    /// Checks the values against the flags and applies the config's settings to `plan`.
    pub fn apply(&self, plan: &mut TrainPlan, args: &TrainArgs, path: &Path) -> Result<()> {
        let bad = |reason: String| CoordinatorError::DsConfig { path: path.into(), reason };
        let t = &args.training;
        let disagreements = self.disagreements(t, plan.world_size());
        if !disagreements.is_empty() {
            return Err(bad(format!(
                "values that mismatch the command line (set them to \"auto\" or make them agree):\n{}",
                disagreements.join("\n")
            )));
        }
        self.check_optimizer().map_err(bad)?;
        if let Some(scheduler) = &self.scheduler {
            self.apply_scheduler(scheduler, plan, args).map_err(bad)?;
        }
        let enabled = |section: Option<&Auto<bool>>| section.and_then(Auto::value).copied().unwrap_or(false);
        let ds_fp16 = enabled(self.fp16.as_ref().and_then(|f| f.enabled.as_ref()));
        let ds_bf16 = enabled(self.bf16.as_ref().and_then(|b| b.enabled.as_ref()));
        plan.training.precision = precision(t.fp16.unwrap_or(false) || ds_fp16, t.bf16.unwrap_or(false) || ds_bf16, false)?;
        if let (Precision::Fp16, Some(f)) = (plan.training.precision, &self.fp16) {
            plan.training.loss_scaler = f.loss_scaler().map_err(bad)?;
        }
        plan.zero = self.zero().map_err(bad)?;
        plan.training.gradient_checkpointing |= self.activation_checkpointing.is_some();
        Ok(())
    }

    /// Each value the config sets (not "auto") that differs from the command line's, with both.
    fn disagreements(&self, t: &TrainingArgs, world: usize) -> Vec<String> {
        let (fp16, bf16) = (t.fp16.unwrap_or(false), t.bf16.unwrap_or(false));
        let params = self.optimizer.as_ref().map(|o| &o.params);
        let scheduler = self.scheduler.as_ref().map(|s| &s.params);
        let (micro, accumulation) = (t.per_device_train_batch_size, t.gradient_accumulation_steps);
        let factors = format!("world {world} x micro {micro} x accumulation {accumulation}");
        let mut a = Agreement::default();
        a.check("train_micro_batch_size_per_gpu", self.train_micro_batch_size_per_gpu.as_ref(), "per_device_train_batch_size", micro);
        a.check("gradient_accumulation_steps", self.gradient_accumulation_steps.as_ref(), "gradient_accumulation_steps", accumulation);
        a.check("train_batch_size", self.train_batch_size.as_ref(), &factors, world * micro * accumulation);
        a.check("gradient_clipping", self.gradient_clipping.as_ref(), "max_grad_norm", t.max_grad_norm);
        a.check("optimizer.params.lr", params.and_then(|p| p.lr.as_ref()), "learning_rate", t.learning_rate);
        a.check("optimizer.params.betas", params.and_then(|p| p.betas.as_ref()), "adam_beta1/adam_beta2", [t.adam_beta1, t.adam_beta2]);
        a.check("optimizer.params.eps", params.and_then(|p| p.eps.as_ref()), "adam_epsilon", t.adam_epsilon);
        a.check("optimizer.params.weight_decay", params.and_then(|p| p.weight_decay.as_ref()), "weight_decay", t.weight_decay);
        a.check("fp16.enabled", self.fp16.as_ref().and_then(|f| f.enabled.as_ref()), "fp16", fp16);
        a.check("bf16.enabled", self.bf16.as_ref().and_then(|b| b.enabled.as_ref()), "bf16", bf16);
        a.check("scheduler.params.warmup_max_lr", scheduler.and_then(|s| s.warmup_max_lr.as_ref()), "learning_rate", t.learning_rate);
        a.0
    }

    /// Only Adam with decoupled weight decay (AdamW) is trained.
    fn check_optimizer(&self) -> std::result::Result<(), String> {
        let Some(optimizer) = &self.optimizer else { return Ok(()) };
        match optimizer.kind.as_str() {
            "AdamW" => Ok(()),
            "Adam" if optimizer.params.adam_w_mode == Some(false) => {
                Err("optimizer.params.adam_w_mode false (L2-coupled Adam) is not supported".into())
            }
            "Adam" => Ok(()),
            kind => Err(format!("optimizer.type {kind:?}: only Adam/AdamW (decoupled weight decay) is supported")),
        }
    }

    fn apply_scheduler(&self, scheduler: &Scheduler, plan: &mut TrainPlan, args: &TrainArgs) -> std::result::Result<(), String> {
        let params = &scheduler.params;
        plan.training.schedule = match scheduler.kind.as_str() {
            "WarmupLR" => ScheduleKind::ConstantWithWarmup,
            "WarmupDecayLR" => ScheduleKind::Linear,
            "WarmupCosineLR" => ScheduleKind::Cosine,
            other => return Err(format!("scheduler.type {other:?}: supported are WarmupLR, WarmupDecayLR, WarmupCosineLR")),
        };
        let warmup_type = params.warmup_type.as_deref().unwrap_or("log");
        if scheduler.kind != "WarmupCosineLR" && warmup_type != "linear" {
            return Err(format!("scheduler.params.warmup_type {warmup_type:?}: only \"linear\" warmup is supported (DeepSpeed defaults to \"log\"); set it, or drop the scheduler block to use --lr_scheduler_type"));
        }
        if let Some(&min_lr) = params.warmup_min_lr.as_ref().and_then(Auto::value) {
            if min_lr != 0.0 {
                return Err(format!("scheduler.params.warmup_min_lr {min_lr}: only 0 is supported"));
            }
        }
        if let Some(&n) = params.warmup_num_steps.as_ref().and_then(Auto::value) {
            let flag_steps = args.training.warmup_steps;
            if flag_steps > 0 && flag_steps != n {
                return Err(format!("scheduler.params.warmup_num_steps {n} vs hf warmup_steps {flag_steps}"));
            }
            plan.training.warmup = Warmup::Steps(n);
        }
        plan.training.ds_total_steps = params.total_num_steps.as_ref().and_then(Auto::value).copied();
        Ok(())
    }

    fn zero(&self) -> std::result::Result<ZeroSettings, String> {
        let section = self.zero_optimization.as_ref();
        let stage = section.and_then(|z| z.stage).unwrap_or(0);
        if stage > 2 {
            return Err(format!("zero_optimization.stage {stage}: zerotune implements ZeRO stages 0-2"));
        }
        let device = section.and_then(|z| z.offload_optimizer.as_ref()).and_then(|o| o.device).unwrap_or(OffloadDevice::None);
        if device == OffloadDevice::Nvme {
            return Err("zero_optimization.offload_optimizer.device \"nvme\": zerotune offloads to \"cpu\" only".into());
        }
        let reduce_bucket_size = match section.and_then(|z| z.reduce_bucket_size) {
            None => DEFAULT_REDUCE_BUCKET,
            Some(Auto::Value(n)) if n >= 1.0 && n.fract() == 0.0 => n as usize,
            Some(v) => {
                let shown = match v {
                    Auto::Auto => "\"auto\"".to_string(),
                    Auto::Value(n) => n.to_string(),
                };
                return Err(format!(
                    "zero_optimization.reduce_bucket_size {shown}: expected a positive number of elements (\"auto\" is not supported)"
                ));
            }
        };
        Ok(ZeroSettings { stage, offload_optimizer: device == OffloadDevice::Cpu, reduce_bucket_size })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(json: &str) -> Result<DsConfig> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ds.json");
        std::fs::write(&path, json).unwrap();
        DsConfig::read(&path)
    }

    #[test]
    fn a_misspelled_key_is_refused_by_name_with_a_suggestion() {
        let err = read(r#"{"zero_optimisation": {"stage": 2}}"#).unwrap_err().to_string();
        assert!(err.contains("unknown key zero_optimisation (did you mean zero_optimization?)"), "{err}");
        let err = read(r#"{"zero_optimization": {"stage": 2, "offload_optimizer": {"devise": "cpu"}}}"#).unwrap_err().to_string();
        assert!(err.contains("unknown key zero_optimization.offload_optimizer.devise (did you mean device?)"), "{err}");
        let err = read(r#"{"fp16": {"enabled": true, "intial_scale_power": 8}, "bogus": 1}"#).unwrap_err().to_string();
        assert!(err.contains("unknown key bogus;") && err.contains("fp16.intial_scale_power (did you mean initial_scale_power?)"), "{err}");
    }

    #[test]
    fn hf_s_zero2_config_reads_with_its_no_effect_keys() {
        let config = read(
            r#"{"fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16, "hysteresis": 2, "min_loss_scale": 1},
            "bf16": {"enabled": "auto"},
            "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
            "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto", "total_num_steps": "auto", "warmup_type": "linear"}},
            "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": true}, "allgather_partitions": true,
                "allgather_bucket_size": 2e8, "overlap_comm": true, "reduce_scatter": true, "reduce_bucket_size": 2e8, "contiguous_gradients": true},
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "steps_per_print": 2000,
            "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "wall_clock_breakdown": false}"#,
        )
        .unwrap();
        assert_eq!(config.zero().unwrap(), ZeroSettings { stage: 2, offload_optimizer: true, reduce_bucket_size: 200_000_000 });
        assert_eq!(config.fp16.as_ref().unwrap().enabled, Some(Auto::Auto));
    }

    #[test]
    fn activation_checkpointing_is_read_with_its_keys() {
        let config = read(
            r#"{"activation_checkpointing": {"partition_activations": false, "cpu_checkpointing": false, "number_checkpoints": null}}"#,
        )
        .unwrap();
        assert!(config.activation_checkpointing.is_some());
        assert!(read("{}").unwrap().activation_checkpointing.is_none());
        let err = read(r#"{"activation_checkpointing": {"partition_activation": true}}"#).unwrap_err().to_string();
        assert!(err.contains("unknown key activation_checkpointing.partition_activation (did you mean partition_activations?)"), "{err}");
    }

    #[test]
    fn wrong_types_name_their_key() {
        let err = read(r#"{"zero_optimization": {"stage": "two"}}"#).unwrap_err().to_string();
        assert!(err.contains("zero_optimization.stage: invalid type: string \"two\""), "{err}");
        let err = read(r#"{"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": "auto"}}"#).unwrap_err().to_string();
        assert!(err.contains("zero_optimization.stage 3: zerotune implements ZeRO stages 0-2"), "{err}");
        let err = read(r#"{"train_batch_size": -4}"#).unwrap_err().to_string();
        assert!(err.contains("train_batch_size: invalid value: integer `-4`"), "{err}");
        let err = read(r#"{"zero_optimization": {"offload_optimizer": {"device": "gpu"}}}"#).unwrap_err().to_string();
        assert!(err.contains("zero_optimization.offload_optimizer.device: unknown variant `gpu`"), "{err}");
        assert!(read("{").unwrap_err().to_string().contains("not valid JSON"));
    }
}
