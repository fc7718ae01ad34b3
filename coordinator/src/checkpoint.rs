//! Checkpoint bookkeeping on the coordinator's side. Ranks write into `.checkpoint-<step>.partial/`;
//! once every rank has written its part, add the tokenizer files and trainer_state.json, record
//! the manifest (every file's size, hash and non-finite count), rename the directory to
//! `checkpoint-<step>/`, point `latest` at it by atomic rename, and rotate beyond
//! `--save_total_limit` (`rotation`). A crash before the renames leaves the previous checkpoint as `latest` and
//! a `.partial` directory that the next start removes. A resume reads trainer_state.json back.

use std::path::Path;

use zerotune_hf::layout::{self, MANIFEST_FILE, MODEL_DIR, TRAINER_STATE_FILE};
use zerotune_hf::manifest::Manifest;
use zerotune_proto::state::TrainerState;

use crate::error::{io_err, CoordinatorError, Result};
use crate::rotation;

pub use layout::{checkpoint_dir, partial_checkpoint_dir as partial_dir};

/// Removes what an interrupted save left in `output_dir`: `.checkpoint-<step>.partial/`
/// directories, and the final model's manifest (the model is about to be written again). Called
/// with the output dir's lock held, before ranks start.
pub fn clean_leftovers(output_dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(output_dir).map_err(io_err(output_dir))? {
        let path = entry.map_err(io_err(output_dir))?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if layout::is_partial_checkpoint(&name) {
            tracing::info!("removing {}: an incomplete checkpoint an interrupted save left", path.display());
            std::fs::remove_dir_all(&path).map_err(io_err(&path))?;
        }
    }
    let manifest = output_dir.join(MANIFEST_FILE);
    if manifest.is_file() {
        std::fs::remove_file(&manifest).map_err(io_err(&manifest))?;
    }
    Ok(())
}

/// Completes the final model in `output_dir` once every rank saved it: the tokenizer files, then
/// the manifest of the model's files.
pub fn finalize_model(output_dir: &Path, tokenizer_files: &[(String, Vec<u8>)]) -> Result<()> {
    write_files(output_dir, tokenizer_files)?;
    let mut names: Vec<String> = tokenizer_files.iter().map(|(name, _)| name.clone()).collect();
    for entry in std::fs::read_dir(output_dir).map_err(io_err(output_dir))? {
        let name = entry.map_err(io_err(output_dir))?.file_name().to_string_lossy().into_owned();
        if zerotune_hf::write::is_model_file(&name) {
            names.push(name);
        }
    }
    names.sort();
    names.dedup();
    Manifest::of_files(output_dir, names.iter().map(String::as_str))?.write(output_dir)?;
    Ok(())
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
    trainer_state: &TrainerState,
    limit: Option<usize>,
) -> Result<()> {
    let partial = partial_dir(output_dir, step);
    write_files(&partial.join(MODEL_DIR), tokenizer_files)?;
    let state = partial.join(TRAINER_STATE_FILE);
    zerotune_hf::write::write_json(&state, &serde_json::to_value(trainer_state).expect("the trainer state serialises"))?;
    Manifest::of_tree(&partial)?.write(&partial)?;
    let dir = checkpoint_dir(output_dir, step);
    if dir.exists() {
        // A checkpoint of this step from before a restart or an earlier run: replaced.
        std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
    }
    std::fs::rename(&partial, &dir).map_err(io_err(&dir))?;
    let latest = layout::latest_path(output_dir);
    let tmp = layout::partial_path(&latest, false);
    std::fs::write(&tmp, layout::latest_text(step)).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, &latest).map_err(io_err(&latest))?;
    // HF Trainer's meaning: a limit of 0 (or none) keeps every checkpoint.
    if let Some(limit) = limit.filter(|&limit| limit > 0) {
        rotate(output_dir, limit, trainer_state)?;
    }
    Ok(())
}

/// The trainer_state.json of the checkpoint in `dir`.
pub fn read_trainer_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join(TRAINER_STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    serde_json::from_str(&text).map_err(|e| CoordinatorError::Data { path, message: format!("not a trainer state: {e}") })
}

