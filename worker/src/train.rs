//! One rank's training state and step, ZeRO-style (DESIGN.md): every micro-batch's gradients go
//! into fp32 flat buffers (stage 2: reduce-scattered at once into this rank's partition); at the
//! accumulation boundary one all-reduce carries the global norm (and so the fp16 overflow flag)
//! and the loss; AdamW updates only the rank's fp32 master partition, in host memory (offload,
//! `optim/offload.rs`: 16-bit transfers, tiled) or with torch ops on the device; the 16-bit
//! partitions are then all-gathered. World size 1 is the same code with identity collectives.

use std::ops::Range;
use std::path::Path;

use tch::{Device, Kind, Tensor};
use zerotune_hf::write::write_json;
use zerotune_hf::{CodeGenConfig, RawTensor, WeightFiles};
use zerotune_proto::plan::{ModelSource, Precision, WorkerPlan};

use crate::checkpoint::{load_weights, save_model};
use crate::comm::{Collective, Single};
use crate::error::{io_err, Result, WorkerError};
use crate::model::{CodeGen, ParamSet};
use crate::optim::adamw::{AdamState, Segment};
use crate::optim::device_adam::DeviceAdam;
use crate::optim::loss_scale::LossScaler;
use crate::optim::offload::HostOptimizer;
use crate::optim::schedule::learning_rate;
use crate::zero::ShardMap;

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

/// Gradient buffers per ZeRO stage (all fp32 on the device).
enum GradBuffers {
    /// Stage 0, and any stage on one rank: the full accumulator, all-reduced at the boundary.
    Replicated { acc: Tensor },
    /// Stage 1: the full accumulator, reduce-scattered into `part` at the boundary.
    Partitioned { acc: Tensor, part: Tensor },
    /// Stage 2: each micro-step's gradients gathered bucket by bucket (`bucket`: world blocks of
    /// the same range of every partition), reduce-scattered into `incoming` and added to the
    /// partition accumulator `part`: no full-size gradient buffer.
    Streamed { bucket: Tensor, incoming: Tensor, part: Tensor },
}

/// fp32 master weights and moments of the owned range.
enum Optimizer {
    /// Offloaded: AdamW in host memory.
    Host(HostOptimizer),
    Device(DeviceAdam),
}

pub struct Trainer {
    pub config: CodeGenConfig,
    plan: WorkerPlan,
    device: Device,
    params: ParamSet,
    model: CodeGen,
    comm: Box<dyn Collective>,
    shard: ShardMap,
    /// Elements this rank's optimizer updates: its partition (stages 1, 2) or all (stage 0).
    owned: Range<usize>,
    grads: GradBuffers,
    optimizer: Optimizer,
    /// Weight-decay runs within `owned`, relative to its start.
    segments: Vec<Segment>,
    scaler: Option<LossScaler>,
    /// Optimizer steps processed, skipped ones included.
    pub step: u64,
}

/// Loads `source` into a fresh `ParamSet` of `kind` on `device`.
pub fn load_params(source: &ModelSource, kind: Kind, device: Device, trainable: bool, seed: u64) -> Result<(CodeGenConfig, ParamSet)> {
    let config = model_config(source)?;
    let params = load_params_padded(source, &config, kind, device, trainable, seed, 0)?;
    Ok((config, params))
}

fn model_config(source: &ModelSource) -> Result<CodeGenConfig> {
    Ok(match source {
        ModelSource::Pretrained { dir } => CodeGenConfig::from_dir(Path::new(dir))?,
        ModelSource::Scratch { config } => CodeGenConfig::from_value(config.clone())
            .map_err(|m| WorkerError::Invalid(format!("invalid model config from the coordinator: {m}")))?,
    })
}

/// Like `load_params`, the flat buffer at least `len` long (ZeRO's padding).
fn load_params_padded(
    source: &ModelSource,
    config: &CodeGenConfig,
    kind: Kind,
    device: Device,
    trainable: bool,
    seed: u64,
    len: usize,
) -> Result<ParamSet> {
    let mut params = ParamSet::zeros_padded(config, kind, device, trainable, len);
    match source {
        ModelSource::Pretrained { dir } => load_weights(&mut params, Path::new(dir))?,
        ModelSource::Scratch { .. } => params.init_like_hf(config, seed),
    }
    Ok(params)
}

