//! One training job from the coordinator's side: prepare data, then run attempts (one launch of
//! every worker each, `attempt.rs`) until the run ends, restarting from `latest` after a worker
//! failure while `--max_restarts` allows, on the hosts still answering. Within an attempt,
//! `commands.rs` streams each rank its commands at the pace `pace.rs` keeps, and `driver.rs`
//! turns the reports into progress, metrics.jsonl, complete checkpoints and the final model.

mod attempt;
mod commands;
mod driver;
mod pace;
mod resume;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use zerotune_hf::layout;
use zerotune_proto::plan::{Collectives, ModelSource, Resume, Schedule, WorkerPlan};
use zerotune_proto::records::RunRecord;
use zerotune_proto::state::{DataIdentity, TrainerState};

use crate::config::{Device, Launcher, ModelChoice, TrainPlan};
use crate::dataset::TokenCache;
use crate::error::{io_err, CoordinatorError, Result};
use crate::events::Signal;
use crate::launch;
use crate::lock::{self, OutputLock};
use crate::prepare::{prepare, PreparedRun};
use crate::sampler::Sampler;
use crate::{completion_eval, report};
use attempt::{attempt, forward_signals};
use commands::Cadence;
pub use resume::ResumeConflict;
use resume::{latest_checkpoint, resolve_checkpoint};

/// What a finished (or, on request, stopped) run reports.
#[derive(Debug)]
pub struct Outcome {
    pub output_dir: PathBuf,
    pub steps: u64,
    pub eval_loss: Option<f64>,
    pub perplexity: Option<f64>,
    /// The run stopped on this signal after saving the checkpoint of `steps`.
    pub stopped_on: Option<Signal>,
}

/// Runs the job of `plan` to its end (or its stop), evaluates and reports it.
pub async fn run(plan: TrainPlan) -> Result<Outcome> {
    let resumed = check_before_writing(&plan)?;
    let keep_tokenizer = resumed.as_ref().map(|(resume, _)| resume::tokenizer_dir(resume));
    let mut prepared = tokio::task::block_in_place(|| prepare(&plan, keep_tokenizer.as_deref()))?;
    if let Some((resume, state)) = &resumed {
        resume::check(&plan, &prepared, resume, state)?;
    }
    let resume = resumed.map(|(resume, _)| resume);
    let worker_plan = worker_plan(&plan, &prepared)?;
    std::fs::create_dir_all(&plan.output.dir).map_err(io_err(&plan.output.dir))?;
    let output_dir = plan.output.dir.canonicalize().map_err(io_err(&plan.output.dir))?;
    // Held until the run, its evaluation and its report are done: one job per output dir.
    let _lock = OutputLock::acquire(&output_dir)?;
    prepared.data_report.write(&output_dir.join(layout::DATA_REPORT_FILE))?;
    write_run_json(&output_dir, &plan, &prepared, &worker_plan)?;
    announce(&plan, &prepared);
    let (validation_docs, block_size) = (std::mem::take(&mut prepared.validation_docs), prepared.block_size);
    let run = Run::new(&plan, prepared, worker_plan, output_dir.clone());
    let (plan, outcome) = run_attempts(plan, run, resume).await?;
    let finished = matches!(&outcome, Ok(o) if o.stopped_on.is_none());
    let mut evaluated = Ok(());
    if finished && plan.output.completion_eval_positions > 0 {
        if validation_docs.is_empty() {
            tracing::info!("no validation documents: the completion evaluation is skipped");
        } else {
            tracing::info!("completion evaluation on {} validation documents", validation_docs.len());
            evaluated = tokio::task::block_in_place(|| completion_eval::run(&plan, &output_dir, &validation_docs, block_size));
        }
    }
    // The report shows whatever the run left, also when the evaluation failed.
    match report::write(&output_dir) {
        Ok(path) => tracing::info!("report: {}", path.display()),
        Err(err) => tracing::warn!("no report.html: {err}"),
    }
    evaluated?;
    outcome
}

/// Every check that can refuse the job before its first write, so that nothing in the output dir
/// changes on a refusal: the checkpoint to resume from (or an output dir free to write), and the
/// pretrained model's files. The checkpoint and its trainer state, when resuming.
fn check_before_writing(plan: &TrainPlan) -> Result<Option<(Resume, TrainerState)>> {
    let resumed = match &plan.output.resume_from {
        Some(spec) => Some(resolve_checkpoint(&plan.output.dir, spec, plan.output.nonfinite)?),
        None => {
            check_output_dir(plan)?;
            None
        }
    };
    if let ModelChoice::Pretrained(dir) = &plan.model {
        tokio::task::block_in_place(|| zerotune_hf::manifest::verify_model_dir(dir, plan.output.nonfinite))?;
    }
    warn_output_inside_source(plan);
    Ok(resumed)
}

