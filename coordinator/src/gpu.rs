//! What the coordinator needs to know of this machine's GPUs and memory before a job starts: their
//! memory and compute capability (from `nvidia-smi`, no CUDA library needed, or from the table of
//! `--gpu_model`s), the precision a GPU without fast 16-bit math or bf16 should train in (a pure
//! decision), and the memory plan of a `TrainPlan` (`estimate.rs`) with its verdict.

use std::process::Command;

use zerotune_hf::ModelConfig;
use zerotune_proto::plan::Precision;
use zerotune_proto::precision::{gpu_precision, NoBf16, PrecisionNote};

use crate::config::{config_by_name, Device, GpuModel, Launcher, ModelChoice, TokenizerChoice, TrainPlan};
use crate::error::{CoordinatorError, Result};
use crate::estimate::{self, Capacity, MemoryJob, Shape};

/// One GPU as `nvidia-smi` reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuInfo {
    pub name: String,
    pub memory: u64,
    /// (major, minor), e.g. (6, 1) for a P40.
    pub compute_capability: (u32, u32),
}

/// Each `--gpu_model`: nvidia-smi's name, memory.total in MiB (what a query on that card gives,
/// and so what the planner plans against there) and compute capability.
const GPU_MODELS: [(GpuModel, &str, u64, (u32, u32)); 6] = [
    (GpuModel::P40, "Tesla P40", 24576, (6, 1)),
    (GpuModel::V100, "Tesla V100-SXM2-32GB", 32768, (7, 0)),
    (GpuModel::A100With40Gb, "NVIDIA A100-SXM4-40GB", 40960, (8, 0)),
    (GpuModel::A100With80Gb, "NVIDIA A100-SXM4-80GB", 81920, (8, 0)),
    (GpuModel::H100, "NVIDIA H100 80GB HBM3", 81559, (9, 0)),
    (GpuModel::H200, "NVIDIA H200", 143771, (9, 0)),
];

impl GpuInfo {
    /// The GPU `--gpu_model` names, as a query on it would report it.
    pub fn of_model(model: GpuModel) -> Self {
        let (_, name, mib, capability) = GPU_MODELS.iter().find(|row| row.0 == model).copied().expect("every GpuModel has a row");
        Self { name: name.into(), memory: mib << 20, compute_capability: capability }
    }
}

/// This machine's GPUs; empty when `nvidia-smi` is absent or fails.
pub fn query() -> Vec<GpuInfo> {
    let out = Command::new("nvidia-smi").args(["--query-gpu=name,memory.total,compute_cap", "--format=csv,noheader,nounits"]).output();
    match out {
        Ok(out) if out.status.success() => parse_query(&String::from_utf8_lossy(&out.stdout)),
        _ => vec![],
    }
}

/// `nvidia-smi --query-gpu=name,memory.total,compute_cap --format=csv,noheader,nounits` lines
/// (memory in MiB).
pub fn parse_query(text: &str) -> Vec<GpuInfo> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            let [name, mib, cap] = fields.as_slice() else { return None };
            let (major, minor) = cap.split_once('.')?;
            Some(GpuInfo {
                name: name.to_string(),
                memory: mib.parse::<u64>().ok()? << 20,
                compute_capability: (major.parse().ok()?, minor.parse().ok()?),
            })
        })
        .collect()
}

/// This machine's RAM (MemTotal of /proc/meminfo).
pub fn host_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib << 10)
}

/// How precision was chosen: by a flag or ds_config, or by default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chosen {
    Default,
    Explicit,
}

/// What a GPU of `capability` trains in, given the plan's precision and how it was chosen
/// (`zerotune_proto::precision`'s rule), whether the optimizer moves to the CPU, and a note to
/// print. Below compute capability 7.0 (Pascal: P40, P100, GTX 10xx) fp16 math runs at a small
/// fraction of fp32's rate (1/64 on a P40) and there is no bf16: the default becomes fp32
/// compute with the optimizer offloaded; --fp16 is allowed with a warning, --bf16 is refused.
/// Volta and Turing (7.x: V100, T4) have fast fp16 but emulate bf16: the default becomes fp16
/// (with its loss scaler); --bf16 runs, with a warning.
pub fn precision_for(
    capability: (u32, u32),
    precision: Precision,
    chosen: Chosen,
) -> std::result::Result<(Precision, bool, Option<String>), NoBf16> {
    let asked = match (chosen, precision) {
        (Chosen::Default, Precision::Bf16) => None,
        _ => Some(precision),
    };
    let (precision, note) = gpu_precision(capability, asked)?;
    let offload = matches!(note, Some(PrecisionNote::Fp32OnOldGpu { .. }));
    Ok((precision, offload, note.map(training_note)))
}