impl Trainer {
    /// A single-rank trainer.
    pub fn new(plan: WorkerPlan, device: Device) -> Result<Self> {
        Self::with_comm(plan, device, Box::new(Single))
    }

    /// A trainer for rank `comm.rank()` of `comm.world()`; every rank must call this together.
    pub fn with_comm(plan: WorkerPlan, device: Device, comm: Box<dyn Collective>) -> Result<Self> {
        let kind = match plan.precision {
            Precision::Fp32 => Kind::Float,
            Precision::Bf16 => Kind::BFloat16,
            Precision::Fp16 => Kind::Half,
        };
        tch::manual_seed(plan.seed as i64);
        let config = model_config(&plan.model)?;
        let numel = config.num_parameters();
        let shard = ShardMap::new(numel, comm.world());
        let params = load_params_padded(&plan.model, &config, kind, device, true, plan.seed, shard.padded())?;
        let owned = if plan.zero_stage == 0 { 0..numel } else { shard.range(comm.rank()) };
        let f32_zeros = |n: usize| Tensor::zeros([n as i64], (Kind::Float, device));
        let grads = match plan.zero_stage {
            0 => GradBuffers::Replicated { acc: f32_zeros(shard.padded()) },
            // On one rank the partition is everything: one accumulator, nothing to reduce.
            _ if shard.world == 1 => GradBuffers::Replicated { acc: f32_zeros(shard.padded()) },
            1 => GradBuffers::Partitioned { acc: f32_zeros(shard.padded()), part: f32_zeros(shard.partition) },
            _ => {
                // reduce_bucket_size counts the whole bucket, as in DeepSpeed: each rank's block is a share.
                let b = (plan.reduce_bucket_size / shard.world).clamp(1, shard.partition);
                GradBuffers::Streamed { bucket: f32_zeros(b * shard.world), incoming: f32_zeros(b), part: f32_zeros(shard.partition) }
            }
        };
        let owned_params = params.flat.narrow(0, owned.start as i64, owned.len() as i64);
        let optimizer = if plan.offload_optimizer {
            // Widened on the host: no device memory is borrowed for an fp32 copy, even briefly.
            let mut values = vec![0f32; owned.len()];
            owned_params.to_device(Device::Cpu).to_kind(Kind::Float).copy_data(&mut values, owned.len());
            Optimizer::Host(HostOptimizer::new(values, kind, device, plan.offload_tile))
        } else {
            Optimizer::Device(DeviceAdam::new(owned_params.to_kind(Kind::Float)))
        };
        let segments = ShardMap::clip(&decay_segments(&params), &owned);
        let scaler = (plan.precision == Precision::Fp16).then(|| LossScaler::new(plan.loss_scaler));
        let model = CodeGen::new(&config, &params);
        let resume = plan.resume.clone();
        let mut trainer = Self { config, plan, device, params, model, comm, shard, owned, grads, optimizer, segments, scaler, step: 0 };
        if let Some(resume) = resume {
            trainer.resume(Path::new(&resume.dir), resume.step)?;
        }
        Ok(trainer)
    }

