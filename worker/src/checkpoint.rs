//! Model weights in and out of HF layout: fill a `ParamSet` from any HF weight files (checking
//! names and shapes against config.json), and write the fp32 master weights back as safetensors
//! with config.json and generation_config.json.

use std::path::Path;

use tch::{Kind, Tensor};
use zerotune_hf::write::{write_json, write_safetensors, MAX_SHARD_BYTES};
use zerotune_hf::{CodeGenConfig, Dtype, RawTensor, WeightFiles};

use crate::error::{Result, WorkerError};
use crate::model::ParamSet;

/// Copies every parameter from the weight files in `dir` into `params` (any float dtype in,
/// the ParamSet's dtype out).
pub fn load_weights(params: &mut ParamSet, dir: &Path) -> Result<()> {
    let files = WeightFiles::open(dir)?;
    let missing: Vec<&str> = params.slots.iter().map(|s| s.name.as_str()).filter(|n| !files.contains(n)).collect();
    if let Some(first) = missing.first() {
        return Err(WorkerError::MissingTensors { dir: dir.into(), count: missing.len(), first: first.to_string() });
    }
    let _guard = tch::no_grad_guard();
    for (slot, tensor) in params.slots.iter().zip(params.tensors.iter_mut()) {
        let (dtype, shape) = files.info(&slot.name).expect("presence checked");
        let path = files.path_of(&slot.name).expect("presence checked").to_path_buf();
        if shape != slot.shape.as_slice() {
            return Err(WorkerError::ShapeMismatch { path, name: slot.name.clone(), found: shape.to_vec(), expected: slot.shape.clone() });
        }
        let kind = match dtype {
            Dtype::F32 => Kind::Float,
            Dtype::F16 => Kind::Half,
            Dtype::Bf16 => Kind::BFloat16,
            Dtype::F64 => Kind::Double,
            other => return Err(WorkerError::NotFloat { path, name: slot.name.clone(), dtype: other }),
        };
        let bytes = files.bytes(&slot.name).expect("presence checked");
        let source = Tensor::f_from_data_size(bytes, &[slot.numel as i64], kind)?;
        tensor.view(-1).f_copy_(&source)?;
    }
    Ok(())
}

/// Writes `master` (the flat fp32 weights in `params`' layout) as an HF CodeGen directory.
pub fn save_model(dir: &Path, config: &CodeGenConfig, params: &ParamSet, master: &[f32]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(crate::error::io_err(dir))?;
    let tensors: Vec<(String, RawTensor)> = params
        .slots
        .iter()
        .map(|s| (s.name.clone(), RawTensor::from_f32(s.shape.clone(), &master[s.offset..s.offset + s.numel])))
        .collect();
    write_safetensors(dir, &tensors, MAX_SHARD_BYTES)?;
    write_json(&dir.join("config.json"), &config.to_hf_json("float32"))?;
    let generation = serde_json::json!({
        "_from_model_config": true,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
    });
    write_json(&dir.join("generation_config.json"), &generation)?;
    Ok(())
}

/// The flat parameters as host f32 values.
pub fn flat_to_f32(params: &ParamSet) -> Vec<f32> {
    let host = params.flat.to_device(tch::Device::Cpu).to_kind(Kind::Float).contiguous();
    let mut out = vec![0f32; params.numel()];
    host.copy_data(&mut out, params.numel());
    out
}
