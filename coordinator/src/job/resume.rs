//! A resume's checks, all before anything is written: the checkpoint named by
//! `--resume_from_checkpoint` (a directory, or `latest`) verified against its manifest, and a
//! run that would go backwards (no step left to train), change the data order (block size, global
//! batch) or train on other data refused, naming the flag and the checkpoint's value.

use std::path::{Path, PathBuf};

use zerotune_hf::manifest::{verify_checkpoint, NonFinite};
use zerotune_proto::plan::Resume;
use zerotune_proto::state::TrainerState;

use crate::config::{ResumeFrom, TrainPlan};
use crate::error::{io_err, CoordinatorError, Result};
use crate::prepare::PreparedRun;

/// Why a resume is refused.
#[derive(Debug, thiserror::Error)]
pub enum ResumeConflict {
    #[error(
        "{length} ends at or below the checkpoint's step {step}: nothing is left to train, and the finished model \
         would be overwritten; raise --max_steps above {step}, or use the model as it is"
    )]
    NothingLeft { step: u64, length: String },
    #[error("{changes}, so the data order would change; resume with the checkpoint's values and data, or pass --ignore_data_skip to continue with these")]
    DataOrder { changes: String },
}

/// `checkpoint-<step>` from `--resume_from_checkpoint`, verified against its manifest, with
/// its trainer state.
pub fn resolve_checkpoint(output_dir: &Path, spec: &ResumeFrom, nonfinite: NonFinite) -> Result<(Resume, TrainerState)> {
    let dir = if let ResumeFrom::Dir(dir) = spec {
        dir.clone()
    } else {
        let pointer = zerotune_hf::layout::latest_path(output_dir);
        let name = std::fs::read_to_string(&pointer).map_err(|source| CoordinatorError::NoLatest { pointer: pointer.clone(), source })?;
        output_dir.join(name.trim())
    };
    let bad = |e: CoordinatorError| CoordinatorError::BadCheckpoint { dir: dir.clone(), source: Box::new(e) };
    let state = crate::checkpoint::read_trainer_state(&dir).map_err(bad)?;
    tokio::task::block_in_place(|| verify_checkpoint(&dir, nonfinite)).map_err(|e| bad(e.into()))?;
    let step = state.global_step;
    let dir = dir.canonicalize().map_err(io_err(&dir))?;
    Ok((Resume { dir: dir.to_string_lossy().into_owned(), step }, state))
}

/// The checkpoint `latest` names, if any.
pub fn latest_checkpoint(output_dir: &Path, nonfinite: NonFinite) -> Result<Option<Resume>> {
    if !zerotune_hf::layout::latest_path(output_dir).is_file() {
        return Ok(None);
    }
    resolve_checkpoint(output_dir, &ResumeFrom::Latest, nonfinite).map(|(resume, _)| Some(resume))
}

/// The model directory of a resumed checkpoint, whose tokenizer the run keeps.
pub fn tokenizer_dir(resume: &Resume) -> PathBuf {
    zerotune_hf::model_dir(Path::new(&resume.dir))
}

/// Refuses a resume with no step left, and, unless --ignore_data_skip, one whose data order would
/// change: another block size, global batch (micro x accumulation x world; its factors may
/// change) or other data.
pub fn check(plan: &TrainPlan, prepared: &PreparedRun, resume: &Resume, state: &TrainerState) -> Result<()> {
    let refused = |reason| CoordinatorError::Resume { dir: resume.dir.clone().into(), reason };
    let total_steps = prepared.total_steps;
    if total_steps <= resume.step {
        let length = match plan.training.max_steps {
            Some(steps) => format!("--max_steps {steps}"),
            None => format!("--num_train_epochs {} ({total_steps} steps)", plan.training.epochs),
        };
        return Err(refused(ResumeConflict::NothingLeft { step: resume.step, length }));
    }
    let changes = data_order_changes(plan, prepared, state);
    if changes.is_empty() {
        return Ok(());
    }
    let changes = changes.join(" and ");
    if plan.output.ignore_data_skip {
        tracing::warn!("resuming from step {} with {changes}: the data order is the new one's (--ignore_data_skip)", resume.step);
        return Ok(());
    }
    Err(refused(ResumeConflict::DataOrder { changes }))
}

/// What differs from the checkpoint in what determines the data order, each said with both values.
fn data_order_changes(plan: &TrainPlan, prepared: &PreparedRun, state: &TrainerState) -> Vec<String> {
    let mut changes = vec![];
    let (block, data) = (prepared.block_size, &prepared.data);
    if let Some(saved) = state.block_size.filter(|&saved| saved != block) {
        changes.push(format!("--block_size {block} where the checkpoint has {saved}"));
    }
    let saved_batch = state.train_batch_size * state.gradient_accumulation_steps * state.world_size as usize;
    if saved_batch != plan.global_batch() {
        changes.push(format!(
            "a global batch of {} (micro {} x accumulation {} x world {}) where the checkpoint has {saved_batch} ({} x {} x {})",
            plan.global_batch(),
            plan.batch.micro,
            plan.batch.accumulation,
            plan.world_size(),
            state.train_batch_size,
            state.gradient_accumulation_steps,
            state.world_size
        ));
    }
    if let Some(change) = state.data.as_ref().and_then(|saved| data.changes_from(saved)) {
        changes.push(change);
    }
    changes
}
