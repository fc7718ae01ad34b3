//! A saved model's completion manifest, `manifest.json`: each file's size and blake3 hash and
//! the count of non-finite values in its tensors. It is written last, so a checkpoint with one is
//! complete; resume, convert and the model loaders verify it before trusting the files, and scan a
//! directory without one (a plain HF model) for non-finite weights instead.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::read::WeightFiles;
use crate::{invalid, io_err, Error, Result};

pub use crate::layout::MANIFEST_FILE;

/// What a complete save holds: file path (relative, `/`-separated) -> its entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub files: BTreeMap<String, FileEntry>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub bytes: u64,
    pub blake3: String,
    /// NaN or infinite values in its tensors (safetensors files; 0 for others).
    pub nonfinite: u64,
}

impl Manifest {
    /// The manifest of `files` (relative paths) under `dir`.
    pub fn of_files<'a>(dir: &Path, files: impl IntoIterator<Item = &'a str>) -> Result<Self> {
        let files = files.into_iter().map(|name| Ok((name.to_string(), entry(&dir.join(name))?))).collect::<Result<_>>()?;
        Ok(Self { files })
    }

    /// The manifest of every file under `dir` (a checkpoint), except an old manifest.
    pub fn of_tree(dir: &Path) -> Result<Self> {
        let mut names = vec![];
        walk(dir, "", &mut names)?;
        names.retain(|n| n != MANIFEST_FILE);
        Self::of_files(dir, names.iter().map(String::as_str))
    }

    /// NaN or infinite values in all files.
    pub fn nonfinite(&self) -> u64 {
        self.files.values().map(|f| f.nonfinite).sum()
    }

    /// Writes `dir/manifest.json`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        crate::write::write_json(&dir.join(MANIFEST_FILE), &serde_json::to_value(self).expect("a manifest serialises"))
    }

    /// `dir/manifest.json`, if there is one.
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(MANIFEST_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e).into()),
        };
        serde_json::from_str(&text).map(Some).map_err(|e| invalid(&path, format!("not a zerotune manifest ({e}); the save was damaged")))
    }

    /// Checks the files of `dir` whose paths start with `prefix` against their entries: present,
    /// same size, same hash. The error names the first file that differs.
    pub fn verify(&self, dir: &Path, prefix: &str) -> Result<()> {
        for (name, want) in self.files.iter().filter(|(name, _)| name.starts_with(prefix)) {
            let path = dir.join(name);
            let damaged = |what: String| {
                invalid(&path, format!("{what}: the file was changed or damaged after it was saved; use another checkpoint"))
            };
            let bytes = std::fs::metadata(&path).map_err(|e| damaged(format!("listed in {MANIFEST_FILE} but unreadable ({e})")))?.len();
            if bytes != want.bytes {
                return Err(damaged(format!("{bytes} bytes where {MANIFEST_FILE} records {}", want.bytes)));
            }
            if hash(&path)? != want.blake3 {
                return Err(damaged(format!("its content differs from the hash {MANIFEST_FILE} records")));
            }
        }
        Ok(())
    }
}

/// How far a model directory is trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NonFinite {
    /// NaN or infinite weights are refused, naming the tensor.
    Refuse,
    /// They are loaded anyway (`--allow_nonfinite`), with a warning.
    Allow,
}

/// Checks a model directory before it is loaded: inside a checkpoint (`checkpoint-<step>/model`),
/// the checkpoint's manifest must exist and match; a directory with its own manifest (a final
/// model) must match it; any other (a plain HF model) is scanned. Non-finite weights are then
/// refused, naming the tensor, unless allowed.
pub fn verify_model_dir(dir: &Path, nonfinite: NonFinite) -> Result<()> {
    let dir = crate::model_dir(dir);
    let (root, prefix) = match crate::layout::checkpoint_root(&dir) {
        Some(root) => (root, "model/"),
        None => (dir.clone(), ""),
    };
    let manifest = Manifest::read(&root)?;
    // Scan the weights when the manifest counts non-finite values among them, or when there is no
    // manifest (a plain HF dir) to say.
    let scan = match &manifest {
        Some(manifest) => {
            manifest.verify(&root, prefix)?;
            manifest.files.iter().any(|(name, f)| name.starts_with(prefix) && f.nonfinite > 0)
        }
        None if prefix.is_empty() => true,
        None => return Err(incomplete(&root)),
    };
    if !scan {
        return Ok(());
    }
    let weights = WeightFiles::open(&dir)?;
    let Some((name, count)) = weights.first_nonfinite()? else { return Ok(()) };
    let path = weights.path_of(name).map_or(dir.clone(), Path::to_path_buf);
    match nonfinite {
        NonFinite::Refuse => Err(Error::NonFinite { path, name: name.into(), count }),
        NonFinite::Allow => {
            tracing::warn!("{}: tensor {name} holds {count} NaN or infinite values (loaded anyway: --allow_nonfinite)", path.display());
            Ok(())
        }
    }
}