/// The line that says what is trained, how long, in which batches and where.
fn announce(plan: &TrainPlan, prepared: &PreparedRun) {
    let world_from = match &plan.launch.launcher {
        Launcher::Slurm { world_from } => format!(" from {world_from}"),
        _ => String::new(),
    };
    let zero = if plan.world_size() > 1 { format!(", ZeRO stage {}", plan.zero.stage) } else { String::new() };
    tracing::info!(
        "training {} parameters for {} steps ({} per epoch; micro {} x accumulation {} x world {}{world_from}, block {}) on {}{zero}",
        prepared.config.num_parameters(),
        prepared.total_steps,
        prepared.sampler.steps_per_epoch(),
        plan.batch.micro,
        plan.batch.accumulation,
        plan.world_size(),
        prepared.block_size,
        plan.launch.device,
    );
}

/// Attempts until one ends the run: a worker's failure restarts from `latest` while
/// `--max_restarts` allows, on the ranks of the hosts still answering. The plan the last attempt
/// ran on, and its outcome (`Err` only when a restart itself is impossible).
async fn run_attempts(mut plan: TrainPlan, mut run: Run, mut resume: Option<Resume>) -> Result<(TrainPlan, Result<Outcome>)> {
    let output_dir = run.cadence.output_dir.clone();
    let mut controls = forward_signals()?;
    let mut restarts = 0;
    loop {
        // What an interrupted save (of an earlier job or attempt) left is removed first.
        crate::checkpoint::clean_leftovers(&output_dir)?;
        match attempt(&plan, &run, resume.clone(), &mut controls).await {
            Err(failure @ CoordinatorError::Worker { .. }) if restarts < plan.launch.max_restarts => {
                restarts += 1;
                tracing::warn!("{failure}");
                if let Some(fewer) = without_lost_hosts(&plan, failure).await? {
                    run.resize(&fewer);
                    plan = fewer;
                }
                resume = latest_checkpoint(&output_dir, plan.output.nonfinite)?;
                let from = resume.as_ref().map_or("the start".to_string(), |r| format!("checkpoint-{}", r.step));
                tracing::info!("restart {restarts} of {}: resuming from {from}", plan.launch.max_restarts);
            }
            outcome => return Ok((plan, outcome)),
        }
    }
}

/// After `failure`, the plan on the hosts that still answer, when some do not (`None`: all do).
async fn without_lost_hosts(plan: &TrainPlan, failure: CoordinatorError) -> Result<Option<TrainPlan>> {
    let lost = launch::unreachable_hosts(&plan.launch.launcher, &plan.launch.placements).await;
    if lost.is_empty() {
        return Ok(None);
    }
    let fewer = plan.without_hosts(&lost).map_err(|e| CoordinatorError::NoRestart { failure: Box::new(failure), source: Box::new(e) })?;
    tracing::warn!(
        "host(s) {} do not answer: continuing on the {} rank(s) still available, gradient accumulation {} -> {} (the global batch stays {})",
        lost.into_iter().collect::<Vec<_>>().join(", "),
        fewer.world_size(),
        plan.batch.accumulation,
        fewer.batch.accumulation,
        fewer.global_batch(),
    );
    Ok(Some(fewer))
}

/// What every attempt of a run shares.
struct Run {
    cadence: Cadence,
    sampler: Sampler,
    total_steps: u64,
    tokenizer_files: Vec<(String, Vec<u8>)>,
    cache: Arc<TokenCache>,
    data: DataIdentity,
    worker_plan: WorkerPlan,
}

impl Run {
    /// What the attempts of `plan` share, from its prepared data, writing into `output_dir`.
    fn new(plan: &TrainPlan, prepared: PreparedRun, worker_plan: WorkerPlan, output_dir: PathBuf) -> Run {
        Run {
            cadence: Cadence {
                total_steps: prepared.total_steps,
                eval_steps: plan.output.eval_steps,
                do_eval: plan.output.do_eval && prepared.cache.validation_blocks > 0,
                save_steps: plan.output.save_steps,
                eval_batch: plan.batch.eval,
                output_dir,
            },
            sampler: prepared.sampler,
            total_steps: prepared.total_steps,
            tokenizer_files: prepared.tokenizer_files,
            cache: Arc::new(prepared.cache),
            data: prepared.data,
            worker_plan,
        }
    }

    /// The same run on `plan`'s ranks (after hosts were lost): same global batch, more accumulation.
    fn resize(&mut self, plan: &TrainPlan) {
        self.sampler = Sampler { world: plan.world_size(), accumulation: plan.batch.accumulation, ..self.sampler };
        self.worker_plan.gradient_accumulation_steps = plan.batch.accumulation as u32;
        self.worker_plan.collectives = collectives(plan);
    }
}

