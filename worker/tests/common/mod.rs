//! Fixture access for the worker's numeric tests: the HF reference written by
//! tests/fixtures/make_fixtures.py (scripts/test.sh runs it first).

use tch::{Kind, Tensor};
use zerotune_hf::WeightFiles;
use zerotune_proto::plan::{AdamW, Collectives, LossScaler, ModelSource, Precision, Schedule, ScheduleKind, WorkerPlan};
pub use zerotune_tests::{fixtures, meta};

pub mod decode;

#[allow(dead_code)] // not every test binary reads the CodeGen reference
pub struct Reference(WeightFiles);

#[allow(dead_code)]
impl Reference {
    pub fn load() -> Self {
        Self(WeightFiles::open_file(&fixtures().join("reference.safetensors")).unwrap())
    }

    pub fn tensor(&self, name: &str) -> Tensor {
        tensor_from(&self.0, name)
    }
}

pub fn tensor_from(files: &WeightFiles, name: &str) -> Tensor {
    let (dtype, shape) = files.info(name).unwrap_or_else(|| panic!("fixture has no {name}"));
    let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    Tensor::from_data_size(files.bytes(name).unwrap(), &shape, zerotune_worker::dtype::kind(dtype))
}

/// `zerotune_tests::rel_err` of two tensors, printed with the first values so a failure shows where.
pub fn rel_err(label: &str, ours: &Tensor, reference: &Tensor) -> f64 {
    assert_eq!(ours.size(), reference.size(), "{label}: shapes differ");
    let values = |t: &Tensor| Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap();
    let (ours, reference) = (values(ours), values(reference));
    let (diff, rel) = (zerotune_tests::max_abs_diff(&ours, &reference), zerotune_tests::rel_err(&ours, &reference));
    let first = |v: &[f64]| v[..v.len().min(3)].to_vec();
    println!("{label}: ours {:?} ref {:?} max diff {diff:.3e} rel {rel:.3e}", first(&ours), first(&reference));
    rel
}

/// A fixture model directory as a worker's model source.
#[allow(dead_code)] // not every test binary trains
pub fn pretrained(dir: &str) -> ModelSource {
    ModelSource::Pretrained { dir: fixtures().join(dir).to_string_lossy().into_owned() }
}

/// The fixture's training run (meta.json "train") as a one-rank fp32 plan on the tiny model.
#[allow(dead_code)]
pub fn train_plan() -> WorkerPlan {
    let t = &meta()["train"];
    let f = |k: &str| t[k].as_f64().unwrap();
    WorkerPlan {
        model: pretrained("tiny"),
        precision: Precision::Fp32,
        optimizer: AdamW { lr: f("lr"), beta1: f("beta1"), beta2: f("beta2"), eps: f("eps"), weight_decay: f("weight_decay") },
        schedule: Schedule { kind: ScheduleKind::Linear, warmup_steps: f("warmup_steps") as u64, total_steps: f("total_steps") as u64 },
        max_grad_norm: f("max_grad_norm"),
        loss_scaler: LossScaler::default(),
        seed: 0,
        gradient_accumulation_steps: f("accumulation") as u32,
        zero_stage: 0,
        offload_optimizer: true,
        reduce_bucket_size: zerotune_proto::plan::DEFAULT_REDUCE_BUCKET,
        offload_tile: zerotune_proto::plan::DEFAULT_OFFLOAD_TILE,
        gradient_checkpointing: false,
        resume: None,
        collectives: Collectives::None,
        heartbeat_timeout_ms: 30_000,
    }
}