    /// The fp32 master weights of the owned range (all of them on a single rank).
    pub fn master(&self) -> Vec<f32> {
        match &self.optimizer {
            Optimizer::Host(host) => host.adam.master.clone(),
            Optimizer::Device(d) => Vec::<f32>::try_from(d.master.to_device(Device::Cpu)).expect("f32 master"),
        }
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// One optimizer step over `micro_batches` (each (B, T) int64 on the device).
    pub fn train_step(&mut self, micro_batches: &[Tensor]) -> Result<StepOutcome> {
        self.step += 1;
        let divisor = (micro_batches.len() * self.comm.world()) as f64;
        let scale = self.scaler.as_ref().map_or(1.0, |s| s.scale);
        // Summed on the device and read once per step: no host sync per micro-batch.
        let mut loss_sum = Tensor::zeros([], (Kind::Double, self.device));
        let mut tokens = 0u64;
        for ids in micro_batches {
            let (b, t) = ids.size2()?;
            tokens += (b * t) as u64;
            let loss = self.model.loss(ids, true);
            loss_sum += loss.detach().to_kind(Kind::Double);
            (loss * (scale / divisor)).f_backward()?;
            self.accumulate_grads()?;
        }
        let outcome = self.optimizer_step(scale, loss_sum, divisor, tokens);
        self.zero_grads()?;
        outcome
    }

    /// Adds this micro-batch's parameter gradients into the stage's buffers.
    fn accumulate_grads(&mut self) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let grads: Vec<Option<Tensor>> = self.params.tensors.iter().map(|t| Some(t.grad()).filter(Tensor::defined)).collect();
        match &mut self.grads {
            GradBuffers::Replicated { acc } | GradBuffers::Partitioned { acc, .. } => {
                for (slot, grad) in self.params.slots.iter().zip(&grads) {
                    if let Some(grad) = grad {
                        let _ = acc.narrow(0, slot.offset as i64, slot.numel as i64).f_add_(&grad.view(-1))?;
                    }
                }
            }
            GradBuffers::Streamed { bucket, incoming, part } => {
                let (p, b) = (self.shard.partition, incoming.numel());
                for start in (0..p).step_by(b) {
                    let len = b.min(p - start);
                    let _ = bucket.f_zero_()?;
                    for r in 0..self.shard.world {
                        // Block r of the bucket: flat range [r P + start, + len) of rank r's partition.
                        let (lo, hi) = (r * p + start, r * p + start + len);
                        for (slot, grad) in self.params.slots.iter().zip(&grads) {
                            let (from, to) = (slot.offset.max(lo), (slot.offset + slot.numel).min(hi));
                            if let (Some(grad), true) = (grad, from < to) {
                                let n = (to - from) as i64;
                                let src = grad.view(-1).narrow(0, (from - slot.offset) as i64, n);
                                bucket.narrow(0, (r * b + from - lo) as i64, n).f_copy_(&src)?;
                            }
                        }
                    }
                    self.comm.reduce_scatter(bucket, incoming)?;
                    let _ = part.narrow(0, start as i64, len as i64).f_add_(&incoming.narrow(0, 0, len as i64))?;
                }
            }
        }
        self.params.zero_grads();
        Ok(())
    }

    fn zero_grads(&mut self) -> Result<()> {
        let _ = match &mut self.grads {
            GradBuffers::Replicated { acc } => acc.f_zero_()?,
            GradBuffers::Partitioned { acc, part } => {
                let _ = acc.f_zero_()?;
                part.f_zero_()?
            }
            GradBuffers::Streamed { part, .. } => part.f_zero_()?,
        };
        Ok(())
    }

    /// The reduced gradients of the owned range, and of the range this rank alone accounts for
    /// in the global norm.
    fn reduced_grads(&mut self) -> Result<(Tensor, Tensor)> {
        let (rank, n) = (self.comm.rank(), self.owned.len() as i64);
        let unique = self.shard.range(rank);
        Ok(match &mut self.grads {
            GradBuffers::Replicated { acc } => {
                self.comm.all_reduce(acc)?;
                (acc.narrow(0, 0, n), acc.narrow(0, unique.start as i64, unique.len() as i64))
            }
            GradBuffers::Partitioned { acc, part } => {
                self.comm.reduce_scatter(acc, part)?;
                (part.narrow(0, 0, n), part.narrow(0, 0, n))
            }
            GradBuffers::Streamed { part, .. } => (part.narrow(0, 0, n), part.narrow(0, 0, n)),
        })
    }

