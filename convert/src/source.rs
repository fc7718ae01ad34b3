//! The input side: a CodeGen directory (or a trainer `checkpoint-<step>/`), its config checked for
//! what the conversion needs, and tensors read one at a time in a chosen dtype.

use std::path::{Path, PathBuf};

use zerotune_hf::manifest::NonFinite;
use zerotune_hf::{CodeGenConfig, Dtype, ModelConfig, RawTensor, WeightFiles};

use crate::cast::cast_into;
use crate::{ConvertError, Result};

pub struct Source {
    pub dir: PathBuf,
    pub config: CodeGenConfig,
    pub weights: WeightFiles,
}

impl Source {
    /// Opens `dir`; a zerotune `checkpoint-<step>/` is read through its `model/` directory. A
    /// checkpoint must be complete and match its manifest; weights without one are scanned, and
    /// non-finite values are refused unless `nonfinite` allows them.
    pub fn open(dir: &Path, nonfinite: NonFinite) -> Result<Self> {
        zerotune_hf::manifest::verify_model_dir(dir, nonfinite)?;
        let dir = zerotune_hf::model_dir(dir);
        let config = match ModelConfig::from_dir(&dir)? {
            ModelConfig::CodeGen(config) => config,
            other => return Err(ConvertError::NotCodeGen { dir, model_type: other.model_type() }),
        };
        let weights = WeightFiles::open(&dir)?;
        weights.check(&dir, config.parameter_shapes().iter().map(|(name, shape)| (name.as_str(), shape.as_slice())))?;
        Ok(Self { dir, config, weights })
    }

    /// The dtype most parameters are stored in (the "source precision").
    pub fn dtype(&self) -> Dtype {
        self.weights.info("transformer.wte.weight").map_or(Dtype::F32, |(d, _)| d)
    }

    /// Tensor `name` converted to `dtype` (a plain copy when it already is).
    pub fn read(&self, name: &str, dtype: Dtype) -> zerotune_hf::Result<RawTensor> {
        let shape = self.weights.info(name).ok_or_else(|| self.missing(name))?.1.to_vec();
        let data = self.bytes(name, dtype)?;
        Ok(RawTensor { dtype, shape, data })
    }

    /// The bytes of tensor `name` in `dtype`, read through a checked read (a file that shrinks
    /// under the conversion is an error naming it) and cast: one tensor deep in memory.
    pub fn bytes(&self, name: &str, dtype: Dtype) -> zerotune_hf::Result<Vec<u8>> {
        let (from, _) = self.weights.info(name).ok_or_else(|| self.missing(name))?;
        let stored = self.weights.read_bytes(name)?;
        if from == dtype {
            return Ok(stored);
        }
        let mut data = vec![];
        cast_into(&mut data, &stored, from, dtype);
        Ok(data)
    }

    /// Tensor `name` as stored: dtype, shape and its bytes, through a checked read.
    pub fn stored(&self, name: &str) -> zerotune_hf::Result<(Dtype, &[usize], Vec<u8>)> {
        let (dtype, shape) = self.weights.info(name).ok_or_else(|| self.missing(name))?;
        Ok((dtype, shape, self.weights.read_bytes(name)?))
    }

    fn missing(&self, name: &str) -> zerotune_hf::Error {
        zerotune_hf::Error::Invalid { path: self.dir.clone(), message: format!("missing tensor {name}") }
    }
}

/// Parses `fp32|fp16|bf16` (and torch spellings).
pub fn parse_dtype(name: &str) -> Result<Dtype> {
    Dtype::float_named(name).ok_or_else(|| ConvertError::Invalid(format!("--dtype {name:?}: expected fp32, fp16 or bf16")))
}
