//! One rank's training state and step, ZeRO-style (docs/architecture.md): every micro-batch's gradients go
//! into fp32 flat buffers (stage 2: reduce-scattered at once into this rank's partition); at the
//! accumulation boundary one all-reduce carries the global norm (and so the fp16 overflow flag)
//! and the loss; AdamW updates only the rank's fp32 master partition, in host memory (offload,
//! `optim/offload.rs`: 16-bit transfers, tiled) or with torch ops on the device; the 16-bit
//! partitions are then all-gathered. World size 1 is the same code with identity collectives.

use std::ops::Range;
use std::path::Path;

use tch::{Device, Kind, Tensor};
use zerotune_hf::ModelConfig;
use zerotune_proto::plan::{Precision, WorkerPlan};
use zerotune_proto::state::{LayoutSlot, OptimizerLayout, OPTIMIZER_DIR};

use crate::checkpoint::{load_optimizer, load_params_padded, model_config, save_model, save_optimizer};
use crate::comm::{Collective, Single};
use crate::error::{Result, WorkerError};
use crate::grads::GradBuffers;
use crate::model::{Model, ParamSet};
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

/// fp32 master weights and moments of the owned range.
enum Optimizer {
    /// Offloaded: AdamW in host memory.
    Host(HostOptimizer),
    Device(DeviceAdam),
}

pub struct Trainer {
    pub config: ModelConfig,
    plan: WorkerPlan,
    device: Device,
    params: ParamSet,
    model: Model,
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

impl Trainer {
    /// A single-rank trainer.
    pub fn new(plan: WorkerPlan, device: Device) -> Result<Self> {
        Self::with_comm(plan, device, Box::new(Single))
    }

    /// A trainer for rank `comm.rank()` of `comm.world()`; every rank must call this together.
    pub fn with_comm(plan: WorkerPlan, device: Device, comm: Box<dyn Collective>) -> Result<Self> {
        let kind = crate::dtype::precision_kind(plan.precision);
        tch::manual_seed(plan.seed as i64);
        let config = model_config(&plan.model)?;
        let numel = config.num_parameters();
        let shard = ShardMap::new(numel, comm.world());
        let params = load_params_padded(&plan.model, &config, kind, device, true, plan.seed, shard.padded())?;
        let owned = if plan.zero_stage == 0 { 0..numel } else { shard.range(comm.rank()) };
        let grads = GradBuffers::new(plan.zero_stage, &shard, plan.reduce_bucket_size, device);
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
        let model = Model::new(&config, &params);
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
            let loss = self.model.loss_backward(ids, true, scale / divisor, self.plan.gradient_checkpointing)?;
            loss_sum += loss.to_kind(Kind::Double);
            self.accumulate_grads()?;
        }
        let outcome = self.optimizer_step(scale, loss_sum, divisor, tokens);
        self.grads.zero()?;
        outcome
    }