    fn optimizer_step(&mut self, scale: f64, loss_sum: Tensor, divisor: f64, tokens: u64) -> Result<StepOutcome> {
        let (grad, unique) = self.reduced_grads()?;
        // One all-reduce for the squared norm (non-finite iff some gradient overflowed) and the
        // loss.
        let mut stats = Tensor::f_stack(&[sum_of_squares(&unique)?, loss_sum], 0)?;
        self.comm.all_reduce(&mut stats)?;
        let stats = Vec::<f64>::try_from(stats.to_device(Device::Cpu))?;
        let (sum_sq, loss) = (stats[0], stats[1] / divisor);
        if !loss.is_finite() && self.scaler.is_none() {
            return Err(WorkerError::NonFiniteLoss { step: self.step, loss });
        }
        let mut outcome = StepOutcome { loss, learning_rate: 0.0, grad_norm: 0.0, tokens, skipped: false, loss_scale: scale };
        if let Some(scaler) = self.scaler.as_mut() {
            let overflow = !sum_sq.is_finite();
            scaler.update(overflow)?;
            outcome.loss_scale = scaler.scale;
            if overflow {
                outcome.skipped = true;
                return Ok(outcome);
            }
        }
        let grad_norm = sum_sq.sqrt() / scale;
        if !grad_norm.is_finite() {
            return Err(WorkerError::NonFiniteGradients { step: self.step, norm: grad_norm });
        }
        let max_norm = self.plan.max_grad_norm;
        let clip = if max_norm > 0.0 { (max_norm / (grad_norm + 1e-6)).min(1.0) } else { 1.0 };
        let grad_scale = (1.0 / scale) * clip;
        let hyper = self.plan.optimizer;
        let lr = learning_rate(hyper.lr, &self.plan.schedule, self.optimizer_steps());
        let mut owned = self.params.flat.narrow(0, self.owned.start as i64, self.owned.len() as i64);
        let _guard = tch::no_grad_guard();
        match &mut self.optimizer {
            Optimizer::Host(host) => host.step(&grad, &mut owned, grad_scale, lr, &hyper, &self.segments)?,
            Optimizer::Device(adam) => {
                adam.step(&grad, grad_scale, lr, &hyper, &self.segments)?;
                owned.f_copy_(&adam.master)?;
            }
        }
        if self.plan.zero_stage > 0 {
            self.comm.all_gather(&mut self.params.flat)?;
        }
        outcome.learning_rate = lr;
        outcome.grad_norm = grad_norm;
        Ok(outcome)
    }

