//! One rank's training state and step: forward/backward per micro-batch with gradients added to
//! an fp32 flat accumulator, then at the accumulation boundary the fp16 overflow check, global
//! norm, clipping and AdamW on fp32 master weights in host memory, and the new weights written
//! back into the flat compute buffer (the ZeRO-2 + offload step at world size 1).

use std::path::Path;

use tch::{Device, Kind, Tensor};
use zerotune_hf::write::write_json;
use zerotune_hf::CodeGenConfig;
use zerotune_proto::plan::{ModelSource, Precision, WorkerPlan};

use crate::checkpoint::{flat_to_f32, load_weights, save_model};
use crate::error::{io_err, Result, WorkerError};
use crate::model::{CodeGen, ParamSet};
use crate::optim::adamw::{all_finite, sum_of_squares, AdamState, Segment};
use crate::optim::loss_scale::LossScaler;
use crate::optim::schedule::learning_rate;

/// What one optimizer step did, for the coordinator's metrics.
#[derive(Clone, Debug, PartialEq)]
pub struct StepOutcome {
    pub loss: f64,
    pub learning_rate: f64,
    pub grad_norm: f64,
    pub tokens: u64,
    pub skipped: bool,
    pub loss_scale: f64,
}

pub struct Trainer {
    pub config: CodeGenConfig,
    plan: WorkerPlan,
    device: Device,
    params: ParamSet,
    model: CodeGen,
    /// Sum over the current accumulation window of each micro-batch's gradient, fp32, on device.
    grad_acc: Tensor,
    /// Host copy of `grad_acc` for the optimizer (the accumulator itself on CPU).
    grad_host: Tensor,
    adam: AdamState,
    segments: Vec<Segment>,
    scaler: Option<LossScaler>,
    /// Optimizer steps processed, skipped ones included.
    pub step: u64,
}

/// Loads `source` into a fresh `ParamSet` of `kind` on `device`.
pub fn load_params(source: &ModelSource, kind: Kind, device: Device, trainable: bool, seed: u64) -> Result<(CodeGenConfig, ParamSet)> {
    match source {
        ModelSource::Pretrained { dir } => {
            let dir = Path::new(dir);
            let config = CodeGenConfig::from_dir(dir)?;
            let mut params = ParamSet::zeros(&config, kind, device, trainable);
            load_weights(&mut params, dir)?;
            Ok((config, params))
        }
        ModelSource::Scratch { config } => {
            let config = CodeGenConfig::from_value(config.clone())
                .map_err(|m| WorkerError::Invalid(format!("invalid model config from the coordinator: {m}")))?;
            let mut params = ParamSet::zeros(&config, kind, device, trainable);
            params.init_like_hf(&config, seed);
            Ok((config, params))
        }
    }
}

impl Trainer {
    pub fn new(plan: WorkerPlan, device: Device) -> Result<Self> {
        let kind = match plan.precision {
            Precision::Fp32 => Kind::Float,
            Precision::Bf16 => Kind::BFloat16,
            Precision::Fp16 => Kind::Half,
        };
        tch::manual_seed(plan.seed as i64);
        let (config, params) = load_params(&plan.model, kind, device, true, plan.seed)?;
        let master = flat_to_f32(&params);
        let n = master.len() as i64;
        let grad_acc = Tensor::zeros([n], (Kind::Float, device));
        let grad_host = if device == Device::Cpu {
            grad_acc.shallow_clone()
        } else {
            Tensor::zeros([n], (Kind::Float, Device::Cpu)).pin_memory(device)
        };
        let segments = decay_segments(&params);
        let scaler = (plan.precision == Precision::Fp16).then(|| LossScaler::new(plan.loss_scaler));
        let model = CodeGen::new(&config, &params);
        Ok(Self { config, plan, device, params, model, grad_acc, grad_host, adam: AdamState::new(master), segments, scaler, step: 0 })
    }

    /// The fp32 master weights (flat, in the layout of `slots`).
    pub fn master(&self) -> &[f32] {
        &self.adam.master
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// One optimizer step over `micro_batches` (each (B, T) int64 on the device).
    pub fn train_step(&mut self, micro_batches: &[Tensor]) -> Result<StepOutcome> {
        self.step += 1;
        let accumulation = micro_batches.len() as f64;
        let scale = self.scaler.as_ref().map_or(1.0, |s| s.scale);
        // Summed on the device and read once per step: no host sync per micro-batch.
        let mut loss_sum = Tensor::zeros([], (Kind::Double, self.device));
        let mut tokens = 0u64;
        for ids in micro_batches {
            let (b, t) = ids.size2()?;
            tokens += (b * t) as u64;
            let loss = self.model.loss(ids, true);
            loss_sum += loss.detach().to_kind(Kind::Double);
            (loss * scale / accumulation).f_backward()?;
            self.accumulate_grads()?;
        }
        let loss = loss_sum.f_double_value(&[])? / accumulation;
        if !loss.is_finite() && self.scaler.is_none() {
            return Err(WorkerError::NonFiniteLoss { step: self.step, loss });
        }
        if self.device != Device::Cpu {
            self.grad_host.f_copy_(&self.grad_acc)?; // on CPU they are the same buffer
        }
        let outcome = self.optimizer_step(scale, loss, tokens);
        let _ = self.grad_acc.f_zero_()?;
        outcome
    }

    fn accumulate_grads(&mut self) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for (slot, tensor) in self.params.slots.iter().zip(&self.params.tensors) {
            let grad = tensor.grad();
            if grad.defined() {
                let _ = self.grad_acc.narrow(0, slot.offset as i64, slot.numel as i64).f_add_(&grad.view(-1))?;
            }
        }
        self.params.zero_grads();
        Ok(())
    }

