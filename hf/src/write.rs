//! Writes tensors as HF does: `model.safetensors`, or shards of at most 5 GB named
//! `model-0000k-of-0000n.safetensors` plus `model.safetensors.index.json`.

use std::io::Write;
use std::path::Path;

use crate::{invalid, io_err, Dtype, ModelConfig, RawTensor, Result};

/// HF's default `max_shard_size` ("5GB", decimal).
pub const MAX_SHARD_BYTES: usize = 5_000_000_000;

/// Whether a file named `name` belongs to a saved model's directory: its config, generation config,
/// weights (one file or shards and their index).
pub fn is_model_file(name: &str) -> bool {
    matches!(name, "config.json" | "generation_config.json" | "model.safetensors.index.json")
        || (name.starts_with("model") && name.ends_with(".safetensors"))
}

/// One tensor of a safetensors file, described before its bytes exist.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl Entry {
    pub fn bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size()
    }
}

/// Writes `tensors` into `dir` as (possibly sharded) safetensors with `{"format": "pt"}` metadata,
/// which `from_pretrained` requires. Returns the file names written.
pub fn write_safetensors(dir: &Path, tensors: &[(String, RawTensor)], max_shard_bytes: usize) -> Result<Vec<String>> {
    let entries: Vec<Entry> =
        tensors.iter().map(|(name, t)| Entry { name: name.clone(), dtype: t.dtype, shape: t.shape.clone() }).collect();
    stream_safetensors(dir, &entries, max_shard_bytes, |i| Ok(tensors[i].1.data.clone()))
}

/// Writes `tensors` into one safetensors file at `path`, whatever its size or name.
pub fn write_file(path: &Path, tensors: &[(String, RawTensor)]) -> Result<()> {
    let entries: Vec<Entry> =
        tensors.iter().map(|(name, t)| Entry { name: name.clone(), dtype: t.dtype, shape: t.shape.clone() }).collect();
    stream_file(path, &entries, |i| Ok(tensors[i].1.data.clone()))
}

/// Like `write_file`, asking `produce(i)` for entry i's bytes only when writing it.
pub fn stream_file(path: &Path, entries: &[Entry], mut produce: impl FnMut(usize) -> Result<Vec<u8>>) -> Result<()> {
    let all: Vec<usize> = (0..entries.len()).collect();
    write_shard(path, entries, &all, &mut produce)
}

/// Like `write_safetensors`, but asks `produce(i)` for entry i's bytes only when writing it, so
/// a model larger than memory streams through. Shards hold whole tensors, in entry order.
pub fn stream_safetensors(
    dir: &Path,
    entries: &[Entry],
    max_shard_bytes: usize,
    mut produce: impl FnMut(usize) -> Result<Vec<u8>>,
) -> Result<Vec<String>> {
    let mut shards: Vec<Vec<usize>> = vec![vec![]];
    let mut shard_bytes = 0;
    for (i, entry) in entries.iter().enumerate() {
        if shard_bytes > 0 && shard_bytes + entry.bytes() > max_shard_bytes {
            shards.push(vec![]);
            shard_bytes = 0;
        }
        shards.last_mut().expect("one shard").push(i);
        shard_bytes += entry.bytes();
    }
    let n = shards.len();
    let mut names = vec![];
    let mut weight_map = serde_json::Map::new();
    for (k, shard) in shards.iter().enumerate() {
        let name = if n == 1 { "model.safetensors".to_string() } else { format!("model-{:05}-of-{n:05}.safetensors", k + 1) };
        let path = dir.join(&name);
        write_shard(&path, entries, shard, &mut produce)?;
        for &i in shard {
            weight_map.insert(entries[i].name.clone(), name.clone().into());
        }
        names.push(name);
    }
    if n > 1 {
        let total: usize = entries.iter().map(Entry::bytes).sum();
        let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write_json(&dir.join("model.safetensors.index.json"), &index)?;
        names.push("model.safetensors.index.json".into());
    }
    Ok(names)
}

/// The safetensors layout: u64 LE header length, a JSON header padded with spaces to 8 bytes,
/// then the tensors' bytes back to back.
fn write_shard(path: &Path, entries: &[Entry], shard: &[usize], produce: &mut impl FnMut(usize) -> Result<Vec<u8>>) -> Result<()> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut offset = 0;
    for &i in shard {
        let e = &entries[i];
        let dtype = serde_json::to_value(e.dtype.to_safetensors()).expect("dtype serialises");
        header.insert(e.name.clone(), serde_json::json!({"dtype": dtype, "shape": e.shape, "data_offsets": [offset, offset + e.bytes()]}));
        offset += e.bytes();
    }
    let mut header = serde_json::to_vec(&header).expect("header serialises");
    header.resize(header.len().next_multiple_of(8), b' ');
    let file = std::fs::File::create(path).map_err(io_err(path))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    let io = |e| crate::Error::from(io_err(path)(e));
    w.write_all(&(header.len() as u64).to_le_bytes()).map_err(io)?;
    w.write_all(&header).map_err(io)?;
    for &i in shard {
        let bytes = produce(i)?;
        if bytes.len() != entries[i].bytes() {
            return Err(invalid(path, format!("tensor {} has {} bytes, expected {}", entries[i].name, bytes.len(), entries[i].bytes())));
        }
        w.write_all(&bytes).map_err(io)?;
    }
    Ok(w.into_inner().map_err(|e| io(e.into_error()))?.sync_all().map_err(io_err(path))?)
}

/// Writes pretty JSON with a trailing newline.
pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("JSON values serialise") + "\n";
    Ok(std::fs::write(path, text).map_err(io_err(path))?)
}

/// `dir/generation_config.json` as HF writes it beside a model saved from its config: the
/// config's token ids.
pub fn write_generation_config(dir: &Path, config: &ModelConfig) -> Result<()> {
    write_json(&dir.join("generation_config.json"), &config.generation_config())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::WeightFiles;

    #[test]
    fn sharded_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let tensors: Vec<(String, RawTensor)> =
            (0..5).map(|i| (format!("t{i}"), RawTensor::from_f32(vec![2, 3], &[i as f32; 6]))).collect();
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
    fn generation_config_has_the_config_ids() {
        let dir = tempfile::tempdir().unwrap();
        let codegen = crate::CodeGenConfig { bos_token_id: 1, eos_token_id: 2, ..crate::CodeGenConfig::builtin("tiny").unwrap() };
        let config = ModelConfig::CodeGen(codegen);
        write_generation_config(dir.path(), &config).unwrap();
        let text = std::fs::read_to_string(dir.path().join("generation_config.json")).unwrap();
        assert_eq!(text, "{\n  \"_from_model_config\": true,\n  \"bos_token_id\": 1,\n  \"eos_token_id\": 2\n}\n");
    }

    #[test]
    fn empty_dir_has_no_weights() {
        let dir = tempfile::tempdir().unwrap();
        let err = WeightFiles::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("no model weights"), "{err}");
    }
}
