//! Fixture access for the worker's numeric tests: the HF reference written by
//! tests/fixtures/make_fixtures.py (scripts/test.sh runs it first).

use tch::{Kind, Tensor};
use zerotune_hf::{Dtype, WeightFiles};
pub use zerotune_tests::{fixtures, meta};

pub struct Reference(WeightFiles);

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
    let kind = match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::F16 => Kind::Half,
        other => panic!("unexpected fixture dtype {other:?}"),
    };
    let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    Tensor::from_data_size(files.bytes(name).unwrap(), &shape, kind)
}

/// max |a - b| / max |b|, printed with the first values so a failure shows where.
pub fn rel_err(label: &str, ours: &Tensor, reference: &Tensor) -> f64 {
    let ours = ours.to_kind(Kind::Double);
    let reference = reference.to_kind(Kind::Double);
    assert_eq!(ours.size(), reference.size(), "{label}: shapes differ");
    let diff = (&ours - &reference).abs().max().double_value(&[]);
    let scale = reference.abs().max().double_value(&[]).max(1e-12);
    let first = |t: &Tensor| Vec::<f64>::try_from(t.flatten(0, -1).narrow(0, 0, t.numel().min(3) as i64)).unwrap();
    println!("{label}: ours {:?} ref {:?} max diff {diff:.3e} rel {:.3e}", first(&ours), first(&reference), diff / scale);
    diff / scale
}