/// Removes checkpoints so that `limit` remain (`rotation::to_remove`), saying each.
fn rotate(output_dir: &Path, limit: usize, saved: &TrainerState) -> Result<()> {
    let on_disk: Vec<u64> = std::fs::read_dir(output_dir)
        .map_err(io_err(output_dir))?
        .filter_map(|e| layout::checkpoint_step(e.ok()?.file_name().to_str()?))
        .collect();
    let latest = std::fs::read_to_string(layout::latest_path(output_dir)).ok();
    let latest = latest.as_deref().and_then(layout::latest_step);
    let keep: Vec<u64> = [Some(saved.global_step), latest].into_iter().flatten().collect();
    for step in rotation::to_remove(&on_disk, &saved.checkpoints, &keep, limit) {
        let dir = checkpoint_dir(output_dir, step);
        tracing::info!("removing {} (--save_total_limit {limit})", dir.display());
        std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerotune_proto::records::MetricRecord;

    fn state(step: u64) -> TrainerState {
        TrainerState {
            global_step: step,
            epoch: step as f64 / 4.0,
            max_steps: 20,
            train_batch_size: 1,
            gradient_accumulation_steps: 2,
            world_size: 2,
            block_size: Some(64),
            sampler: zerotune_proto::state::SamplerPosition { seed: 42, epoch: step / 10, step_in_epoch: step % 10, blocks: 40 },
            log_history: (1..=step).map(|s| MetricRecord::Other(serde_json::json!({"step": s, "loss": s as f64 * 0.25}))).collect(),
            checkpoints: (1..=step / 5).map(|i| i * 5).collect(),
            data: None,
        }
    }

    #[test]
    fn latest_moves_and_old_checkpoints_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        for step in [5, 10, 15] {
            std::fs::create_dir_all(partial_dir(out, step).join("model")).unwrap();
            finalize(out, step, &[("tokenizer.json".into(), b"{}".to_vec())], &state(step), Some(2)).unwrap();
            assert_eq!(std::fs::read_to_string(out.join("latest")).unwrap(), format!("checkpoint-{step}\n"));
            assert_eq!(read_trainer_state(&checkpoint_dir(out, step)).unwrap(), state(step));
        }
        assert!(!checkpoint_dir(out, 5).exists());
        assert!(checkpoint_dir(out, 10).join("trainer_state.json").is_file());
        assert!(checkpoint_dir(out, 15).join("model/tokenizer.json").is_file());
        assert!(!partial_dir(out, 15).exists());
        let manifest = Manifest::read(&checkpoint_dir(out, 15)).unwrap().unwrap();
        assert_eq!(manifest.files.keys().collect::<Vec<_>>(), ["model/tokenizer.json", "trainer_state.json"]);
        zerotune_hf::manifest::verify_checkpoint(&checkpoint_dir(out, 15), zerotune_hf::manifest::NonFinite::Refuse).unwrap();
    }

    #[test]
    fn a_limit_of_zero_keeps_every_checkpoint_and_a_resumed_save_survives_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        for step in [5, 10, 15] {
            std::fs::create_dir_all(partial_dir(out, step)).unwrap();
            finalize(out, step, &[], &state(step), Some(0)).unwrap();
        }
        assert!([5, 10, 15].iter().all(|&step| checkpoint_dir(out, step).is_dir()), "0 means no limit, as in HF Trainer");
        // Resumed from checkpoint-5, then saved 10 again and 12, with a limit of 1.
        for (step, history) in [(10, vec![5, 10]), (12, vec![5, 10, 12])] {
            std::fs::create_dir_all(partial_dir(out, step)).unwrap();
            finalize(out, step, &[], &TrainerState { checkpoints: history, ..state(step) }, Some(1)).unwrap();
            assert!(checkpoint_dir(out, step).join("trainer_state.json").is_file(), "the checkpoint just saved stays");
            assert_eq!(std::fs::read_to_string(out.join("latest")).unwrap(), format!("checkpoint-{step}\n"));
        }
        assert!(!checkpoint_dir(out, 15).exists() && !checkpoint_dir(out, 10).exists() && !checkpoint_dir(out, 5).exists());
    }

    #[test]
    fn leftovers_of_an_interrupted_save_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        std::fs::create_dir_all(partial_dir(out, 7).join("optimizer")).unwrap();
        std::fs::create_dir_all(checkpoint_dir(out, 5)).unwrap();
        std::fs::write(out.join(MANIFEST_FILE), "{}").unwrap();
        clean_leftovers(out).unwrap();
        assert!(!partial_dir(out, 7).exists() && !out.join(MANIFEST_FILE).exists());
        assert!(checkpoint_dir(out, 5).is_dir());
    }
}
