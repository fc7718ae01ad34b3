//! The memory planner (`coordinator estimate`, and the table every `train` prints first): bytes
//! per GPU and per host of a job, term by term, from the model shape and the plan, as pure
//! functions over plain data. The terms follow what the worker allocates (params.rs, grads.rs,
//! optim/), the ZeRO paper's accounting (arXiv 1910.02054: 2 + 2 + 12 bytes per parameter) and
//! DeepSpeed's `estimate_zero2_model_states_mem_needs`, which `deepspeed_zero2` reproduces. What
//! would make a job fit that does not is `advice.rs`.

use zerotune_proto::plan::Precision;

use crate::advice::{advise, Advice};

/// Bytes per (B, T, V) element of the logits at their peak, in fp32: the projection (upcast from
/// 16 bits, which adds that copy), the shifted copy and log-softmax's output at the end of the
/// forward pass; log-softmax's output and the gradients in and out of it at the start of the
/// backward pass.
const LOGIT_BYTES_F32: u64 = 12;
/// What a worker process holds before any model: libtorch's code and allocator (CPU ranks), or
/// the CUDA context, kernels, cuBLAS workspace and caching-allocator slack (GPU ranks).
const CPU_RUNTIME: u64 = 200 << 20;
const GPU_RUNTIME: u64 = 1 << 30;

/// The model, as far as memory goes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Shape {
    pub params: u64,
    pub n_layer: u64,
    pub n_embd: u64,
    pub vocab: u64,
    /// Values autograd keeps per token of one block (`ModelConfig::saved_values_per_token_per_block`).
    pub saved_per_block: u64,
}

impl Shape {
    pub fn of(config: &zerotune_hf::ModelConfig) -> Shape {
        Shape {
            params: config.num_parameters() as u64,
            n_layer: config.num_layers() as u64,
            n_embd: config.hidden_size() as u64,
            vocab: config.vocab_size() as u64,
            saved_per_block: config.saved_values_per_token_per_block() as u64,
        }
    }
}

/// A job's memory-relevant settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MemoryJob {
    pub shape: Shape,
    pub world: u64,
    /// The most ranks any one host runs.
    pub ranks_per_host: u64,
    pub micro: u64,
    pub block: u64,
    pub precision: Precision,
    pub zero_stage: u8,
    pub offload: bool,
    pub reduce_bucket: u64,
    pub offload_tile: u64,
    pub checkpointing: bool,
    /// Checkpoints are saved during the run (their optimizer slices), not only the final model.
    pub checkpoints: bool,
    /// GPU ranks (else CPU ranks, whose "device" is host memory).
    pub gpu: bool,
}

/// Where a term's bytes live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// Per GPU (on a CPU rank: the rank's own RAM).
    Device,
    /// Per rank in host memory (offloaded optimizer).
    Host,
}

/// One line of the table.
#[derive(Clone, Debug, PartialEq)]
pub struct Term {
    pub name: &'static str,
    pub place: Place,
    pub bytes: u64,
    /// How it is counted, in words.
    pub how: String,
    /// Held only in the forward/backward pass, the optimizer step or a save: the peak is the
    /// largest of the three on top of what is always held.
    pub phase: Phase,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Always,
    Backward,
    Step,
    Save,
}

/// Elements per rank in each all-gather of a partitioned master at save time, and per device to
/// host copy (worker train.rs).
const SAVE_CHUNK: u64 = 1 << 26;

impl MemoryJob {
    fn bytes_per_value(&self) -> u64 {
        match self.precision {
            Precision::Fp32 => 4,
            Precision::Bf16 | Precision::Fp16 => 2,
        }
    }

    /// Elements per rank's partition (the padded flat buffer is world x this).
    pub fn partition(&self) -> u64 {
        zerotune_proto::plan::zero_partition(self.shape.params as usize, self.world as usize) as u64
    }

    /// Elements this rank's optimizer updates.
    fn owned(&self) -> u64 {
        if self.zero_stage == 0 {
            self.shape.params
        } else {
            self.partition()
        }
    }
}

