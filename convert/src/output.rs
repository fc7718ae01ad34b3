//! Output directories are written beside their final place and renamed in only when complete,
//! so a failed or interrupted conversion (bad input, full disk) never leaves a half-written
//! model where a server would load it, and `--force` replaces an old one only on success.

use std::path::{Path, PathBuf};

use crate::{ConvertError, Result};

pub struct Staged {
    partial: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl Staged {
    /// Refuses an existing `target` unless `force`; creates the empty staging directory.
    pub fn new(target: &Path, force: bool) -> Result<Self> {
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
