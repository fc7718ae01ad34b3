//! Reads tensors by name from an HF model directory, whatever the layout: `model.safetensors`,
//! `pytorch_model.bin` (torch.save zip + pickle), or either sharded behind an `*.index.json`.
//! Files are memory-mapped and each tensor is read on demand, so the whole model is never held.
//! Readers that must survive a file changing under them (convert, manifest checks) use the
//! checked reads instead (`read_bytes`, `for_each_piece`, `first_nonfinite`): positioned reads
//! that turn a file that shrank into an error naming it, where a mapping would die of SIGBUS.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::{invalid, io_err, Dtype, Error, Result};

/// `values` as safetensors stores F32: little-endian bytes.
pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// One tensor's bytes, little-endian, C-contiguous.
#[derive(Clone, Debug, PartialEq)]
pub struct RawTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl RawTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn from_f32(shape: Vec<usize>, values: &[f32]) -> Self {
        Self { dtype: Dtype::F32, shape, data: f32_bytes(values) }
    }

    /// The values widened to f32 (float dtypes only).
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        let chunks = |n| self.data.chunks_exact(n);
        Some(match self.dtype {
            Dtype::F32 => chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect(),
            Dtype::F16 => chunks(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::Bf16 => chunks(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::F64 => chunks(8).map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32).collect(),
            _ => return None,
        })
    }
}

/// Where one tensor lives: which mapped file, at which byte range.
#[derive(Clone, Debug)]
struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// The weight files of a model directory, indexed by tensor name.
pub struct WeightFiles {
    paths: Vec<PathBuf>,
    files: Vec<File>,
    maps: Vec<Mmap>,
    entries: BTreeMap<String, Entry>,
}

impl WeightFiles {
    /// Finds and indexes the weights in `dir`, preferring safetensors like HF does.
    pub fn open(dir: &Path) -> Result<Self> {
        let candidates = ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"];
        let found = candidates.iter().map(|name| dir.join(name)).find(|p| p.is_file());
        let Some(first) = found else {
            if !dir.is_dir() {
                return Err(invalid(dir, "model directory does not exist"));
            }
            return Err(Error::NoWeights { dir: dir.into() });
        };
        let files = if first.extension().is_some_and(|e| e == "json") { shard_files(&first)? } else { vec![first] };
        let mut weights = Self { paths: vec![], files: vec![], maps: vec![], entries: BTreeMap::new() };
        for path in files {
            weights.add_file(&path)?;
        }
        Ok(weights)
    }

    /// Indexes a single `.safetensors` or `.bin` file.
    pub fn open_file(path: &Path) -> Result<Self> {
        let mut weights = Self { paths: vec![], files: vec![], maps: vec![], entries: BTreeMap::new() };
        weights.add_file(path)?;
        Ok(weights)
    }

    fn add_file(&mut self, path: &Path) -> Result<()> {
        let file = File::open(path).map_err(io_err(path))?;
        // SAFETY: checkpoint files are not modified while a run reads them.
        let map = unsafe { Mmap::map(&file) }.map_err(io_err(path))?;
        let index = self.maps.len();
        let entries = if path.extension().is_some_and(|e| e == "safetensors") {
            safetensors_entries(path, &map, index)?
        } else {
            pth_entries(path, &map, index)?
        };
        for (name, entry) in entries {
            if entry.end > map.len() {
                return Err(invalid(
                    path,
                    format!("tensor {name} needs bytes up to {} but the file has {}: truncated file?", entry.end, map.len()),
                ));
            }
            self.entries.insert(name, entry);
        }
        self.paths.push(path.into());
        self.files.push(file);
        self.maps.push(map);
        Ok(())
    }

