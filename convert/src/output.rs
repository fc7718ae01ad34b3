//! Output directories are written beside their final place and renamed in only when complete,
//! so a failed or interrupted conversion (bad input, full disk) never leaves a half-written
//! model where a server would load it, and `--force` replaces an old one only on success. An
//! output that is, holds or lies inside the input is refused, `--force` or not: replacing it
//! would delete what is being converted.

use std::path::{Component, Path, PathBuf};

use crate::{ConvertError, Result};

pub struct Staged {
    partial: PathBuf,
    target: PathBuf,
    committed: bool,
}

/// How an output directory lies against the input directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overlap {
    /// The same directory.
    Same,
    /// The output holds the input (a run dir above a checkpoint, or any dir above it).
    Contains,
    /// The output lies inside the input.
    Inside,
}

impl std::fmt::Display for Overlap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Same => "is",
            Self::Contains => "contains",
            Self::Inside => "lies inside",
        })
    }
}

impl Staged {
    /// Refuses a `target` that overlaps `input`, and an existing `target` unless `force`; creates
    /// the empty staging directory.
    pub fn new(target: &Path, force: bool, input: &Path) -> Result<Self> {
        let (output, input) = (absolute(target), absolute(input));
        if let Some(overlap) = overlap(&output, &input) {
            return Err(ConvertError::OutputOverlapsInput { output, input, overlap });
        }
        if target.exists() && !force {
            return Err(ConvertError::Invalid(format!("{} already exists; pass --force to replace it", target.display())));
        }
        let name = target.file_name().ok_or_else(|| ConvertError::Invalid(format!("{}: not a directory name", target.display())))?;
        let partial = target.with_file_name(format!(".{}.partial", name.to_string_lossy()));
        let io = |e: std::io::Error| ConvertError::Invalid(format!("cannot create {}: {e}", partial.display()));
        if partial.exists() {
            std::fs::remove_dir_all(&partial).map_err(io)?;
        }
        std::fs::create_dir_all(&partial).map_err(io)?;
        Ok(Self { partial, target: target.to_path_buf(), committed: false })
    }

    /// Where to write.
    pub fn path(&self) -> &Path {
        &self.partial
    }

    /// Moves the finished directory into place, replacing an old one.
    pub fn commit(mut self) -> Result<()> {
        let io = |e: std::io::Error| ConvertError::Invalid(format!("cannot move the output into {}: {e}", self.target.display()));
        if self.target.exists() {
            std::fs::remove_dir_all(&self.target).map_err(io)?;
        }
        std::fs::rename(&self.partial, &self.target).map_err(io)?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.partial);
        }
    }
}

/// How `output` lies against `input`, both absolute and normalised, if they overlap at all.
pub fn overlap(output: &Path, input: &Path) -> Option<Overlap> {
    if output == input {
        Some(Overlap::Same)
    } else if input.starts_with(output) {
        Some(Overlap::Contains)
    } else if output.starts_with(input) {
        Some(Overlap::Inside)
    } else {
        None
    }
}

/// `path` made absolute with its links resolved: the longest existing ancestor canonicalised,
/// the rest appended with `.` and `..` applied, so a path that does not exist yet compares too.
pub fn absolute(path: &Path) -> PathBuf {
    let joined = std::env::current_dir().map(|cwd| cwd.join(path)).unwrap_or_else(|_| path.to_path_buf());
    let mut normal = PathBuf::new();
    for part in joined.components() {
        match part {
            Component::ParentDir => {
                normal.pop();
            }
            Component::CurDir => {}
            other => normal.push(other),
        }
    }
    let mut existing = normal.as_path();
    let mut rest = vec![];
    loop {
        if let Ok(real) = existing.canonicalize() {
            return rest.iter().rev().fold(real, |dir, name| dir.join(name));
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                existing = parent;
            }
            _ => return normal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_output_that_is_holds_or_lies_inside_the_input_overlaps() {
        let p = Path::new;
        assert_eq!(overlap(p("/r/run"), p("/r/run")), Some(Overlap::Same));
        assert_eq!(overlap(p("/r/run"), p("/r/run/checkpoint-4")), Some(Overlap::Contains));
        assert_eq!(overlap(p("/"), p("/r/run")), Some(Overlap::Contains));
        assert_eq!(overlap(p("/r/run/checkpoint-4/gptj"), p("/r/run/checkpoint-4")), Some(Overlap::Inside));
        assert_eq!(overlap(p("/r/run/gptj"), p("/r/run/checkpoint-4")), None);
        assert_eq!(overlap(p("/r/run-2"), p("/r/run")), None, "components, not string prefixes");
    }

    #[test]
    fn absolute_resolves_links_dots_and_paths_not_yet_made() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().canonicalize().unwrap();
        std::fs::create_dir(real.join("run")).unwrap();
        std::os::unix::fs::symlink(real.join("run"), real.join("link")).unwrap();
        assert_eq!(absolute(&real.join("link/../link/new/x")), real.join("run/new/x"));
        assert_eq!(absolute(&real.join("run/./checkpoint-4")), real.join("run/checkpoint-4"));
        let refused = Staged::new(&real.join("link"), true, &real.join("run/checkpoint-4")).err().unwrap().to_string();
        assert!(refused.contains("contains the input") && refused.contains("choose an output outside"), "{refused}");
        assert!(real.join("run").is_dir() && !real.join(".link.partial").exists(), "nothing is touched");
    }
}