    fn optimizer_steps(&self) -> u64 {
        match &self.optimizer {
            Optimizer::Host(host) => host.adam.steps,
            Optimizer::Device(d) => d.steps,
        }
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

    /// (master, exp_avg, exp_avg_sq) of the owned range as host tensors.
    fn state_tensors(&self) -> [Tensor; 3] {
        match &self.optimizer {
            Optimizer::Host(host) => {
                let adam = &host.adam;
                [&adam.master, &adam.exp_avg, &adam.exp_avg_sq].map(|v| Tensor::from_slice(v))
            }
            Optimizer::Device(d) => [&d.master, &d.exp_avg, &d.exp_avg_sq].map(|t| t.to_device(Device::Cpu)),
        }
    }

    /// The whole fp32 master on rank 0 (None elsewhere). Every rank must call this together:
    /// with a partitioned optimizer the partitions are all-gathered in bounded chunks.
    fn full_master(&mut self) -> Result<Option<Vec<f32>>> {
        let [master, ..] = self.state_tensors();
        let (rank, world, numel) = (self.comm.rank(), self.comm.world(), self.shard.numel);
        if self.plan.zero_stage == 0 || world == 1 {
            return Ok((rank == 0).then(|| Vec::<f32>::try_from(master).expect("f32 master")));
        }
        let p = self.shard.partition;
        let chunk = p.min(1 << 26);
        let mut buffer = Tensor::zeros([(world * chunk) as i64], (Kind::Float, self.device));
        let mut full = if rank == 0 { vec![0f32; numel] } else { vec![] };
        for start in (0..p).step_by(chunk) {
            let len = chunk.min(p - start);
            let _ = buffer.f_zero_()?;
            let mine = start.min(master.numel())..(start + len).min(master.numel());
            if !mine.is_empty() {
                buffer.narrow(0, (rank * chunk) as i64, mine.len() as i64).f_copy_(&master.narrow(
                    0,
                    mine.start as i64,
                    mine.len() as i64,
                ))?;
            }
            self.comm.all_gather(&mut buffer)?;
            if rank == 0 {
                let host = Vec::<f32>::try_from(buffer.to_device(Device::Cpu))?;
                for r in 0..world {
                    let at = (r * p + start).min(numel);
                    let n = len.min(numel - at);
                    full[at..at + n].copy_from_slice(&host[r * chunk..r * chunk + n]);
                }
            }
        }
        Ok((rank == 0).then_some(full))
    }

    /// Writes the model (HF layout, fp32 master weights) into `dir` from rank 0; every rank
    /// must call this together.
    pub fn save_model(&mut self, dir: &Path) -> Result<()> {
        if let Some(master) = self.full_master()? {
            save_model(dir, &self.config, &self.params, &master)?;
        }
        Ok(())
    }

    /// Writes this rank's optimizer slice (master, exp_avg, exp_avg_sq over its partition of the
    /// flat parameters) into `dir`, and from rank 0 the layout that joins the slices: they
    /// concatenate in rank order to the full state, so any world size can resume from them.
    pub fn save_optimizer(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let (rank, world) = (self.comm.rank(), self.comm.world());
        let unique = self.shard.range(rank);
        let at = (unique.start - self.owned.start) as i64;
        let names = ["master", "exp_avg", "exp_avg_sq"];
        let state: Vec<(String, RawTensor)> = names
            .iter()
            .zip(self.state_tensors())
            .map(|(name, t)| {
                let values = Vec::<f32>::try_from(t.narrow(0, at, unique.len() as i64)).expect("f32 state");
                (name.to_string(), RawTensor::from_f32(vec![values.len()], &values))
            })
            .collect();
        zerotune_hf::write::write_file(&dir.join(slice_file(rank, world)), &state)?;
        if rank == 0 {
            let partitions: Vec<[usize; 2]> = (0..world).map(|r| self.shard.range(r)).map(|r| [r.start, r.end]).collect();
            let slots: Vec<_> =
                self.params.slots.iter().map(|s| serde_json::json!({"name": s.name, "shape": s.shape, "offset": s.offset})).collect();
            let layout = serde_json::json!({
                "world_size": world,
                "numel": self.shard.numel,
                "partitions": partitions,
                "adam_steps": self.optimizer_steps(),
                "loss_scaler": self.scaler,
                "slots": slots,
            });
            write_json(&dir.join("layout.json"), &layout)?;
        }
        Ok(())
    }

    /// Restores the state saved in `dir` (a `checkpoint-<step>/`) for the owned range, whatever
    /// world size wrote it, then fills the compute buffer from the fp32 master.
    fn resume(&mut self, dir: &Path, step: u64) -> Result<()> {
        let optimizer = dir.join("optimizer");
        let layout_path = optimizer.join("layout.json");
        let text = std::fs::read_to_string(&layout_path).map_err(io_err(&layout_path))?;
        let layout: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| WorkerError::Invalid(format!("{}: {e}", layout_path.display())))?;
        let bad = |m: &str| WorkerError::Invalid(format!("{}: {m}", layout_path.display()));
        if layout["numel"].as_u64() != Some(self.shard.numel as u64) {
            return Err(bad(&format!("holds {} parameters, the model has {} (another model size?)", layout["numel"], self.shard.numel)));
        }
        let partitions: Vec<[usize; 2]> = serde_json::from_value(layout["partitions"].clone()).map_err(|_| bad("no partitions list"))?;
        let world = partitions.len();
        let mut state = [vec![0f32; self.owned.len()], vec![0f32; self.owned.len()], vec![0f32; self.owned.len()]];
        for (r, [start, end]) in partitions.into_iter().enumerate() {
            let (from, to) = (start.max(self.owned.start), end.min(self.owned.end));
            if from >= to {
                continue;
            }
            let path = optimizer.join(slice_file(r, world));
            let files = WeightFiles::open_file(&path)?;
            for (values, name) in state.iter_mut().zip(["master", "exp_avg", "exp_avg_sq"]) {
                let bytes = files.bytes(name).ok_or_else(|| WorkerError::Invalid(format!("{}: no tensor {name}", path.display())))?;
                if bytes.len() != (end - start) * 4 {
                    return Err(WorkerError::Invalid(format!(
                        "{}: {name} has {} bytes, layout.json implies {}",
                        path.display(),
                        bytes.len(),
                        (end - start) * 4
                    )));
                }
                let src = &bytes[(from - start) * 4..(to - start) * 4];
                for (dst, b) in values[from - self.owned.start..to - self.owned.start].iter_mut().zip(src.chunks_exact(4)) {
                    *dst = f32::from_le_bytes(b.try_into().unwrap());
                }
            }
        }
        let steps = layout["adam_steps"].as_u64().unwrap_or(step);
        let [master, exp_avg, exp_avg_sq] = state;
        match &mut self.optimizer {
            Optimizer::Host(host) => host.adam = AdamState { master, exp_avg, exp_avg_sq, steps },
            Optimizer::Device(d) => {
                let on = |v: Vec<f32>| Tensor::from_slice(&v).to_device(self.device);
                *d = DeviceAdam { master: on(master), exp_avg: on(exp_avg), exp_avg_sq: on(exp_avg_sq), steps };
            }
        }
        if let (Some(scaler), Some(saved)) = (self.scaler.as_mut(), layout.get("loss_scaler").filter(|v| !v.is_null())) {
            *scaler = serde_json::from_value(saved.clone()).map_err(|_| bad("unreadable loss_scaler"))?;
        }
        self.step = step;
        tch::manual_seed(self.plan.seed.wrapping_add(step) as i64);
        let [master, ..] = self.state_tensors();
        let _guard = tch::no_grad_guard();
        self.params.flat.narrow(0, self.owned.start as i64, self.owned.len() as i64).f_copy_(&master)?;
        if self.plan.zero_stage > 0 {
            self.comm.all_gather(&mut self.params.flat)?;
        }
        Ok(())
    }
}