    /// Checks that every `(name, shape)` in `expected` is here, with that shape, in a float dtype:
    /// all missing names are counted first (`dir` names the model in that error), then each
    /// tensor's shape and dtype in order.
    pub fn check<'a>(&self, dir: &Path, expected: impl IntoIterator<Item = (&'a str, &'a [usize])>) -> Result<()> {
        let expected: Vec<(&str, &[usize])> = expected.into_iter().collect();
        let missing: Vec<&str> = expected.iter().map(|&(name, _)| name).filter(|name| !self.contains(name)).collect();
        if let Some(first) = missing.first() {
            return Err(Error::MissingTensors { dir: dir.into(), count: missing.len(), first: first.to_string() });
        }
        for (name, shape) in expected {
            let entry = &self.entries[name];
            let path = || self.paths[entry.file].clone();
            if entry.shape != shape {
                return Err(Error::ShapeMismatch { path: path(), name: name.into(), found: entry.shape.clone(), expected: shape.to_vec() });
            }
            if !entry.dtype.is_float() {
                return Err(Error::NotFloat { path: path(), name: name.into(), dtype: entry.dtype });
            }
        }
        Ok(())
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Dtype and shape of `name` without reading it.
    pub fn info(&self, name: &str) -> Option<(Dtype, &[usize])> {
        self.entries.get(name).map(|e| (e.dtype, e.shape.as_slice()))
    }

    /// The bytes of `name` as stored (borrowed from the mapping).
    pub fn bytes(&self, name: &str) -> Option<&[u8]> {
        self.entries.get(name).map(|e| &self.maps[e.file][e.start..e.end])
    }

    /// The file holding `name`, for error messages.
    pub fn path_of(&self, name: &str) -> Option<&Path> {
        self.entries.get(name).map(|e| self.paths[e.file].as_path())
    }

    /// The bytes of `name` as stored, through a checked read (see the module doc).
    pub fn read_bytes(&self, name: &str) -> Result<Vec<u8>> {
        let e = self.entries.get(name).ok_or_else(|| invalid(&self.paths[0], format!("no tensor {name}")))?;
        let mut bytes = vec![0; e.end - e.start];
        self.read_at(e.file, e.start, &mut bytes)?;
        Ok(bytes)
    }

    /// Fills `into` from file `file` at byte `at`; a file now shorter than that is an error.
    fn read_at(&self, file: usize, at: usize, into: &mut [u8]) -> Result<()> {
        let path = &self.paths[file];
        self.files[file].read_exact_at(into, at as u64).map_err(|source| match source.kind() {
            std::io::ErrorKind::UnexpectedEof => Error::Shrank { path: path.clone(), needed: (at + into.len()) as u64 },
            _ => io_err(path.clone())(source).into(),
        })
    }

    /// Visits bytes `[start, end)` of file `file` in checked reads of at most `PIECE` bytes.
    fn visit_range(&self, file: usize, start: usize, end: usize, buf: &mut Vec<u8>, visit: &mut impl FnMut(&[u8])) -> Result<()> {
        let mut at = start;
        while at < end {
            let len = PIECE.min(end - at);
            buf.resize(len, 0);
            self.read_at(file, at, buf)?;
            visit(buf);
            at += len;
        }
        Ok(())
    }

    /// Walks every byte of the files in order, once, through checked reads: each tensor with its
    /// dtype, the header and any bytes between tensors without one, in pieces of at most 16 MiB
    /// (a multiple of every element size). The pieces of a file concatenate to the file. Tensors
    /// of a safetensors file never overlap; bytes two tensors of a .bin share (views) come once,
    /// and the rest of an overlapping tensor comes without a dtype (it may not start on an element).
    pub fn for_each_piece(&self, mut visit: impl FnMut(&[u8], Option<Dtype>)) -> Result<()> {
        let mut buf = vec![];
        for (file, map) in self.maps.iter().enumerate() {
            let mut tensors: Vec<&Entry> = self.entries.values().filter(|e| e.file == file).collect();
            tensors.sort_by_key(|e| (e.start, e.end));
            let mut at = 0;
            for e in tensors {
                if e.start > at {
                    self.visit_range(file, at, e.start, &mut buf, &mut |piece| visit(piece, None))?;
                }
                let start = e.start.max(at);
                if e.end > start {
                    let dtype = (start == e.start).then_some(e.dtype);
                    self.visit_range(file, start, e.end, &mut buf, &mut |piece| visit(piece, dtype))?;
                    at = e.end;
                }
            }
            self.visit_range(file, at, map.len(), &mut buf, &mut |piece| visit(piece, None))?;
        }
        Ok(())
    }

    /// The first tensor (in name order) holding NaN or infinite values, and how many, through
    /// checked reads of at most 16 MiB.
    pub fn first_nonfinite(&self) -> Result<Option<(&str, u64)>> {
        let mut buf = vec![];
        for (name, e) in &self.entries {
            let mut count = 0;
            self.visit_range(e.file, e.start, e.end, &mut buf, &mut |piece| count += e.dtype.count_nonfinite(piece))?;
            if count > 0 {
                return Ok(Some((name, count)));
            }
        }
        Ok(None)
    }