/// Every term of `job`, device terms first.
pub fn terms(job: &MemoryJob) -> Vec<Term> {
    let (p, n, part, k) = (job.shape.params, job.world, job.partition(), job.bytes_per_value());
    let padded = part * n;
    let owned = job.owned();
    let dtype = if k == 2 { "16-bit" } else { "fp32" };
    let term = |name, place, bytes, how: String| Term { name, place, bytes, how, phase: Phase::Always };
    let mut out = vec![
        term("parameters", Place::Device, padded * k, format!("{padded} x {k} B ({dtype}, flat, padded)")),
        term("gradients", Place::Device, p * k, format!("{p} x {k} B (autograd, {dtype})")),
    ];
    if job.zero_stage == 0 || n == 1 {
        out.push(term("gradient accumulator", Place::Device, padded * 4, format!("{padded} x 4 B (fp32, whole)")));
    } else {
        if job.zero_stage == 1 {
            out.push(term("gradient accumulator", Place::Device, padded * 4, format!("{padded} x 4 B (fp32, whole)")));
        }
        out.push(term("gradient partition", Place::Device, part * 4, format!("{part} x 4 B (fp32)")));
        if job.zero_stage == 2 {
            let bucket = (job.reduce_bucket / n).clamp(1, part);
            let bytes = bucket * (n + 1) * 4;
            out.push(term("reduce-scatter buckets", Place::Device, bytes, format!("{bucket} x {} x 4 B (fp32)", n + 1)));
        }
    }
    if job.offload {
        out.push(term("optimizer state", Place::Host, owned * 12, format!("{owned} x 12 B (fp32 master, exp_avg, exp_avg_sq)")));
        // New weights go up through two host tiles, used alternately: pinned on a GPU, where
        // libtorch's pinned allocator rounds each up to a power of two bytes; fp32 ones on CPU
        // ranks go up from the master as they are.
        let (tile, format) = (job.offload_tile.min(owned), if k == 2 { "16-bit" } else { "fp32" });
        if job.gpu {
            let bytes = (tile * k).next_power_of_two();
            out.push(term("pinned buffers", Place::Host, 2 * bytes, format!("2 x {bytes} B (pinned {format} upload tiles of {tile})")));
        } else if k == 2 {
            out.push(term("upload tiles", Place::Host, 2 * tile * k, format!("2 x {tile} x {k} B ({format} upload tiles)")));
        }
        // 16-bit gradients are cast (fp16: first scaled) on the device, a tile at a time, two in
        // flight; fp32 ones go down as they are.
        if job.gpu && k == 2 {
            let tile = job.offload_tile.min(owned);
            let bytes = 2 * tile * (k + 4);
            out.push(Term { phase: Phase::Step, ..term("transfer tiles", Place::Device, bytes, format!("2 x {tile} x ({k} + 4) B")) });
        }
    } else {
        out.push(term("optimizer state", Place::Device, owned * 12, format!("{owned} x 12 B (fp32 master, exp_avg, exp_avg_sq)")));
        let bytes = owned * 16;
        out.push(Term { phase: Phase::Step, ..term("optimizer step temporaries", Place::Device, bytes, format!("{owned} x 16 B")) });
    }
    let (b, t, c, l, v) = (job.micro, job.block, job.shape.n_embd, job.shape.n_layer, job.shape.vocab);
    let saved = job.shape.saved_per_block;
    let activations = if job.checkpointing {
        let bytes = (l * c + saved + 4 * c) * b * t * k;
        (bytes, format!("{l} block inputs of {c} + 1 recomputed block ({saved} + {}) x {b}x{t} x {k} B", 4 * c))
    } else {
        (l * saved * b * t * k, format!("{l} blocks x {saved} x {b}x{t} x {k} B"))
    };
    out.push(Term { phase: Phase::Backward, ..term("activations", Place::Device, activations.0, activations.1) });
    let per_logit = LOGIT_BYTES_F32 + if k == 2 { 2 } else { 0 };
    out.push(Term {
        phase: Phase::Backward,
        ..term("logits", Place::Device, b * t * v * per_logit, format!("{b}x{t}x{v} x {per_logit} B"))
    });
    let (runtime, what) = if job.gpu { (GPU_RUNTIME, "CUDA context, kernels, allocator slack") } else { (CPU_RUNTIME, "libtorch runtime") };
    out.push(term("buffers", Place::Device, runtime, what.into()));
    out.extend(save_terms(job));
    out
}