/// Elements per fp32 partial sum of `sum_of_squares`.
const NORM_CHUNK: i64 = 1024;

/// The squared 2-norm of the f32 vector `xs`, as an f64 scalar on its device, as accurate as an
/// f64 sum of squares whatever the length (so whatever the partition, so the world size): the
/// norm of each chunk of `NORM_CHUNK` elements in fp32, the chunks' squares summed in f64. An f64
/// norm of the whole would first copy it to f64 (8 bytes per element); an fp32 one loses about
/// 1e-4 relative over a million elements.
fn sum_of_squares(xs: &Tensor) -> Result<Tensor> {
    let n = xs.numel() as i64;
    let whole = n / NORM_CHUNK * NORM_CHUNK;
    let chunk_norms = |t: &Tensor, dim: i64| t.f_linalg_norm(2.0, Some([dim].as_slice()), false, None::<Kind>);
    let mut total = Tensor::zeros([], (Kind::Double, xs.device()));
    if whole > 0 {
        let norms = chunk_norms(&xs.narrow(0, 0, whole).view([-1, NORM_CHUNK]), 1)?.f_to_kind(Kind::Double)?;
        total = total.f_add(&norms.f_square()?.f_sum(Kind::Double)?)?;
    }
    if whole < n {
        let tail = chunk_norms(&xs.narrow(0, whole, n - whole), 0)?.f_to_kind(Kind::Double)?;
        total = total.f_add(&tail.f_square()?)?;
    }
    Ok(total)
}

/// `rank-XXXXX-of-XXXXX.safetensors`: one rank's optimizer slice.
fn slice_file(rank: usize, world: usize) -> String {
    format!("rank-{rank:05}-of-{world:05}.safetensors")
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

/// A batch from the wire as a (rows, cols) int64 tensor on `device`.
pub fn batch_tensor(rows: u32, cols: u32, tokens: &[u32], device: Device) -> Result<Tensor> {
    let expected = rows as usize * cols as usize;
    if tokens.len() != expected {
        return Err(WorkerError::Invalid(format!("a batch has {} tokens, expected {rows} x {cols}", tokens.len())));
    }
    let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
    Ok(Tensor::from_slice(&ids).view([rows as i64, cols as i64]).to_device(device))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against an f64 sum of squares, over lengths below, at and past whole chunks, with values
    /// spread over many binades (where fp32 accumulation loses the most). The whole vector's fp32
    /// norm, printed beside, loses 1e-4 over a million elements.
    #[test]
    fn sum_of_squares_is_as_accurate_as_f64() {
        tch::manual_seed(0);
        for n in [1, 1000, 1024, 1025, 3 * 1024 + 7, 1 << 20] {
            let xs = Tensor::randn([n], (Kind::Float, Device::Cpu)) * Tensor::randn([n], (Kind::Float, Device::Cpu)).exp();
            let want = xs.to_kind(Kind::Double).square().sum(Kind::Double).double_value(&[]);
            let ours = sum_of_squares(&xs).unwrap().double_value(&[]);
            let fp32 = xs.linalg_norm(2.0, None::<&[i64]>, false, None::<Kind>).double_value(&[]).powi(2);
            println!("n {n}: chunked rel {:.1e}, one fp32 norm rel {:.1e}", (ours - want).abs() / want, (fp32 - want).abs() / want);
            // One chunk's fp32 norm is good to a few 1e-8 here; the f64 sum keeps it there.
            assert!((ours - want).abs() <= 1e-6 * want, "n {n}: {ours} vs {want}");
        }
        assert_eq!(sum_of_squares(&Tensor::zeros([0], (Kind::Float, Device::Cpu))).unwrap().double_value(&[]), 0.0);
    }
}