/// Checks a whole checkpoint (`checkpoint-<step>/`) before a resume: its manifest exists and
/// every file matches. Non-finite values are refused unless allowed.
pub fn verify_checkpoint(dir: &Path, nonfinite: NonFinite) -> Result<()> {
    let manifest = Manifest::read(dir)?.ok_or_else(|| incomplete(dir))?;
    manifest.verify(dir, "")?;
    if let Some((name, entry)) = manifest.files.iter().find(|(_, f)| f.nonfinite > 0) {
        let path = dir.join(name);
        match nonfinite {
            NonFinite::Refuse => {
                return Err(invalid(
                    &path,
                    format!(
                        "holds {} NaN or infinite values; resume from an earlier checkpoint (or pass --allow_nonfinite)",
                        entry.nonfinite
                    ),
                ))
            }
            NonFinite::Allow => {
                tracing::warn!("{}: {} NaN or infinite values (resuming anyway: --allow_nonfinite)", path.display(), entry.nonfinite)
            }
        }
    }
    Ok(())
}

fn incomplete(dir: &Path) -> Error {
    invalid(
        dir,
        format!(
            "an incomplete checkpoint: it has no {MANIFEST_FILE}, so its save never finished; use a complete one (the one `latest` names)"
        ),
    )
}

/// A file's size, hash and non-finite count. A safetensors file is read once, through checked
/// reads: each tensor is hashed and counted in the same pass.
fn entry(path: &Path) -> Result<FileEntry> {
    let bytes = std::fs::metadata(path).map_err(io_err(path))?.len();
    if path.extension().is_none_or(|e| e != "safetensors") {
        return Ok(FileEntry { bytes, blake3: hash(path)?, nonfinite: 0 });
    }
    let weights = WeightFiles::open_file(path)?;
    let (mut hasher, mut nonfinite) = (blake3::Hasher::new(), 0);
    weights.for_each_piece(|piece, dtype| {
        hasher.update(piece);
        nonfinite += dtype.map_or(0, |d| d.count_nonfinite(piece));
    })?;
    Ok(FileEntry { bytes, blake3: hasher.finalize().to_hex().to_string(), nonfinite })
}

fn hash(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(io_err(path))?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().to_hex().to_string())
}