/// What saving holds for a while. Rank 0 writes the fp32 model a tensor at a time (worker
/// checkpoint.rs), from the offloaded master where it is, else from a host copy (copied down a
/// chunk at a time), and from a partitioned optimizer it first gathers the whole model through a
/// device buffer of world chunks, each rank's part staged to the host in turn. Checkpoints write
/// each rank's optimizer slice a state at a time, from host copies unless offloaded.
fn save_terms(job: &MemoryJob) -> Vec<Term> {
    let (p, n, part) = (job.shape.params, job.world, job.partition());
    let partitioned = n > 1 && job.zero_stage > 0;
    let tensor = job.shape.vocab * job.shape.n_embd * 4;
    let chunk = part.min(SAVE_CHUNK);
    let staged = chunk * 4;
    let model = if partitioned {
        (p * 4 + staged + tensor, format!("{p} x 4 B gathered + {staged} B staged + {tensor} B being written (rank 0)"))
    } else if job.offload {
        (tensor, format!("{tensor} B (the largest tensor being written, rank 0)"))
    } else {
        (p * 4 + staged + tensor, format!("{p} x 4 B copied to the host + {staged} B staged + {tensor} B being written (rank 0)"))
    };
    let per_value = if job.offload { 4 } else { 16 };
    let optimizer = (part * per_value, format!("{part} x {per_value} B (the optimizer slice being written)"));
    let host = if job.checkpoints && optimizer.0 > model.0 { optimizer } else { model };
    let save = |name, place, (bytes, how): (u64, String)| Term { name, place, bytes, how, phase: Phase::Save };
    let mut out = vec![save("saving", Place::Host, host)];
    if partitioned {
        out.push(save("save gather buffer", Place::Device, (chunk * n * 4, format!("{chunk} x {n} x 4 B (fp32)"))));
    }
    out
}

/// Peak bytes of the terms at `place` (both: `None`, one RAM): what is always held plus the
/// largest of the forward/backward pass, the optimizer step and a save.
pub fn peak(terms: &[Term], place: Option<Place>) -> u64 {
    peak_of_ranks(terms, place, 1)
}

/// The same for `ranks` ranks sharing the memory, of which one (rank 0) saves.
fn peak_of_ranks(terms: &[Term], place: Option<Place>, ranks: u64) -> u64 {
    let sum = |phase| terms.iter().filter(|t| place.is_none_or(|p| t.place == p) && t.phase == phase).map(|t| t.bytes).sum::<u64>();
    ranks * sum(Phase::Always) + (ranks * sum(Phase::Backward)).max(ranks * sum(Phase::Step)).max(sum(Phase::Save))
}

/// A term's share of the memory `ranks` ranks share (one of them saves).
fn share(term: &Term, ranks: u64) -> u64 {
    if term.phase == Phase::Save {
        term.bytes
    } else {
        term.bytes * ranks
    }
}

/// The totals a verdict is made on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Totals {
    /// Per GPU; on CPU ranks per rank, host terms included (one RAM).
    pub per_device: u64,
    /// Per host: its ranks' host terms (CPU ranks: their whole totals).
    pub per_host: u64,
}

pub fn totals(job: &MemoryJob, terms: &[Term]) -> Totals {
    if job.gpu {
        Totals { per_device: peak(terms, Some(Place::Device)), per_host: peak_of_ranks(terms, Some(Place::Host), job.ranks_per_host) }
    } else {
        Totals { per_device: peak(terms, None), per_host: peak_of_ranks(terms, None, job.ranks_per_host) }
    }
}

/// Memory to plan against; `None`: unknown (not checked).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub device: Option<u64>,
    pub host: Option<u64>,
}

/// Whether `job`'s totals are within `capacity` (an unknown one is not checked).
pub fn fits(job: &MemoryJob, capacity: Capacity) -> bool {
    let t = totals(job, &terms(job));
    capacity.device.is_none_or(|cap| t.per_device <= cap) && capacity.host.is_none_or(|cap| t.per_host <= cap)
}

/// Why a job does not fit: where, by how much, its largest term there, and what would fit.
#[derive(Clone, Debug, PartialEq)]
pub struct Refusal {
    /// "per GPU", "per rank" or "per host".
    pub what: &'static str,
    pub need: u64,
    pub capacity: u64,
    pub largest: Term,
    pub advice: Advice,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (largest, what) = (&self.largest, self.what);
        write!(f, "the job needs {} {what} but {} is available; ", gib(self.need), gib(self.capacity))?;
        write!(f, "the largest term is {} ({}: {}); {}", largest.name, gib(largest.bytes), largest.how, self.advice)
    }
}