    pub fn read(&self, name: &str) -> Option<RawTensor> {
        let entry = self.entries.get(name)?;
        let data = self.maps[entry.file][entry.start..entry.end].to_vec();
        Some(RawTensor { dtype: entry.dtype, shape: entry.shape.clone(), data })
    }
}

/// The most bytes one checked read of `for_each_piece` or `first_nonfinite` holds: 16 MiB, a
/// multiple of every element size, so a tensor's pieces start on elements.
const PIECE: usize = 16 << 20;

/// The distinct shard files named by an HF `*.index.json` weight map, in order of appearance.
fn shard_files(index_path: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index_path).map_err(io_err(index_path))?;
    let index: serde_json::Value = serde_json::from_str(&text).map_err(|source| Error::Json { path: index_path.into(), source })?;
    let map = index.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| invalid(index_path, "no \"weight_map\" object"))?;
    let dir = index_path.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = vec![];
    for file in map.values() {
        let file = file.as_str().ok_or_else(|| invalid(index_path, "weight_map values must be file names"))?;
        let path = dir.join(file);
        if !files.contains(&path) {
            if !path.is_file() {
                return Err(invalid(index_path, format!("names shard {file}, which is missing")));
            }
            files.push(path);
        }
    }
    Ok(files)
}

fn safetensors_entries(path: &Path, map: &[u8], file: usize) -> Result<Vec<(String, Entry)>> {
    let (header_len, metadata) = safetensors::SafeTensors::read_metadata(map)
        .map_err(|e| invalid(path, format!("not a valid safetensors file, truncated or corrupt? ({e})")))?;
    let base = 8 + header_len;
    let mut entries = vec![];
    for (name, info) in metadata.tensors() {
        let dtype = Dtype::from_safetensors(info.dtype)
            .ok_or_else(|| invalid(path, format!("tensor {name} has unsupported dtype {:?}", info.dtype)))?;
        let (start, end) = info.data_offsets;
        entries.push((name, Entry { file, dtype, shape: info.shape.clone(), start: base + start, end: base + end }));
    }
    Ok(entries)
}