/// Relative paths of the files under `dir/rel`, sorted.
fn walk(dir: &Path, rel: &str, out: &mut Vec<String>) -> Result<()> {
    let here = dir.join(rel);
    let mut entries: Vec<_> = std::fs::read_dir(&here).map_err(io_err(&here))?.collect::<std::io::Result<_>>().map_err(io_err(&here))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = format!("{rel}{}", e.file_name().to_string_lossy());
        if e.file_type().map_err(io_err(e.path()))?.is_dir() {
            walk(dir, &format!("{name}/"), out)?;
        } else {
            out.push(name);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::read::RawTensor;

    /// A checkpoint-like tree: model/ with one safetensors file, optimizer/, trainer_state.json.
    fn checkpoint(values: &[f32]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("model")).unwrap();
        std::fs::create_dir_all(dir.path().join("optimizer")).unwrap();
        let tensors = vec![("w".to_string(), RawTensor::from_f32(vec![values.len()], values))];
        crate::write::write_file(&dir.path().join("model/model.safetensors"), &tensors).unwrap();
        std::fs::write(dir.path().join("model/config.json"), "{}").unwrap();
        std::fs::write(dir.path().join("optimizer/layout.json"), "{}").unwrap();
        std::fs::write(dir.path().join("trainer_state.json"), "{}").unwrap();
        dir
    }

    #[test]
    fn a_manifest_lists_every_file_and_counts_nonfinite_values() {
        let dir = checkpoint(&[1.0, f32::NAN, f32::INFINITY]);
        let manifest = Manifest::of_tree(dir.path()).unwrap();
        let names: Vec<&str> = manifest.files.keys().map(String::as_str).collect();
        assert_eq!(names, ["model/config.json", "model/model.safetensors", "optimizer/layout.json", "trainer_state.json"]);
        assert_eq!(manifest.nonfinite(), 2);
        manifest.write(dir.path()).unwrap();
        assert_eq!(Manifest::read(dir.path()).unwrap(), Some(manifest.clone()));
        // Rebuilt over the tree it ignores its own manifest.
        assert_eq!(Manifest::of_tree(dir.path()).unwrap(), manifest);
    }

    #[test]
    fn a_weight_file_is_hashed_and_counted_in_one_pass_as_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let tensors = vec![
            ("b".to_string(), RawTensor::from_f32(vec![3], &[1.0, f32::NAN, 2.0])),
            ("a".to_string(), RawTensor::from_f32(vec![2, 2], &[f32::INFINITY, 0.0, f32::NEG_INFINITY, 5.0])),
            ("c".to_string(), RawTensor::from_f32(vec![1], &[7.0])),
        ];
        crate::write::write_file(&path, &tensors).unwrap();
        let one_pass = entry(&path).unwrap();
        assert_eq!(one_pass.blake3, hash(&path).unwrap(), "the pieces hash as the whole file");
        assert_eq!(one_pass.nonfinite, 3);
        assert_eq!(one_pass.bytes, std::fs::metadata(&path).unwrap().len());
    }

    #[test]
    fn verification_names_a_changed_missing_or_resized_file() {
        let dir = checkpoint(&[1.0, 2.0]);
        Manifest::of_tree(dir.path()).unwrap().write(dir.path()).unwrap();
        verify_checkpoint(dir.path(), NonFinite::Refuse).unwrap();
        let state = dir.path().join("trainer_state.json");
        std::fs::write(&state, "[]").unwrap(); // same size, other bytes
        let err = verify_checkpoint(dir.path(), NonFinite::Refuse).unwrap_err().to_string();
        assert!(err.contains("trainer_state.json: its content differs from the hash manifest.json records"), "{err}");
        std::fs::write(&state, "{}\n").unwrap();
        let err = verify_checkpoint(dir.path(), NonFinite::Refuse).unwrap_err().to_string();
        assert!(err.contains("trainer_state.json: 3 bytes where manifest.json records 2"), "{err}");
        std::fs::remove_file(&state).unwrap();
        let err = verify_checkpoint(dir.path(), NonFinite::Refuse).unwrap_err().to_string();
        assert!(err.contains("trainer_state.json: listed in manifest.json but unreadable"), "{err}");
        // The model alone still verifies: only model/ files are checked for it.
        verify_model_dir(&dir.path().join("model"), NonFinite::Refuse).unwrap();
    }

    #[test]
    fn a_checkpoint_without_manifest_is_incomplete() {
        let dir = checkpoint(&[1.0]);
        for err in [verify_checkpoint(dir.path(), NonFinite::Allow), verify_model_dir(dir.path(), NonFinite::Allow)] {
            let err = err.unwrap_err().to_string();
            assert!(err.contains("an incomplete checkpoint: it has no manifest.json"), "{err}");
        }
    }

    #[test]
    fn nonfinite_weights_are_refused_by_name_unless_allowed() {
        // A plain HF dir (no manifest) is scanned.
        let dir = tempfile::tempdir().unwrap();
        let tensors = vec![
            ("a".to_string(), RawTensor::from_f32(vec![2], &[1.0, 2.0])),
            ("b".to_string(), RawTensor::from_f32(vec![3], &[f32::NAN, 0.0, f32::NEG_INFINITY])),
        ];
        crate::write::write_file(&dir.path().join("model.safetensors"), &tensors).unwrap();
        let err = verify_model_dir(dir.path(), NonFinite::Refuse).unwrap_err().to_string();
        assert!(err.contains("tensor b holds 2 NaN or infinite values") && err.contains("--allow_nonfinite"), "{err}");
        verify_model_dir(dir.path(), NonFinite::Allow).unwrap();
        // A checkpoint's manifest records them too.
        let ckpt = checkpoint(&[f32::NAN]);
        Manifest::of_tree(ckpt.path()).unwrap().write(ckpt.path()).unwrap();
        let err = verify_checkpoint(ckpt.path(), NonFinite::Refuse).unwrap_err().to_string();
        assert!(err.contains("model/model.safetensors: holds 1 NaN"), "{err}");
        let err = verify_model_dir(ckpt.path(), NonFinite::Refuse).unwrap_err().to_string();
        assert!(err.contains("tensor w holds 1 NaN"), "{err}");
    }
}