/// Whether `job` fits `capacity`, and if not, the largest term and what would make it fit.
pub fn verdict(job: &MemoryJob, capacity: Capacity) -> Result<(), Box<Refusal>> {
    let terms = terms(job);
    let t = totals(job, &terms);
    let over_device = capacity.device.filter(|&cap| t.per_device > cap);
    let over_host = capacity.host.filter(|&cap| t.per_host > cap);
    let (what, need, cap, place) = match (over_device, over_host) {
        (Some(cap), _) => (if job.gpu { "per GPU" } else { "per rank" }, t.per_device, cap, Place::Device),
        (None, Some(cap)) => ("per host", t.per_host, cap, Place::Host),
        (None, None) => return Ok(()),
    };
    let ranks = if place == Place::Host { job.ranks_per_host } else { 1 };
    let largest =
        terms.iter().filter(|t| t.place == place || !job.gpu).max_by_key(|t| (share(t, ranks), t.phase == Phase::Always)).expect("terms");
    Err(Box::new(Refusal { what, need, capacity: cap, largest: largest.clone(), advice: advise(job, capacity) }))
}

/// DeepSpeed's `estimate_zero2_model_states_mem_needs(total_params, num_gpus_per_node, num_nodes,
/// cpu_offload, additional_buffer_factor=1.5)`: (bytes per CPU node, bytes per GPU) of the model
/// states (parameters, gradients, optimizer states), as DeepSpeed publishes it.
pub fn deepspeed_zero2(params: u64, gpus_per_node: u64, nodes: u64, cpu_offload: bool) -> (u64, u64) {
    let total_gpus = nodes * gpus_per_node;
    let (cpu, gpu) = if cpu_offload {
        (params as f64 * (4 * total_gpus).max(16) as f64 * 1.5, 2 * params)
    } else {
        (params as f64 * 4.0 * gpus_per_node as f64 * 1.5, 4 * params + 16 * params / total_gpus)
    };
    (cpu as u64, gpu)
}

/// The table: one line per term, then the totals and the verdict.
pub fn table(job: &MemoryJob, capacity: Capacity) -> String {
    let terms = terms(job);
    let t = totals(job, &terms);
    let device = if job.gpu { "GPU" } else { "CPU rank" };
    let mut out = format!(
        "memory plan: {} parameters, world {} ({} per host), micro {} x block {}, {:?}, ZeRO {}{}{}\n",
        job.shape.params,
        job.world,
        job.ranks_per_host,
        job.micro,
        job.block,
        job.precision,
        job.zero_stage,
        if job.offload { " + CPU offload" } else { "" },
        if job.checkpointing { ", gradient checkpointing" } else { "" },
    );
    for place in [Place::Device, Place::Host] {
        for term in terms.iter().filter(|t| t.place == place) {
            let whence = match (place, term.phase) {
                (Place::Device, _) => format!("per {device}"),
                (Place::Host, _) => "per rank, host".into(),
            };
            let phase = match term.phase {
                Phase::Always => "",
                Phase::Backward => " (forward/backward)",
                Phase::Step => " (optimizer step)",
                Phase::Save => " (saving)",
            };
            out += &format!("  {:<26} {:>10}  {whence}{phase}: {}\n", term.name, gib(term.bytes), term.how);
        }
    }
    let check = |need: u64, cap: Option<u64>| match cap {
        Some(cap) if need <= cap => format!("fits in {}", gib(cap)),
        Some(cap) => format!("DOES NOT FIT in {}", gib(cap)),
        None => "not checked".into(),
    };
    let per_device = if job.gpu { "per GPU" } else { "per CPU rank (device and host terms: one RAM)" };
    out += &format!("  total {per_device}: {} ({} bytes): {}\n", gib(t.per_device), t.per_device, check(t.per_device, capacity.device));
    let ranks = match job.ranks_per_host {
        1 => "1 rank".to_string(),
        n => format!("{n} ranks"),
    };
    out += &format!("  total per host ({ranks}): {}: {}\n", gib(t.per_host), check(t.per_host, capacity.host));
    out
}

/// Bytes as GiB with two decimals.
pub fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

#[cfg(test)]
#[path = "estimate_tests.rs"]
mod tests;