    /// Adds this micro-batch's parameter gradients into the stage's buffers.
    fn accumulate_grads(&mut self) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let grads: Vec<Option<Tensor>> = self.params.tensors.iter().map(|t| Some(t.grad()).filter(Tensor::defined)).collect();
        self.grads.accumulate(&self.params.slots, &grads, &self.shard, self.comm.as_mut())?;
        self.params.zero_grads();
        Ok(())
    }

    fn optimizer_step(&mut self, scale: f64, loss_sum: Tensor, divisor: f64, tokens: u64) -> Result<StepOutcome> {
        // The owned range's gradients, and the range this rank alone accounts for in the norm.
        let (grad, unique) = self.grads.reduced(self.owned.len(), &self.shard, self.comm.as_mut())?;
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

    /// The fp32 master of the owned range, where it is: borrowed from host memory, or copied
    /// down from the device.
    fn owned_master(&self) -> Result<std::borrow::Cow<'_, [f32]>> {
        Ok(match &self.optimizer {
            Optimizer::Host(host) => std::borrow::Cow::Borrowed(&host.adam.master[..]),
            Optimizer::Device(d) => std::borrow::Cow::Owned(host_copy(&d.master)?),
        })
    }

    /// Elements `range` of the owned fp32 master, as a tensor to copy from (host or device).
    fn owned_master_range(&self, range: Range<usize>) -> Tensor {
        match &self.optimizer {
            Optimizer::Host(host) => Tensor::from_slice(&host.adam.master[range]),
            Optimizer::Device(d) => d.master.narrow(0, range.start as i64, range.len() as i64),
        }
    }

    /// The whole fp32 master on rank 0 (None elsewhere) of a partitioned optimizer: every rank
    /// must call this together; the partitions are all-gathered in bounded chunks, and rank 0
    /// copies each rank's part of a chunk straight into place.
    fn full_master(&mut self) -> Result<Option<Vec<f32>>> {
        let (rank, world, numel) = (self.comm.rank(), self.comm.world(), self.shard.numel);
        let owned = self.owned.len();
        let p = self.shard.partition;
        let chunk = p.min(SAVE_CHUNK);
        let mut buffer = Tensor::zeros([(world * chunk) as i64], (Kind::Float, self.device));
        let mut full = if rank == 0 { vec![0f32; numel] } else { vec![] };
        for start in (0..p).step_by(chunk) {
            let len = chunk.min(p - start);
            let _ = buffer.f_zero_()?;
            let mine = start.min(owned)..(start + len).min(owned);
            if !mine.is_empty() {
                let count = mine.len() as i64;
                buffer.narrow(0, (rank * chunk) as i64, count).f_copy_(&self.owned_master_range(mine))?;
            }
            self.comm.all_gather(&mut buffer)?;
            if rank == 0 {
                for r in 0..world {
                    let at = (r * p + start).min(numel);
                    let n = len.min(numel - at);
                    buffer.narrow(0, (r * chunk) as i64, n as i64).f_copy_data(&mut full[at..at + n], n)?;
                }
            }
        }
        Ok((rank == 0).then_some(full))
    }

    /// Writes the model (HF layout, fp32 master weights) into `dir` from rank 0; every rank
    /// must call this together.
    pub fn save_model(&mut self, dir: &Path) -> Result<()> {
        if self.plan.zero_stage == 0 || self.comm.world() == 1 {
            // Rank 0 holds the whole master: written from where it is (no copy of the largest state).
            if self.comm.rank() == 0 {
                save_model(dir, &self.config, &self.params, &self.owned_master()?)?;
            }
            return Ok(());
        }
        if let Some(master) = self.full_master()? {
            save_model(dir, &self.config, &self.params, &master)?;
        }
        Ok(())
    }

    /// Writes this rank's optimizer slice (master, exp_avg, exp_avg_sq over its partition of the
    /// flat parameters) into `dir`, and from rank 0 the layout that joins the slices: they
    /// concatenate in rank order to the full state, so any world size can resume from them.
    pub fn save_optimizer(&self, dir: &Path) -> Result<()> {
        let (rank, world) = (self.comm.rank(), self.comm.world());
        let unique = self.shard.range(rank);
        let (at, len) = (unique.start - self.owned.start, unique.len());
        let copies: [Vec<f32>; 3];
        let slice: [&[f32]; 3] = match &self.optimizer {
            // Written from where it is: no copy of the slice.
            Optimizer::Host(host) => {
                let adam = &host.adam;
                [&adam.master, &adam.exp_avg, &adam.exp_avg_sq].map(|v| &v[at..at + len])
            }
            Optimizer::Device(d) => {
                let host = |t: &Tensor| host_copy(&t.narrow(0, at as i64, len as i64));
                copies = [host(&d.master)?, host(&d.exp_avg)?, host(&d.exp_avg_sq)?];
                copies.each_ref().map(Vec::as_slice)
            }
        };
        let layout = (rank == 0).then(|| self.layout());
        save_optimizer(dir, rank, world, slice, layout.as_ref())
    }

    /// How this run's optimizer slices join (`optimizer/layout.json`).
    fn layout(&self) -> OptimizerLayout {
        let world = self.comm.world();
        let slots = self.params.slots.iter().map(|s| LayoutSlot { name: s.name.clone(), shape: s.shape.clone(), offset: s.offset });
        OptimizerLayout {
            world_size: world,
            numel: self.shard.numel,
            partitions: (0..world).map(|r| self.shard.range(r)).map(|r| [r.start, r.end]).collect(),
            adam_steps: self.optimizer_steps(),
            loss_scaler: self.scaler.as_ref().map(LossScaler::state),
            slots: slots.collect(),
        }
    }

    /// Restores the state saved in `dir` (a `checkpoint-<step>/`) for the owned range, whatever
    /// world size wrote it, then fills the compute buffer from the fp32 master.
    fn resume(&mut self, dir: &Path, step: u64) -> Result<()> {
        let (layout, [master, exp_avg, exp_avg_sq]) = load_optimizer(&dir.join(OPTIMIZER_DIR), self.shard.numel, &self.owned)?;
        let steps = layout.adam_steps;
        match &mut self.optimizer {
            Optimizer::Host(host) => host.adam = AdamState { master, exp_avg, exp_avg_sq, steps },
            Optimizer::Device(d) => {
                let on = |v: Vec<f32>| Tensor::from_slice(&v).to_device(self.device);
                *d = DeviceAdam { master: on(master), exp_avg: on(exp_avg), exp_avg_sq: on(exp_avg_sq), steps };
            }
        }
        if let (Some(scaler), Some(saved)) = (self.scaler.as_mut(), layout.loss_scaler) {
            *scaler = LossScaler::from_state(saved);
        }
        self.step = step;
        tch::manual_seed(self.plan.seed.wrapping_add(step) as i64);
        let master = match &self.optimizer {
            Optimizer::Host(host) => Tensor::from_slice(&host.adam.master),
            Optimizer::Device(d) => d.master.shallow_clone(),
        };
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
        return Err(WorkerError::BatchShape { tokens: tokens.len(), rows, cols });
    }
    let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
    Ok(Tensor::from_slice(&ids).view([rows as i64, cols as i64]).to_device(device))
}

/// Elements per all-gather of a partitioned master at save time, and per device-to-host copy
/// (`coordinator estimate` counts the same).
const SAVE_CHUNK: usize = 1 << 26;

/// A 1-D fp32 tensor's values in host memory, copied down SAVE_CHUNK elements at a time: a
/// device tensor never has a whole host copy besides the result.
fn host_copy(t: &Tensor) -> Result<Vec<f32>> {
    let numel = t.numel();
    let mut out = vec![0f32; numel];
    for start in (0..numel).step_by(SAVE_CHUNK) {
        let n = SAVE_CHUNK.min(numel - start);
        t.narrow(0, start as i64, n as i64).f_copy_data(&mut out[start..start + n], n)?;
    }
    Ok(out)
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