/// A precision note in training's words.
fn training_note(note: PrecisionNote) -> String {
    let gpu = |(major, minor): (u32, u32)| format!("compute capability {major}.{minor}");
    match note {
        PrecisionNote::Fp16WithoutBf16 { capability } => {
            format!("note: this GPU ({}) has fast fp16 but no bf16: training in fp16 with loss scaling", gpu(capability))
        }
        PrecisionNote::EmulatedBf16 { capability } => format!(
            "warning: --bf16 on a GPU of {}: bf16 is emulated there, far below its fp16 rate; --fp16 is usually faster",
            gpu(capability)
        ),
        PrecisionNote::Fp32OnOldGpu { capability } => format!(
            "note: this GPU ({}) has no bf16 and slow fp16 math: training in fp32 with the optimizer offloaded to the CPU",
            gpu(capability)
        ),
        PrecisionNote::SlowFp16 { capability } => format!(
            "warning: --fp16 on a GPU of {}: its fp16 math runs far below its fp32 rate (1/64 on a P40); fp32 (no --fp16) is usually faster",
            gpu(capability)
        ),
    }
}

/// The model config a plan trains, without loading weights: from scratch with a trained tokenizer
/// the embedding is sized to it (prepare.rs), at most the asked size rounded up to 64.
pub fn plan_config(plan: &TrainPlan) -> Result<ModelConfig> {
    match &plan.model {
        ModelChoice::Scratch(config) => {
            let mut config = (**config).clone();
            if let TokenizerChoice::Train { vocab_size } = plan.tokenizer {
                config.set_vocab_size(vocab_size.div_ceil(64) * 64);
            }
            Ok(config)
        }
        ModelChoice::Pretrained(dir) => Ok(ModelConfig::from_dir(dir)
            .or_else(|_| config_by_name(&dir.to_string_lossy()))
            .map_err(|e| CoordinatorError::flag("--model_name_or_path", dir.display(), e.to_string()))?),
    }
}

/// The memory planner's view of `plan`.
pub fn job_of(plan: &TrainPlan, config: &ModelConfig) -> MemoryJob {
    let mut per_host = std::collections::BTreeMap::<&str, u64>::new();
    for p in &plan.launch.placements {
        *per_host.entry(p.host.as_str()).or_default() += 1;
    }
    MemoryJob {
        shape: Shape::of(config),
        world: plan.world_size() as u64,
        ranks_per_host: per_host.values().copied().max().unwrap_or(1),
        micro: plan.batch.micro as u64,
        block: plan.data.block_size.unwrap_or(config.default_block_size()) as u64,
        precision: plan.training.precision,
        zero_stage: plan.zero.stage,
        offload: plan.zero.offload_optimizer,
        reduce_bucket: plan.zero.reduce_bucket_size as u64,
        offload_tile: plan.training.offload_tile as u64,
        checkpointing: plan.training.gradient_checkpointing,
        checkpoints: plan.output.save_steps.is_some(),
        gpu: plan.launch.device != Device::Cpu,
    }
}

/// Where the GPU a plan is made for is known from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Known {
    /// --gpu_model: wherever the ranks run.
    Model(GpuModel),
    /// Queried on this machine: the ranks' GPU only when they run here.
    Queried,
}

/// The GPU `plan` is made for: --gpu_model's, else this machine's (the one `cuda:N` names, or
/// the first).
fn planned_gpu(plan: &TrainPlan, gpus: &[GpuInfo]) -> Option<(GpuInfo, Known)> {
    let Device::Cuda(index) = plan.launch.device else { return None };
    match plan.launch.gpu_model {
        Some(model) => Some((GpuInfo::of_model(model), Known::Model(model))),
        None => gpus.get(index.unwrap_or(0)).or(gpus.first()).map(|g| (g.clone(), Known::Queried)),
    }
}

