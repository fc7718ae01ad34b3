//! The layout of a zerotune output directory, named once: the final model (an HF model dir) at
//! its top, `checkpoint-<step>/` beside it (`model/`, `optimizer/`, `trainer_state.json`, the
//! manifest), `latest` naming the newest complete one, the run's records (run.json,
//! metrics.jsonl, the evaluation's files, report.html), and the `.partial` names that outputs
//! are staged under until they are complete. Every writer and reader goes through these.

use std::path::{Path, PathBuf};

/// A checkpoint's (and a final model dir's) HF model, within `checkpoint-<step>/`.
pub const MODEL_DIR: &str = "model";
/// `checkpoint-<step>/optimizer/`: the optimizer slices and their layout.
pub const OPTIMIZER_DIR: &str = "optimizer";
/// The optimizer layout's name within `OPTIMIZER_DIR`.
pub const LAYOUT_FILE: &str = "layout.json";
/// `checkpoint-<step>/trainer_state.json` (HF Trainer's keys).
pub const TRAINER_STATE_FILE: &str = "trainer_state.json";
/// Every file of a complete save with its size and hash (`manifest.rs`).
pub const MANIFEST_FILE: &str = "manifest.json";
/// The pointer to the newest complete checkpoint: one line, `checkpoint-<step>`.
pub const LATEST_FILE: &str = "latest";
/// What the run was (`RunRecord`).
pub const RUN_FILE: &str = "run.json";
/// One record per logging step and evaluation (`MetricRecord`).
pub const METRICS_FILE: &str = "metrics.jsonl";
/// The data pipeline's counts.
pub const DATA_REPORT_FILE: &str = "data_report.json";
/// The completion evaluation's scores (`CompletionEval`) and each prediction (`Prediction`).
pub const COMPLETION_EVAL_FILE: &str = "completion_eval.json";
pub const PREDICTIONS_FILE: &str = "predictions.jsonl";
/// The run's page: curves, the evaluation and examples.
pub const REPORT_FILE: &str = "report.html";
/// One job per output dir holds this (coordinator lock.rs).
pub const LOCK_FILE: &str = ".zerotune.lock";

/// What a checkpoint directory is called: `checkpoint-<step>`.
pub fn checkpoint_name(step: u64) -> String {
    format!("checkpoint-{step}")
}

/// `output_dir/checkpoint-<step>`.
pub fn checkpoint_dir(output_dir: &Path, step: u64) -> PathBuf {
    output_dir.join(checkpoint_name(step))
}

/// The step a `checkpoint-<step>` name holds; None for any other name.
pub fn checkpoint_step(name: &str) -> Option<u64> {
    name.strip_prefix("checkpoint-")?.parse().ok()
}

/// Where a checkpoint is written until it is complete: `output_dir/.checkpoint-<step>.partial`.
pub fn partial_checkpoint_dir(output_dir: &Path, step: u64) -> PathBuf {
    output_dir.join(format!(".{}.partial", checkpoint_name(step)))
}

/// Whether `name` is a checkpoint left half-written (`.checkpoint-<step>.partial`).
pub fn is_partial_checkpoint(name: &str) -> bool {
    name.strip_prefix('.').and_then(|n| n.strip_suffix(".partial")).is_some_and(|n| checkpoint_step(n).is_some())
}

/// Where a file or directory is written until it is complete, to be renamed onto `path`:
/// `path.partial` for a file; `.name.partial` beside it for a directory (`hidden`), so that
/// nothing listing the directory takes it for the real one.
pub fn partial_path(path: &Path, hidden: bool) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(if hidden { format!(".{name}.partial") } else { format!("{name}.partial") })
}

/// `output_dir/latest`.
pub fn latest_path(output_dir: &Path) -> PathBuf {
    output_dir.join(LATEST_FILE)
}

/// The content of `latest` that names checkpoint `step`.
pub fn latest_text(step: u64) -> String {
    format!("{}\n", checkpoint_name(step))
}

/// The step a `latest` pointer's content names.
pub fn latest_step(text: &str) -> Option<u64> {
    checkpoint_step(text.trim())
}

/// The HF model directory behind `dir`: itself, or for a zerotune `checkpoint-<step>/` its
/// `model/` subdirectory.
pub fn model_dir(dir: &Path) -> PathBuf {
    let inner = dir.join(MODEL_DIR);
    if inner.join("config.json").is_file() && !dir.join("config.json").is_file() {
        inner
    } else {
        dir.to_path_buf()
    }
}

/// Whether `dir` is the `model/` of a checkpoint (beside `optimizer/` or trainer_state.json),
/// and if so the checkpoint's root.
pub fn checkpoint_root(dir: &Path) -> Option<PathBuf> {
    let root = dir.parent()?;
    let inside = dir.file_name()? == MODEL_DIR && (root.join(OPTIMIZER_DIR).is_dir() || root.join(TRAINER_STATE_FILE).is_file());
    inside.then(|| root.to_path_buf())
}

/// The files whose presence marks a directory as one zerotune wrote (any one set of them): a run
/// in progress, a checkpoint, a run's output dir. The data collector skips such directories.
pub const OUTPUT_MARKERS: [&[&str]; 3] = [&[LOCK_FILE], &[TRAINER_STATE_FILE, MANIFEST_FILE], &[RUN_FILE, DATA_REPORT_FILE]];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_their_inverses() {
        let out = Path::new("/runs/a");
        assert_eq!(checkpoint_dir(out, 12), Path::new("/runs/a/checkpoint-12"));
        assert_eq!(partial_checkpoint_dir(out, 12), Path::new("/runs/a/.checkpoint-12.partial"));
        assert_eq!((checkpoint_step("checkpoint-12"), checkpoint_step("checkpoint-x"), checkpoint_step("model")), (Some(12), None, None));
        assert!(is_partial_checkpoint(".checkpoint-12.partial") && !is_partial_checkpoint(".checkpoint-.partial"));
        assert!(!is_partial_checkpoint("checkpoint-12") && !is_partial_checkpoint(".report.html.partial"));
        assert_eq!((latest_text(7), latest_step("checkpoint-7\n"), latest_step("garbage")), ("checkpoint-7\n".into(), Some(7), None));
        assert_eq!(partial_path(Path::new("/o/report.html"), false), Path::new("/o/report.html.partial"));
        assert_eq!(partial_path(Path::new("/o/gptj"), true), Path::new("/o/.gptj.partial"));
    }

    #[test]
    fn a_checkpoint_s_model_dir_and_root() {
        let tmp = tempfile::tempdir().unwrap();
        let checkpoint = tmp.path().join("checkpoint-3");
        std::fs::create_dir_all(checkpoint.join(MODEL_DIR)).unwrap();
        std::fs::write(checkpoint.join(MODEL_DIR).join("config.json"), "{}").unwrap();
        assert_eq!(model_dir(&checkpoint), checkpoint.join(MODEL_DIR));
        assert_eq!(model_dir(tmp.path()), tmp.path(), "not a checkpoint: the dir itself");
        assert_eq!(checkpoint_root(&checkpoint.join(MODEL_DIR)), None, "no optimizer/ or trainer_state.json yet");
        std::fs::write(checkpoint.join(TRAINER_STATE_FILE), "{}").unwrap();
        assert_eq!(checkpoint_root(&checkpoint.join(MODEL_DIR)), Some(checkpoint));
    }
}