    fn optimizer_step(&mut self, scale: f64, loss: f64, tokens: u64) -> Result<StepOutcome> {
        let grad = host_slice(&self.grad_host);
        let mut outcome = StepOutcome { loss, learning_rate: 0.0, grad_norm: 0.0, tokens, skipped: false, loss_scale: scale };
        if let Some(scaler) = self.scaler.as_mut() {
            let overflow = !all_finite(grad);
            scaler.update(overflow)?;
            outcome.loss_scale = scaler.scale;
            if overflow {
                outcome.skipped = true;
                return Ok(outcome);
            }
        }
        let grad_norm = sum_of_squares(grad).sqrt() / scale;
        if !grad_norm.is_finite() {
            return Err(WorkerError::NonFiniteGradients { step: self.step, norm: grad_norm });
        }
        let max_norm = self.plan.max_grad_norm;
        let clip = if max_norm > 0.0 { (max_norm / (grad_norm + 1e-6)).min(1.0) } else { 1.0 };
        let lr = learning_rate(self.plan.optimizer.lr, &self.plan.schedule, self.adam.steps);
        self.adam.step(grad, ((1.0 / scale) * clip) as f32, lr, &self.plan.optimizer, &self.segments);
        self.upload_master()?;
        outcome.learning_rate = lr;
        outcome.grad_norm = grad_norm;
        Ok(outcome)
    }

    /// Writes the fp32 master weights into the compute buffer (cast to its dtype).
    fn upload_master(&mut self) -> Result<()> {
        let master = &self.adam.master;
        // SAFETY: `master` outlives `host`, which is only read by the copy below.
        let host = unsafe { Tensor::f_from_blob(master.as_ptr() as *const u8, &[master.len() as i64], &[1], Kind::Float, Device::Cpu)? };
        let host = if self.params.flat.kind() == Kind::Float { host } else { host.f_to_kind(self.params.flat.kind())? };
        let _guard = tch::no_grad_guard();
        self.params.flat.f_copy_(&host)?;
        Ok(())
    }

    /// Summed token loss and token count over `batches`, without gradients.
    pub fn evaluate(&self, batches: &[Tensor]) -> Result<(f64, u64)> {
        let _guard = tch::no_grad_guard();
        let mut sum = 0.0;
        let mut tokens = 0;
        for ids in batches {
            let (b, t) = ids.size2()?;
            sum += self.model.loss_sum(ids).f_double_value(&[])?;
            tokens += (b * (t - 1)) as u64;
        }
        Ok((sum, tokens))
    }

    /// Writes the model (HF layout, fp32 master weights) into `dir`.
    pub fn save_model(&self, dir: &Path) -> Result<()> {
        save_model(dir, &self.config, &self.params, &self.adam.master)
    }

    /// Writes this rank's optimizer slice (master, exp_avg, exp_avg_sq) and its layout into `dir`.
    pub fn save_optimizer(&self, dir: &Path, rank: u32, world_size: u32) -> Result<()> {
        use zerotune_hf::RawTensor;
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let n = self.adam.master.len();
        let state = [("master", &self.adam.master), ("exp_avg", &self.adam.exp_avg), ("exp_avg_sq", &self.adam.exp_avg_sq)]
            .map(|(name, values)| (name.to_string(), RawTensor::from_f32(vec![n], values)));
        let file = dir.join(format!("rank-{rank:05}-of-{world_size:05}.safetensors"));
        zerotune_hf::write::write_file(&file, &state)?;
        let slots: Vec<_> =
            self.params.slots.iter().map(|s| serde_json::json!({"name": s.name, "shape": s.shape, "offset": s.offset})).collect();
        let layout = serde_json::json!({
            "world_size": world_size,
            "numel": n,
            "partitions": [[0, n]],
            "adam_steps": self.adam.steps,
            "loss_scaler": self.scaler,
            "slots": slots,
        });
        write_json(&dir.join("layout.json"), &layout)?;
        Ok(())
    }
}

/// Runs of parameters with the same weight-decay rule, in flat order.
fn decay_segments(params: &ParamSet) -> Vec<Segment> {
    let mut segments: Vec<Segment> = vec![];
    for slot in &params.slots {
        let (start, end, decay) = (slot.offset, slot.offset + slot.numel, slot.decays());
        match segments.last_mut() {
            Some(last) if last.decay == decay && last.end == start => last.end = end,
            _ => segments.push(Segment { start, end, decay }),
        }
    }
    segments
}

/// The values of a contiguous host f32 tensor.
fn host_slice(tensor: &Tensor) -> &[f32] {
    assert!(tensor.device() == Device::Cpu && tensor.kind() == Kind::Float && tensor.is_contiguous());
    let n = tensor.numel();
    // SAFETY: the tensor is contiguous f32 on the host and outlives the borrow.
    unsafe { std::slice::from_raw_parts(tensor.data_ptr() as *const f32, n) }
}

/// A batch from the wire as a (rows, cols) int64 tensor on `device`.
pub fn batch_tensor(rows: u32, cols: u32, tokens: &[u32], device: Device) -> Result<Tensor> {
    let expected = rows as usize * cols as usize;
    if tokens.len() != expected {
        return Err(WorkerError::Invalid(format!("a batch has {} tokens, expected {rows} x {cols}", tokens.len())));
    }
    let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
    Ok(Tensor::from_slice(&ids).view([rows as i64, cols as i64]).to_device(device))
}
