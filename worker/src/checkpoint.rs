//! What a worker reads and writes besides batches: a model's parameters from HF layout (checking
//! names and shapes against config.json) or from its random initialisation, the fp32 master
//! weights back as safetensors with config.json and generation_config.json, and a checkpoint's
//! optimizer state, one slice per rank joined by `optimizer/layout.json`.

use std::ops::Range;
use std::path::Path;

use tch::{Device, Kind, Tensor};
use zerotune_hf::write::{stream_file, stream_safetensors, write_generation_config, write_json, Entry, MAX_SHARD_BYTES};
use zerotune_hf::{f32_bytes, Dtype, ModelConfig, WeightFiles};
use zerotune_proto::plan::ModelSource;
use zerotune_proto::state::{OptimizerLayout, LAYOUT_FILE};

use crate::error::{io_err, Result, WorkerError};
use crate::model::ParamSet;

/// The tensors of an optimizer slice, in order: fp32 master weights, AdamW's first and second
/// moments.
pub const OPTIMIZER_STATE: [&str; 3] = ["master", "exp_avg", "exp_avg_sq"];

/// Loads `source` into a fresh `ParamSet` of `kind` on `device`.
pub fn load_params(source: &ModelSource, kind: Kind, device: Device, trainable: bool, seed: u64) -> Result<(ModelConfig, ParamSet)> {
    let config = model_config(source)?;
    let params = load_params_padded(source, &config, kind, device, trainable, seed, 0)?;
    Ok((config, params))
}

/// The config.json of `source`.
pub fn model_config(source: &ModelSource) -> Result<ModelConfig> {
    Ok(match source {
        ModelSource::Pretrained { dir } => ModelConfig::from_dir(Path::new(dir))?,
        ModelSource::Scratch { config } => ModelConfig::from_value(config.clone()).map_err(|reason| WorkerError::ModelConfig { reason })?,
    })
}

/// Like `load_params`, the flat buffer at least `len` long (ZeRO's padding).
pub fn load_params_padded(
    source: &ModelSource,
    config: &ModelConfig,
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

/// Copies every parameter from the weight files in `dir` into `params` (any float dtype in,
/// the ParamSet's dtype out).
pub fn load_weights(params: &mut ParamSet, dir: &Path) -> Result<()> {
    let files = WeightFiles::open(dir)?;
    files.check(dir, params.slots.iter().map(|s| (s.name.as_str(), s.shape.as_slice())))?;
    let _guard = tch::no_grad_guard();
    for (slot, tensor) in params.slots.iter().zip(params.tensors.iter_mut()) {
        let (dtype, _) = files.info(&slot.name).expect("presence checked");
        let kind = crate::dtype::kind(dtype);
        let bytes = files.bytes(&slot.name).expect("presence checked");
        let source = Tensor::f_from_data_size(bytes, &[slot.numel as i64], kind)?;
        tensor.view(-1).f_copy_(&source)?;
    }
    Ok(())
}

/// Writes `master` (the flat fp32 weights in `params`' layout) as an HF model directory, one
/// tensor's bytes in memory at a time besides `master`.
pub fn save_model(dir: &Path, config: &ModelConfig, params: &ParamSet, master: &[f32]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(crate::error::io_err(dir))?;
    let entries: Vec<Entry> =
        params.slots.iter().map(|s| Entry { name: s.name.clone(), dtype: Dtype::F32, shape: s.shape.clone() }).collect();
    stream_safetensors(dir, &entries, MAX_SHARD_BYTES, |i| {
        let s = &params.slots[i];
        Ok(f32_bytes(&master[s.offset..s.offset + s.numel]))
    })?;
    write_json(&dir.join("config.json"), &config.to_hf_json("float32"))?;
    write_generation_config(dir, config)?;
    Ok(())
}

/// Writes rank `rank` of `world`'s optimizer slice (`state`: the values of `OPTIMIZER_STATE` over
/// its partition of the flat parameters) into `dir`, and `layout` where given (rank 0).
pub fn save_optimizer(dir: &Path, rank: usize, world: usize, state: [&[f32]; 3], layout: Option<&OptimizerLayout>) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let entries: Vec<Entry> = OPTIMIZER_STATE
        .iter()
        .zip(state)
        .map(|(name, values)| Entry { name: name.to_string(), dtype: Dtype::F32, shape: vec![values.len()] })
        .collect();
    stream_file(&dir.join(slice_file(rank, world)), &entries, |i| Ok(f32_bytes(state[i])))?;
    if let Some(layout) = layout {
        write_json(&dir.join(LAYOUT_FILE), &serde_json::to_value(layout).expect("the layout serialises"))?;
    }
    Ok(())
}

/// Reads the optimizer state of `owned` (a range of the flat parameters of a model of `numel`)
/// from `dir`, a checkpoint's `optimizer/`, whatever world size wrote it: the layout, and the
/// values of `OPTIMIZER_STATE` over `owned`.
pub fn load_optimizer(dir: &Path, numel: usize, owned: &Range<usize>) -> Result<(OptimizerLayout, [Vec<f32>; 3])> {
    let path = dir.join(LAYOUT_FILE);
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    let layout: OptimizerLayout = match serde_json::from_str(&text) {
        Ok(layout) => layout,
        Err(source) => return Err(WorkerError::OptimizerLayout { path, source }),
    };
    if layout.numel != numel {
        return Err(WorkerError::OptimizerSize { path, saved: layout.numel, model: numel });
    }
    let world = layout.partitions.len();
    let mut state = [vec![0f32; owned.len()], vec![0f32; owned.len()], vec![0f32; owned.len()]];
    for (r, &[start, end]) in layout.partitions.iter().enumerate() {
        let (from, to) = (start.max(owned.start), end.min(owned.end));
        if from < to {
            read_slice(&dir.join(slice_file(r, world)), start..end, from..to, &mut state, owned.start)?;
        }
    }
    Ok((layout, state))
}

/// Copies `want` (flat indices) from the slice file `path`, which holds `range`, into `state`,
/// whose first element is flat index `state_start`.
fn read_slice(path: &Path, range: Range<usize>, want: Range<usize>, state: &mut [Vec<f32>; 3], state_start: usize) -> Result<()> {
    let files = WeightFiles::open_file(path)?;
    for (values, name) in state.iter_mut().zip(OPTIMIZER_STATE) {
        let bytes = files.bytes(name).ok_or_else(|| WorkerError::MissingTensor { path: path.to_path_buf(), tensor: name })?;
        if bytes.len() != range.len() * 4 {
            let (bytes, expected) = (bytes.len(), range.len() * 4);
            return Err(WorkerError::SliceSize { path: path.to_path_buf(), tensor: name, bytes, expected });
        }
        let src = &bytes[(want.start - range.start) * 4..(want.end - range.start) * 4];
        for (dst, b) in values[want.start - state_start..want.end - state_start].iter_mut().zip(src.chunks_exact(4)) {
            *dst = f32::from_le_bytes(b.try_into().expect("chunks of 4 bytes"));
        }
    }
    Ok(())
}

/// `rank-XXXXX-of-XXXXX.safetensors`: one rank's optimizer slice.
fn slice_file(rank: usize, world: usize) -> String {
    format!("rank-{rank:05}-of-{world:05}.safetensors")
}