/// The memory to plan against: --gpu_memory, else --gpu_model's, else the GPU's (queried) or, for
/// CPU ranks, this machine's RAM; host memory is this machine's when every rank runs here (CPU
/// ranks, or GPU ranks where this machine has GPUs: not those planned from a machine without).
pub fn capacity(plan: &TrainPlan, gpus: &[GpuInfo]) -> Capacity {
    let local = matches!(plan.launch.launcher, Launcher::Local);
    let here = local && (plan.launch.device == Device::Cpu || !gpus.is_empty());
    let ram = if here { host_memory() } else { None };
    let device = match plan.launch.device {
        Device::Cpu => plan.launch.gpu_memory.or(ram),
        Device::Cuda(_) => plan.launch.gpu_memory.or_else(|| match planned_gpu(plan, gpus)? {
            (gpu, Known::Model(_)) => Some(gpu.memory),
            (gpu, Known::Queried) => Some(gpu.memory).filter(|_| local),
        }),
    };
    Capacity { device, host: ram }
}

/// Applies the precision rule of the plan's GPU (--gpu_model's, or this machine's) to `plan`,
/// returning the notes to print.
pub fn adapt_precision(plan: &mut TrainPlan, gpus: &[GpuInfo], chosen: Chosen) -> Result<Vec<String>> {
    let Some((gpu, known)) = planned_gpu(plan, gpus) else { return Ok(vec![]) };
    let (precision, offload, note) = precision_for(gpu.compute_capability, plan.training.precision, chosen)
        .map_err(|refusal| CoordinatorError::Precision { gpu: gpu.name.clone(), refusal })?;
    plan.training.precision = precision;
    if offload && !plan.zero.offload_optimizer {
        plan.zero.offload_optimizer = true;
    }
    let whence = match known {
        Known::Model(model) => format!("--gpu_model {}", model.name()),
        Known::Queried => plan.launch.device.to_string(),
    };
    Ok(note.map(|n| format!("{} ({whence}): {n}", gpu.name)).into_iter().collect())
}

