//! Writes tensors as HF does: `model.safetensors`, or shards of at most 5 GB named
//! `model-0000k-of-0000n.safetensors` plus `model.safetensors.index.json`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use crate::{invalid, io_err, Dtype, RawTensor, Result};

/// HF's default `max_shard_size` ("5GB", decimal).
pub const MAX_SHARD_BYTES: usize = 5_000_000_000;

struct View<'a>(&'a RawTensor);

impl safetensors::View for View<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.0.dtype.to_safetensors()
    }
    fn shape(&self) -> &[usize] {
        &self.0.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.0.data)
    }
    fn data_len(&self) -> usize {
        self.0.data.len()
    }
}

/// Writes `tensors` into `dir` as (possibly sharded) safetensors with `{"format": "pt"}` metadata,
/// which `from_pretrained` requires. Returns the file names written.
pub fn write_safetensors(dir: &Path, tensors: &[(String, RawTensor)], max_shard_bytes: usize) -> Result<Vec<String>> {
    let mut shards: Vec<Vec<&(String, RawTensor)>> = vec![vec![]];
    let mut shard_bytes = 0;
    for item in tensors {
        let bytes = item.1.data.len();
        if shard_bytes > 0 && shard_bytes + bytes > max_shard_bytes {
            shards.push(vec![]);
            shard_bytes = 0;
        }
        shards.last_mut().expect("one shard").push(item);
        shard_bytes += bytes;
    }
    let n = shards.len();
    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    let mut names = vec![];
    let mut weight_map = serde_json::Map::new();
    for (k, shard) in shards.iter().enumerate() {
        let name = if n == 1 { "model.safetensors".to_string() } else { format!("model-{:05}-of-{n:05}.safetensors", k + 1) };
        let path = dir.join(&name);
        let views = shard.iter().map(|(tensor_name, t)| (tensor_name.as_str(), View(t)));
        safetensors::serialize_to_file(views, metadata.clone(), &path)
            .map_err(|e| invalid(&path, format!("cannot write: {e}")))?;
        for (tensor_name, _) in shard {
            weight_map.insert(tensor_name.clone(), name.clone().into());
        }
        names.push(name);
    }
    if n > 1 {
        let total: usize = tensors.iter().map(|(_, t)| t.data.len()).sum();
        let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let path = dir.join("model.safetensors.index.json");
        write_json(&path, &index)?;
        names.push("model.safetensors.index.json".into());
    }
    Ok(names)
}

/// Writes pretty JSON with a trailing newline.
pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("JSON values serialise") + "\n";
    std::fs::write(path, text).map_err(io_err(path))
}

/// The dtype name HF puts in config.json for tensors of `dtype`.
pub fn torch_dtype_name(dtype: Dtype) -> &'static str {
    dtype.torch_name()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::WeightFiles;

    #[test]
    fn sharded_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let tensors: Vec<(String, RawTensor)> = (0..5)
            .map(|i| (format!("t{i}"), RawTensor::from_f32(vec![2, 3], &[i as f32; 6])))
            .collect();
        let names = write_safetensors(dir.path(), &tensors, 50).unwrap();
        // Five 24-byte tensors, at most two per 50-byte shard: three shards plus the index.
        assert_eq!(names.len(), 4, "{names:?}");
        let read = WeightFiles::open(dir.path()).unwrap();
        for (name, t) in &tensors {
            assert_eq!(&read.read(name).unwrap(), t);
        }
    }

    #[test]
    fn truncated_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let t = vec![("w".to_string(), RawTensor::from_f32(vec![4], &[1.0; 4]))];
        write_safetensors(dir.path(), &t, MAX_SHARD_BYTES).unwrap();
        let path = dir.path().join("model.safetensors");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 4]).unwrap();
        let err = WeightFiles::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("model.safetensors"), "{err}");
    }

    #[test]
    fn empty_dir_has_no_weights() {
        let dir = tempfile::tempdir().unwrap();
        let err = WeightFiles::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("no model weights"), "{err}");
    }
}