/// An output dir inside the source tree is not trained on by the next run (the collector skips
/// zerotune's output dirs), but the user should know where it went.
fn warn_output_inside_source(plan: &TrainPlan) {
    let (Ok(source), Ok(output)) = (std::path::absolute(&plan.data.train_file), std::path::absolute(&plan.output.dir)) else { return };
    if source.is_dir() && output.starts_with(&source) {
        tracing::warn!(
            "--output_dir {} lies inside the source tree --train_file {}: later runs skip it (zerotune recognises its \
             output dirs by their {} file), but a copy of its files under another name would be trained on; keep runs outside the source",
            plan.output.dir.display(),
            plan.data.train_file.display(),
            lock::LOCK_FILE
        );
    }
}

/// HF refuses a non-empty output_dir unless told to overwrite; so do we.
fn check_output_dir(plan: &TrainPlan) -> Result<()> {
    let dir = &plan.output.dir;
    let non_empty = std::fs::read_dir(dir).map(|mut d| d.any(|e| e.is_ok_and(|e| e.file_name() != lock::LOCK_FILE))).unwrap_or(false);
    if non_empty && !plan.output.overwrite {
        return Err(CoordinatorError::OutputNotEmpty { dir: dir.clone() });
    }
    Ok(())
}

fn worker_plan(plan: &TrainPlan, prepared: &PreparedRun) -> Result<WorkerPlan> {
    let model = match &plan.model {
        ModelChoice::Pretrained(dir) => {
            let dir = dir.canonicalize().map_err(io_err(dir))?;
            ModelSource::Pretrained { dir: dir.to_string_lossy().into_owned() }
        }
        ModelChoice::Scratch(_) => ModelSource::Scratch { config: prepared.config.to_hf_json("float32") },
    };
    Ok(WorkerPlan {
        model,
        precision: plan.training.precision,
        optimizer: plan.training.optimizer,
        schedule: Schedule { kind: plan.training.schedule, warmup_steps: prepared.warmup_steps, total_steps: prepared.total_steps },
        max_grad_norm: plan.training.max_grad_norm,
        loss_scaler: plan.training.loss_scaler,
        seed: plan.training.seed,
        gradient_accumulation_steps: plan.batch.accumulation as u32,
        zero_stage: plan.zero.stage,
        offload_optimizer: plan.zero.offload_optimizer,
        reduce_bucket_size: plan.zero.reduce_bucket_size,
        offload_tile: plan.training.offload_tile,
        gradient_checkpointing: plan.training.gradient_checkpointing,
        resume: None,
        heartbeat_timeout_ms: plan.launch.heartbeat_timeout.as_millis() as u64,
        collectives: collectives(plan),
    })
}

fn collectives(plan: &TrainPlan) -> Collectives {
    match (plan.launch.device, plan.launch.num_gpus_given) {
        (Device::Cpu, _) if plan.world_size() > 1 => Collectives::Ring,
        (Device::Cpu, _) => Collectives::None,
        (_, true) => Collectives::Nccl,
        _ if plan.world_size() > 1 => Collectives::Nccl,
        _ => Collectives::None,
    }
}

fn write_run_json(output_dir: &Path, plan: &TrainPlan, prepared: &PreparedRun, worker: &WorkerPlan) -> Result<()> {
    let model = match &plan.model {
        ModelChoice::Pretrained(dir) => dir.display().to_string(),
        ModelChoice::Scratch(_) => "from scratch".to_string(),
    };
    let run = RunRecord {
        model_name_or_path: model,
        num_parameters: prepared.config.num_parameters() as u64,
        precision: plan.training.precision,
        learning_rate: plan.training.optimizer.lr,
        train_file: plan.data.train_file.clone(),
        validation_file: plan.data.validation_file.clone(),
        token_cache: prepared.cache.path.clone(),
        train_blocks: prepared.cache.train_blocks,
        validation_blocks: prepared.cache.validation_blocks,
        block_size: prepared.block_size,
        world_size: plan.world_size(),
        per_device_train_batch_size: plan.batch.micro,
        gradient_accumulation_steps: plan.batch.accumulation,
        total_steps: prepared.total_steps,
        device: plan.launch.device.to_string(),
        zero_optimization: plan.zero,
        model_config: prepared.config.to_hf_json("float32"),
        worker_plan: worker.clone(),
    };
    let json = serde_json::to_value(&run).expect("a run record serialises");
    zerotune_hf::write::write_json(&output_dir.join(layout::RUN_FILE), &json)?;
    Ok(())
}

/// The plan of a tiny CPU run into `out` (`--worker_bin /bin/true`), with `flags` added.
#[cfg(test)]
fn test_plan(out: &std::path::Path, flags: &[&str]) -> TrainPlan {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: crate::config::TrainArgs,
    }
    let out = out.to_string_lossy();
    let argv = ["x", "--config_name", "tiny", "--train_tokenizer", "400", "--train_file", "d.jsonl", "--output_dir", &out];
    let common = ["--do_train", "--device", "cpu", "--worker_bin", "/bin/true"];
    TrainPlan::resolve(&<Cli as clap::Parser>::parse_from(argv.iter().chain(&common).chain(flags)).args).unwrap()
}