/// The memory table of `plan`, or the refusal naming the largest term and a fix.
pub fn check_memory(plan: &TrainPlan, gpus: &[GpuInfo]) -> Result<String> {
    let config = plan_config(plan)?;
    let job = job_of(plan, &config);
    let capacity = capacity(plan, gpus);
    let table = estimate::table(&job, capacity);
    let hint = match plan.launch.device {
        Device::Cpu => "these are CPU ranks: plan GPU ranks with --device cuda, and another machine's memory with --gpu_memory SIZE",
        Device::Cuda(_) => "plan for another device with --gpu_model MODEL or --gpu_memory SIZE",
    };
    estimate::verdict(&job, capacity).map_err(|refusal| CoordinatorError::Memory { table: table.clone(), refusal, hint })?;
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::config::TrainArgs;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: TrainArgs,
    }

    fn plan(extra: &[&str]) -> TrainPlan {
        plan_on("cuda:0", extra)
    }

    fn plan_on(device: &str, extra: &[&str]) -> TrainPlan {
        let mut argv = vec!["x", "--config_name", "codegen-350M", "--train_tokenizer", "2048", "--train_file", "d.jsonl"];
        argv.extend_from_slice(&["--output_dir", "o", "--do_train", "--device", device, "--worker_bin", "/bin/true"]);
        argv.extend_from_slice(extra);
        TrainPlan::resolve(&Cli::parse_from(argv).args).unwrap()
    }

    fn p40() -> Vec<GpuInfo> {
        vec![GpuInfo { name: "Tesla P40".into(), memory: 24576 << 20, compute_capability: (6, 1) }]
    }

    #[test]
    fn a_p40_plan_becomes_fp32_with_offload_and_its_memory_is_planned() {
        let mut default = plan(&[]);
        assert_eq!((default.training.precision, default.zero.offload_optimizer), (Precision::Bf16, false));
        let notes = adapt_precision(&mut default, &p40(), Chosen::Default).unwrap();
        assert_eq!((default.training.precision, default.zero.offload_optimizer), (Precision::Fp32, true));
        assert!(notes[0].starts_with("Tesla P40 (cuda:0): note: this GPU (compute capability 6.1)"), "{notes:?}");
        let err = adapt_precision(&mut plan(&["--bf16"]), &p40(), Chosen::Explicit).unwrap_err();
        assert!(matches!(&err, CoordinatorError::Precision { refusal: NoBf16 { capability: (6, 1) }, .. }), "{err:?}");
        let err = err.to_string();
        assert!(err.contains("Tesla P40: --bf16: a GPU of compute capability 6.1 has no bf16; train in fp32"), "{err}");
        // The embedding follows the trained tokenizer: 2048 rows.
        let job = job_of(&default, &plan_config(&default).unwrap());
        assert_eq!((job.shape.vocab, job.block, job.gpu, job.offload), (2048, 1024, true, true));
        let table = check_memory(&default, &p40()).unwrap();
        assert!(table.contains("total per GPU") && table.contains("fits in 24.00 GiB"), "{table}");
        let err = check_memory(&plan(&["--gpu_memory", "1GiB"]), &p40()).unwrap_err().to_string();
        assert!(err.contains("DOES NOT FIT in 1.00 GiB") && err.contains("memory planner: the job needs"), "{err}");
        assert!(err.ends_with("(plan for another device with --gpu_model MODEL or --gpu_memory SIZE)"), "{err}");
        // A plan of CPU ranks says how to plan GPU ranks instead.
        let err = check_memory(&plan_on("cpu", &["--gpu_memory", "1GiB"]), &[]).unwrap_err().to_string();
        assert!(err.contains("total per CPU rank") && err.contains("plan GPU ranks with --device cuda"), "{err}");
    }

    #[test]
    fn nvidia_smi_lines_parse() {
        let gpus = parse_query("Tesla P40, 24576, 6.1\nNVIDIA H200, 143771, 9.0\ngarbage\n");
        assert_eq!(gpus.len(), 2);
        assert_eq!(gpus[0], GpuInfo { name: "Tesla P40".into(), memory: 24576 << 20, compute_capability: (6, 1) });
        assert_eq!(gpus[1].compute_capability, (9, 0));
    }

    #[test]
    fn a_pascal_gpu_trains_in_fp32_with_offload_and_warns_on_fp16() {
        let (p, offload, note) = precision_for((6, 1), Precision::Bf16, Chosen::Default).unwrap();
        assert_eq!((p, offload), (Precision::Fp32, true));
        assert!(note.unwrap().contains("no bf16 and slow fp16 math: training in fp32 with the optimizer offloaded"));
        let (p, offload, note) = precision_for((6, 1), Precision::Fp16, Chosen::Explicit).unwrap();
        assert_eq!((p, offload), (Precision::Fp16, false));
        assert!(note.unwrap().starts_with("warning: --fp16"));
        assert_eq!(precision_for((6, 0), Precision::Bf16, Chosen::Explicit), Err(NoBf16 { capability: (6, 0) }));
        assert_eq!(precision_for((6, 1), Precision::Fp32, Chosen::Explicit).unwrap(), (Precision::Fp32, false, None));
        // Ampere and later keep what the plan says.
        for cap in [(8, 0), (9, 0)] {
            assert_eq!(precision_for(cap, Precision::Bf16, Chosen::Default).unwrap(), (Precision::Bf16, false, None));
            assert_eq!(precision_for(cap, Precision::Fp16, Chosen::Explicit).unwrap(), (Precision::Fp16, false, None));
        }
        // Volta and Turing: fast fp16, emulated bf16; the default becomes fp16, --bf16 warns.
        for cap in [(7, 0), (7, 5)] {
            let (p, offload, note) = precision_for(cap, Precision::Bf16, Chosen::Default).unwrap();
            assert_eq!((p, offload), (Precision::Fp16, false));
            assert!(note.unwrap().contains("has fast fp16 but no bf16: training in fp16"));
            let (p, _, note) = precision_for(cap, Precision::Bf16, Chosen::Explicit).unwrap();
            assert!(p == Precision::Bf16 && note.unwrap().starts_with("warning: --bf16"));
            for p in [Precision::Fp16, Precision::Fp32] {
                assert_eq!(precision_for(cap, p, Chosen::Explicit).unwrap(), (p, false, None));
            }
        }
    }

    /// A plan to estimate, as `coordinator estimate` makes it: no data, output dir or tokenizer.
    fn estimate(extra: &[&str]) -> TrainPlan {
        let mut argv = vec!["x", "--config_name", "codegen-350M", "--do_train"];
        argv.extend_from_slice(extra);
        let cmd = <Cli as clap::CommandFactory>::command()
            .mut_arg("train_file", |a| a.required(false))
            .mut_arg("output_dir", |a| a.required(false));
        let matches = cmd.try_get_matches_from(argv).unwrap();
        let args = <Cli as clap::FromArgMatches>::from_arg_matches(&matches).unwrap().args;
        TrainPlan::resolve_for(&args, crate::config::Purpose::Estimate).unwrap()
    }

    #[test]
    fn each_gpu_model_gives_its_memory_capability_and_precision() {
        use clap::ValueEnum;
        let names: Vec<String> = GpuModel::value_variants().iter().map(|m| m.name()).collect();
        assert_eq!(names, ["p40", "v100", "a100-40gb", "a100-80gb", "h100", "h200"]);
        // (model, GiB as nvidia-smi reports it, capability, what the default (bf16 on a GPU) becomes).
        let table = [
            (GpuModel::P40, 24.0, (6, 1), Precision::Fp32),
            (GpuModel::V100, 32.0, (7, 0), Precision::Fp16),
            (GpuModel::A100With40Gb, 40.0, (8, 0), Precision::Bf16),
            (GpuModel::A100With80Gb, 80.0, (8, 0), Precision::Bf16),
            (GpuModel::H100, 79.6, (9, 0), Precision::Bf16),
            (GpuModel::H200, 140.4, (9, 0), Precision::Bf16),
        ];
        for (model, gib, capability, precision) in table {
            let gpu = GpuInfo::of_model(model);
            assert!((gpu.memory as f64 / (1u64 << 30) as f64 - gib).abs() < 0.05, "{model:?}: {gpu:?}");
            assert_eq!(gpu.compute_capability, capability, "{model:?}");
            // Planned from a machine without GPUs (none queried), wherever the ranks run.
            let mut plan = estimate(&["--gpu_model", &model.name(), "--num_nodes", "2", "--num_gpus", "8"]);
            assert_eq!((plan.launch.device, plan.world_size()), (Device::Cuda(None), 16));
            assert_eq!(plan.training.precision, Precision::Bf16, "the GPU default before the GPU's rule");
            let notes = adapt_precision(&mut plan, &[], Chosen::Default).unwrap();
            assert_eq!(plan.training.precision, precision, "{model:?}");
            assert_eq!(plan.zero.offload_optimizer, precision == Precision::Fp32, "{model:?}");
            assert_eq!(notes.len(), usize::from(precision != Precision::Bf16), "{notes:?}");
            assert!(notes.iter().all(|n| n.starts_with(&format!("{} (--gpu_model {}): note:", gpu.name, model.name()))), "{notes:?}");
            assert_eq!(capacity(&plan, &[]).device, Some(gpu.memory));
        }
        // The model names the GPU: this machine's (here a P40) is not the one planned for. Its RAM
        // is the host's where the ranks can run here, on its GPUs, not where it has none.
        let plan = estimate(&["--gpu_model", "h100", "--device", "cuda"]);
        assert_eq!(capacity(&plan, &p40()), Capacity { device: Some(GpuInfo::of_model(GpuModel::H100).memory), host: host_memory() });
        assert_eq!(capacity(&plan, &[]).host, None);
    }

    #[test]
    fn gpu_memory_overrides_the_memory_of_a_gpu_model_only() {
        let mut plan = estimate(&["--gpu_model", "p40", "--gpu_memory", "12GiB", "--gradient_checkpointing"]);
        assert_eq!(capacity(&plan, &[]).device, Some(12 << 30));
        adapt_precision(&mut plan, &[], Chosen::Default).unwrap();
        assert_eq!((plan.training.precision, plan.zero.offload_optimizer), (Precision::Fp32, true), "still a P40's rule");
        let table = check_memory(&plan, &[]).unwrap();
        assert!(table.contains("Fp32") && table.contains("fits in 12.00 GiB"), "{table}");
    }
}
