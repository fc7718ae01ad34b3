//! Checkpoint bookkeeping on the coordinator's side: once every rank has written its part of
//! `checkpoint-<step>/`, add the tokenizer files and trainer_state.json, then point `latest` at it
//! by atomic rename, and prune beyond `--save_total_limit`. A crash before the rename leaves the
//! previous checkpoint as `latest`.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{io_err, Result};

pub fn checkpoint_dir(output_dir: &Path, step: u64) -> PathBuf {
    output_dir.join(format!("checkpoint-{step}"))
}

/// Writes `files` (name, bytes) into `dir`.
pub fn write_files(dir: &Path, files: &[(String, Vec<u8>)]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    Ok(zerotune_hf::tokenizer::write_files(dir, files)?)
}

/// Completes checkpoint `step` after all ranks acknowledged it.
pub fn finalize(
    output_dir: &Path,
    step: u64,
    tokenizer_files: &[(String, Vec<u8>)],
    trainer_state: &Value,
    keep: Option<usize>,
) -> Result<()> {
    let dir = checkpoint_dir(output_dir, step);
    write_files(&dir.join("model"), tokenizer_files)?;
    let state = dir.join("trainer_state.json");
    zerotune_hf::write::write_json(&state, trainer_state)?;
    let tmp = output_dir.join("latest.tmp");
    std::fs::write(&tmp, format!("checkpoint-{step}\n")).map_err(io_err(&tmp))?;
    let latest = output_dir.join("latest");
    std::fs::rename(&tmp, &latest).map_err(io_err(&latest))?;
    if let Some(keep) = keep {
        prune(output_dir, keep.max(1))?;
    }
    Ok(())
}

/// Removes the oldest `checkpoint-<step>` directories so that `keep` remain.
fn prune(output_dir: &Path, keep: usize) -> Result<()> {
    let mut steps: Vec<u64> = std::fs::read_dir(output_dir)
        .map_err(io_err(output_dir))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("checkpoint-")?.parse().ok())
        .collect();
    steps.sort_unstable();
    for step in &steps[..steps.len().saturating_sub(keep)] {
        let dir = checkpoint_dir(output_dir, *step);
        std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latest_moves_and_old_checkpoints_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        for step in [5, 10, 15] {
            std::fs::create_dir_all(checkpoint_dir(out, step).join("model")).unwrap();
            finalize(out, step, &[("tokenizer.json".into(), b"{}".to_vec())], &serde_json::json!({"global_step": step}), Some(2)).unwrap();
            assert_eq!(std::fs::read_to_string(out.join("latest")).unwrap(), format!("checkpoint-{step}\n"));
        }
        assert!(!checkpoint_dir(out, 5).exists());
        assert!(checkpoint_dir(out, 10).join("trainer_state.json").is_file());
        assert!(checkpoint_dir(out, 15).join("model/tokenizer.json").is_file());
    }
}