/// Indexes a torch.save zip: the pickle names each tensor's storage record, dtype, shape,
/// strides and offset; records are stored uncompressed, so tensors are slices of the mapping.
fn pth_entries(path: &Path, map: &[u8], file: usize) -> Result<Vec<(String, Entry)>> {
    use candle_core::pickle::{Object, Stack};
    let bad = |message: String| invalid(path, message);
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(map))
        .map_err(|e| bad(format!("not a torch.save zip archive ({e}); legacy non-zip .bin files are not supported")))?;
    let pkl = (0..zip.len())
        .filter_map(|i| zip.name_for_index(i)?.ok().map(|n| n.into_owned()))
        .find(|n| n.ends_with("data.pkl"))
        .ok_or_else(|| bad("no data.pkl in the archive".into()))?;
    let dir = pkl.strip_suffix(".pkl").unwrap_or("data").to_string();
    let object = {
        let reader = zip.by_name(&pkl).map_err(|e| bad(format!("{pkl}: {e}")))?;
        let mut reader = std::io::BufReader::new(reader);
        let mut stack = Stack::empty();
        stack.read_loop(&mut reader).map_err(|e| bad(format!("cannot unpickle {pkl}: {e}")))?;
        stack.finalize().map_err(|e| bad(format!("cannot unpickle {pkl}: {e}")))?
    };
    let Object::Dict(items) = object else {
        return Err(bad("the pickle is not a state dict (expected a dict of tensors)".into()));
    };
    // Storage record name -> (offset of its bytes in the file, stored length).
    let mut records: HashMap<String, (usize, usize)> = HashMap::new();
    for i in 0..zip.len() {
        let entry = zip.by_index_raw(i).map_err(|e| bad(format!("zip entry {i}: {e}")))?;
        if entry.compression() != zip::CompressionMethod::Stored {
            continue;
        }
        let (Some(start), Ok(name)) = (entry.data_start(), entry.name()) else { continue };
        records.insert(name.into_owned(), (start as usize, entry.size() as usize));
    }
    let mut entries = vec![];
    for (name, value) in items {
        let Object::Unicode(ref key) = name else { continue };
        // Legacy buffers (bool masks, masked_bias) are not parameters.
        if key.ends_with("attn.causal_mask") || key.ends_with("attn.masked_bias") || key.ends_with(".attn.bias") {
            continue;
        }
        let key = key.clone();
        let info = match value.into_tensor_info(name, Path::new(&dir)) {
            Ok(Some(info)) => info,
            Ok(None) => continue,
            Err(e) => return Err(bad(format!("tensor {key}: {e}"))),
        };
        let dtype = Dtype::from_candle(info.dtype).ok_or_else(|| bad(format!("tensor {key} has unsupported dtype {:?}", info.dtype)))?;
        if !info.layout.is_contiguous() {
            return Err(bad(format!("tensor {key} is stored non-contiguous; re-save it with save_pretrained")));
        }
        let record = info.path.replace('\\', "/");
        let (start, len) = *records.get(&record).ok_or_else(|| bad(format!("tensor {key}: storage {record} missing or compressed")))?;
        let offset = start + info.layout.start_offset() * dtype.size();
        let shape = info.layout.dims().to_vec();
        let bytes = shape.iter().product::<usize>() * dtype.size();
        if info.layout.start_offset() * dtype.size() + bytes > len {
            return Err(bad(format!("tensor {key}: storage {record} is shorter than the tensor (truncated file?)")));
        }
        entries.push((key, Entry { file, dtype, shape, start: offset, end: offset + bytes }));
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::write::{write_safetensors, MAX_SHARD_BYTES};

    #[test]
    fn checked_reads_turn_a_file_that_shrank_into_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let tensors =
            vec![("a".to_string(), RawTensor::from_f32(vec![64], &[1.5; 64])), ("b".to_string(), RawTensor::from_f32(vec![4], &[2.0; 4]))];
        write_safetensors(dir.path(), &tensors, MAX_SHARD_BYTES).unwrap();
        let files = WeightFiles::open(dir.path()).unwrap();
        assert_eq!(files.read_bytes("a").unwrap(), tensors[0].1.data);
        let path = dir.path().join("model.safetensors");
        let whole = std::fs::read(&path).unwrap();
        let mut pieces = vec![];
        files.for_each_piece(|piece, _| pieces.extend_from_slice(piece)).unwrap();
        assert_eq!(pieces, whole, "the pieces concatenate to the file");
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(whole.len() as u64 - 200).unwrap();
        let shrank = |err: Error| matches!(&err, Error::Shrank { path: p, .. } if *p == path);
        assert!(shrank(files.read_bytes("a").unwrap_err()));
        assert!(shrank(files.for_each_piece(|_, _| {}).unwrap_err()));
        assert!(shrank(files.first_nonfinite().unwrap_err()));
    }

    #[test]
    fn check_names_the_missing_the_misshapen_and_the_non_float() {
        let dir = tempfile::tempdir().unwrap();
        let ints = RawTensor { dtype: Dtype::I64, shape: vec![2], data: vec![0; 16] };
        let tensors = vec![("a".to_string(), RawTensor::from_f32(vec![2, 3], &[0.0; 6])), ("i".to_string(), ints)];
        write_safetensors(dir.path(), &tensors, MAX_SHARD_BYTES).unwrap();
        let files = WeightFiles::open(dir.path()).unwrap();
        let check = |expected: &[(&str, &[usize])]| files.check(dir.path(), expected.iter().copied()).map_err(|e| e.to_string());
        assert_eq!(check(&[("a", &[2, 3])]), Ok(()));
        let missing = check(&[("a", &[2, 3]), ("b", &[1]), ("c", &[1])]).unwrap_err();
        assert!(missing.contains("lacks 2 tensor(s)") && missing.contains("e.g. b"), "{missing}");
        let shape = check(&[("a", &[3, 2])]).unwrap_err();
        assert!(shape.contains("model.safetensors: tensor a has shape [2, 3] but config.json implies [3, 2]"), "{shape}");
        let dtype = check(&[("i", &[2])]).unwrap_err();
        assert!(dtype.contains("tensor i is stored as I64"), "{dtype}");
    }
}
