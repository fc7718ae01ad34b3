//! One training job from the coordinator's side: prepare data, serve gRPC on loopback, launch the
//! workers, stream them their commands (steps, evaluations, saves, finish), and turn their reports
//! into progress, metrics.jsonl, complete checkpoints and the final model. Signals to the
//! coordinator save a checkpoint (SIGUSR1), stop after one (SIGINT/SIGTERM) or abort (twice).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::json;
use tokio::sync::mpsc;
use tonic::Status;
use zerotune_proto::plan::{Collectives, ModelSource, Resume, Schedule, WorkerPlan};
use zerotune_proto::v1::{command, Batch, Command, Evaluate, Finish, Save, Stop, TrainStep};

use crate::checkpoint::{self, checkpoint_dir};
use crate::config::{ModelChoice, TrainPlan};
use crate::dataset::TokenCache;
use crate::error::{io_err, CoordinatorError, Result};
use crate::launch::{self, LaunchSpec, Launcher};
use crate::prepare::{prepare, Prepared};
use crate::progress::Progress;
use crate::sampler::Sampler;
use crate::service::{AbortSwitch, Control, Event, JobService};

/// After the first failure, how long to wait for the other ranks' reports before blaming one.
const FAILURE_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// What a finished (or, on request, stopped) run reports.
#[derive(Debug)]
pub struct Outcome {
    pub output_dir: PathBuf,
    pub steps: u64,
    pub eval_loss: Option<f64>,
    pub perplexity: Option<f64>,
    /// The run stopped on this signal after saving the checkpoint of `steps`.
    pub stopped_on: Option<&'static str>,
}

/// When to evaluate and save, as plain numbers.
#[derive(Clone, Debug)]
struct Cadence {
    total_steps: u64,
    eval_steps: Option<u64>,
    do_eval: bool,
    save_steps: Option<u64>,
    eval_batch: usize,
    output_dir: PathBuf,
}

pub async fn run(mut plan: TrainPlan) -> Result<Outcome> {
    let mut resume = match &plan.resume_from_checkpoint {
        Some(spec) => Some(resolve_checkpoint(&plan.output_dir, spec)?),
        None => {
            check_output_dir(&plan)?;
            None
        }
    };
    let prepared = tokio::task::block_in_place(|| prepare(&plan))?;
    std::fs::create_dir_all(&plan.output_dir).map_err(io_err(&plan.output_dir))?;
    let output_dir = plan.output_dir.canonicalize().map_err(io_err(&plan.output_dir))?;
    let worker_plan = worker_plan(&plan, &prepared)?;
    write_run_json(&output_dir, &plan, &prepared, &worker_plan)?;
    eprintln!(
        "training {} parameters for {} steps ({} per epoch; micro {} x accumulation {} x world {}, block {}) on {}{}",
        prepared.config.num_parameters(),
        prepared.total_steps,
        prepared.sampler.steps_per_epoch(),
        plan.micro_batch,
        plan.accumulation,
        plan.world_size,
        prepared.block_size,
        plan.device,
        if plan.world_size > 1 { format!(", ZeRO stage {}", plan.zero.stage) } else { String::new() },
    );
    let mut run = Run {
        cadence: Cadence {
            total_steps: prepared.total_steps,
            eval_steps: plan.eval_steps,
            do_eval: plan.do_eval && prepared.cache.validation_blocks > 0,
            save_steps: plan.save_steps,
            eval_batch: plan.eval_batch,
            output_dir: output_dir.clone(),
        },
        sampler: prepared.sampler,
        total_steps: prepared.total_steps,
        tokenizer_files: prepared.tokenizer_files,
        cache: Arc::new(prepared.cache),
        worker_plan,
    };
    let mut controls = forward_signals()?;
    let mut restarts = 0;
    loop {
        match attempt(&plan, &run, resume.clone(), &mut controls).await {
            Err(failure @ CoordinatorError::Worker { .. }) if restarts < plan.max_restarts => {
                restarts += 1;
                eprintln!("{failure}");
                let lost = launch::unreachable_hosts(&plan.launcher, &plan.placements).await;
                if !lost.is_empty() {
                    let fewer = plan.without_hosts(&lost).map_err(|e| CoordinatorError::Flag(format!("{failure}; cannot restart: {e}")))?;
                    eprintln!(
                        "host(s) {} do not answer: continuing on the {} rank(s) still available, gradient accumulation {} -> {} (the global batch stays {})",
                        lost.into_iter().collect::<Vec<_>>().join(", "),
                        fewer.world_size,
                        plan.accumulation,
                        fewer.accumulation,
                        fewer.world_size * fewer.micro_batch * fewer.accumulation,
                    );
                    run.resize(&fewer);
                    plan = fewer;
                }
                resume = latest_checkpoint(&output_dir)?;
                let from = resume.as_ref().map_or("the start".to_string(), |r| format!("checkpoint-{}", r.step));
                eprintln!("restart {restarts} of {}: resuming from {from}", plan.max_restarts);
            }
            other => return other,
        }
    }
}

/// What every attempt of a run shares.
struct Run {
    cadence: Cadence,
    sampler: Sampler,
    total_steps: u64,
    tokenizer_files: Vec<(String, Vec<u8>)>,
    cache: Arc<TokenCache>,
    worker_plan: WorkerPlan,
}

impl Run {
    /// The same run on `plan`'s ranks (after hosts were lost): same global batch, more accumulation.
    fn resize(&mut self, plan: &TrainPlan) {
        self.sampler = Sampler { world: plan.world_size, accumulation: plan.accumulation, ..self.sampler };
        self.worker_plan.gradient_accumulation_steps = plan.accumulation as u32;
        self.worker_plan.collectives = collectives(plan);
    }
}

/// `checkpoint-<step>` from `--resume_from_checkpoint` (a directory, or `latest`), checked complete.
fn resolve_checkpoint(output_dir: &Path, spec: &str) -> Result<Resume> {
    let dir = if spec == "latest" {
        let pointer = output_dir.join("latest");
        let name = std::fs::read_to_string(&pointer).map_err(|e| {
            CoordinatorError::Flag(format!(
                "--resume_from_checkpoint latest: cannot read {}: {e} (no complete checkpoint yet?)",
                pointer.display()
            ))
        })?;
        output_dir.join(name.trim())
    } else {
        PathBuf::from(spec)
    };
    let state_path = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&state_path)
        .map_err(|e| CoordinatorError::Flag(format!("--resume_from_checkpoint {}: cannot read {}: {e}", spec, state_path.display())))?;
    let state: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| CoordinatorError::Flag(format!("--resume_from_checkpoint: {} is not valid JSON: {e}", state_path.display())))?;
    let step = state["global_step"]
        .as_u64()
        .ok_or_else(|| CoordinatorError::Flag(format!("--resume_from_checkpoint: {} has no global_step", state_path.display())))?;
    if !dir.join("optimizer/layout.json").is_file() {
        return Err(CoordinatorError::Flag(format!(
            "--resume_from_checkpoint: {} has no optimizer/layout.json (incomplete checkpoint?)",
            dir.display()
        )));
    }
    let dir = dir.canonicalize().map_err(io_err(&dir))?;
    Ok(Resume { dir: dir.to_string_lossy().into_owned(), step })
}

/// The checkpoint `latest` names, if any.
fn latest_checkpoint(output_dir: &Path) -> Result<Option<Resume>> {
    if !output_dir.join("latest").is_file() {
        return Ok(None);
    }
    resolve_checkpoint(output_dir, "latest").map(Some)
}

/// Turns signals to the coordinator into `Control`s: SIGUSR1 saves a checkpoint, the first SIGINT
/// or SIGTERM saves one and stops, the next aborts. (Workers run in process groups of their own,
/// so a terminal's Ctrl-C reaches only the coordinator.)
fn forward_signals() -> Result<mpsc::UnboundedReceiver<Control>> {
    use tokio::signal::unix::{signal, SignalKind};
    let listen = |kind| signal(kind).map_err(|e| CoordinatorError::Server(format!("cannot listen for signals: {e}")));
    let (mut int, mut term, mut usr1) =
        (listen(SignalKind::interrupt())?, listen(SignalKind::terminate())?, listen(SignalKind::user_defined1())?);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stopping = false;
        loop {
            let stop = tokio::select! {
                _ = int.recv() => Some("SIGINT"),
                _ = term.recv() => Some("SIGTERM"),
                _ = usr1.recv() => None,
            };
            let control = match stop {
                None => Control::Save,
                Some(signal) if stopping => Control::Abort { signal },
                Some(signal) => {
                    stopping = true;
                    Control::Stop { signal }
                }
            };
            if tx.send(control).is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

/// Steps a rank's commands may run ahead of its reports: the next batches are always there,
/// and a checkpoint asked for mid-run lands within a few steps.
const LOOKAHEAD: u64 = 2;

/// What the command producers share with the driver: how far each rank got, and the
/// checkpoints asked for while the job runs. Every rank's producer emits a requested checkpoint
/// at the same step: the first one no producer has started sending.
#[derive(Default)]
struct Pace {
    state: Mutex<PaceState>,
    advanced: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct PaceState {
    /// The last step each rank reported finished.
    finished: Vec<u64>,
    /// The step each rank's producer is sending (or sent last).
    producing: Vec<u64>,
    saves: BTreeSet<u64>,
    stop_at: Option<u64>,
    /// The attempt is over: producers stop waiting.
    closed: bool,
}

impl Pace {
    fn new(world: u32, first_step: u64) -> Self {
        let ranks = vec![first_step - 1; world as usize];
        Self { state: Mutex::new(PaceState { finished: ranks.clone(), producing: ranks, ..Default::default() }), ..Default::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PaceState> {
        self.state.lock().expect("pace lock")
    }

    /// Blocks until `rank` may be sent `step`; false once the attempt is over.
    fn start(&self, rank: u32, step: u64) -> bool {
        let mut state = self.lock();
        while !state.closed && state.finished[rank as usize] + LOOKAHEAD < step {
            state = self.advanced.wait(state).expect("pace lock");
        }
        state.producing[rank as usize] = step;
        !state.closed
    }

    fn finished(&self, rank: u32, step: u64) {
        if let Some(done) = self.lock().finished.get_mut(rank as usize) {
            *done = (*done).max(step);
        }
        self.advanced.notify_all();
    }

    fn close(&self) {
        self.lock().closed = true;
        self.advanced.notify_all();
    }

    /// Asks for a checkpoint (followed by a stop) at the first step no rank was sent, if that
    /// comes before `last` (whose end saves the final model anyway); returns it.
    fn checkpoint(&self, stop: bool, last: u64) -> Option<u64> {
        let mut state = self.lock();
        let at = state.producing.iter().max().map_or(1, |s| s + 1);
        if at >= last {
            return None;
        }
        state.saves.insert(at);
        if stop {
            state.stop_at = Some(state.stop_at.map_or(at, |s| s.min(at)));
        }
        Some(at)
    }

    /// Whether to save after `step`, and whether to stop there.
    fn at(&self, step: u64) -> (bool, bool) {
        let state = self.lock();
        (state.saves.contains(&step), state.stop_at == Some(step))
    }
}

/// One launch of all workers, from `resume` or the start, until the run ends or a rank fails.
async fn attempt(plan: &TrainPlan, run: &Run, resume: Option<Resume>, controls: &mut mpsc::UnboundedReceiver<Control>) -> Result<Outcome> {
    let output_dir = run.cadence.output_dir.clone();
    let first_step = resume.as_ref().map_or(1, |r| r.step + 1);
    if let Some(r) = &resume {
        eprintln!("resuming from {} at step {}", r.dir, r.step);
    }
    let worker_plan = WorkerPlan { resume, ..run.worker_plan.clone() };
    let world = plan.world_size as u32;
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let pace = Arc::new(Pace::new(world, first_step));
    let mut receivers = vec![];
    for rank in 0..world {
        let (tx, rx) = mpsc::channel(4);
        receivers.push(rx);
        let (cache, cadence, sampler, pace) = (run.cache.clone(), run.cadence.clone(), run.sampler, pace.clone());
        tokio::task::spawn_blocking(move || produce_commands(&sampler, &cache, &cadence, &pace, rank, world, first_step, tx));
    }

    // Loopback unless workers run elsewhere; then on --master_port, reached at --master_addr.
    let (bind, host) = match plan.launcher {
        Launcher::Local => ("127.0.0.1".to_string(), "127.0.0.1".to_string()),
        _ => ("0.0.0.0".to_string(), plan.master_addr.clone().unwrap_or_else(hostname)),
    };
    let port = if plan.launcher == Launcher::Local { 0 } else { plan.master_port };
    let listener = tokio::net::TcpListener::bind((bind.as_str(), port))
        .await
        .map_err(|e| CoordinatorError::Server(format!("cannot listen on {bind}:{port} (--master_port): {e}")))?;
    let port = listener.local_addr().map_err(|e| CoordinatorError::Server(e.to_string()))?.port();
    let scheme = if plan.tls.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://{host}:{port}");
    let mut builder = server_builder();
    if let Some(tls) = &plan.tls {
        let identity = tonic::transport::Identity::from_pem(&tls.cert, &tls.key);
        builder = builder
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .map_err(|e| CoordinatorError::Flag(format!("--tls_cert/--tls_key: {e}")))?;
    }
    let secret = launch::job_secret()?;
    let abort = Arc::new(AbortSwitch::default());
    let plan_json = serde_json::to_string(&worker_plan).expect("plan serialises");
    let service = JobService::new(plan_json, receivers, events_tx.clone(), abort.clone());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(builder.add_service(service.into_server(secret.clone())).serve_with_incoming_shutdown(
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        async {
            let _ = stop_rx.await;
        },
    ));
    let mut env = launch::propagated_env()?;
    if let Some(tls) = &plan.tls {
        env.push((zerotune_proto::TLS_CA_ENV.into(), String::from_utf8_lossy(&tls.ca).into_owned()));
    }
    let device = if plan.device == "cpu" { "cpu" } else { "cuda" };
    let spec = LaunchSpec { launcher: &plan.launcher, placements: &plan.placements, device, worker: &plan.worker_bin, env: &env };
    let watchers = launch::start(&spec, &url, &secret, &events_tx)?;
    drop(events_tx);

    let steps_per_epoch = run.sampler.steps_per_epoch() as u64;
    let mut progress = Progress::new(&output_dir, run.total_steps, steps_per_epoch, plan.logging_steps, first_step > 1)?;
    let mut job = Job {
        world,
        output_dir: output_dir.clone(),
        tokenizer_files: &run.tokenizer_files,
        plan,
        total_steps: run.total_steps,
        sampler: run.sampler,
        hosts: BTreeMap::new(),
        saves: BTreeMap::new(),
        evals: BTreeMap::new(),
        finished: 0,
        done: BTreeSet::new(),
        processes: watchers.len() as u32,
        exited: 0,
        pace: pace.clone(),
        stop: None,
        stopped_at: None,
    };
    let result = match (job.drive(&mut events, controls, &mut progress).await, job.stop) {
        // The user asked to stop: no restart.
        (Err(err @ CoordinatorError::Worker { .. }), Some(signal)) => {
            Err(CoordinatorError::Flag(format!("{err} (while stopping on {signal})")))
        }
        (result, _) => result,
    };
    pace.close();
    if result.is_err() && matches!(plan.launcher, Launcher::Ssh { .. } | Launcher::Manual) {
        // Ranks we cannot kill ourselves hear the abort in their next heartbeat, even mid-step.
        abort.throw();
        abort.wait_told(job.hosts.len(), 2 * zerotune_proto::plan::heartbeat_interval(plan.heartbeat_timeout)).await;
    }
    let stopped = job.stopped_at.zip(job.stop);
    let _ = stop_tx.send(());
    drop(events); // workers still running see their launcher go and are killed
    for watcher in watchers {
        let _ = watcher.await; // every worker process is gone before a restart
    }
    let _ = server.await;
    result?;
    let last_eval = progress.last_eval();
    Ok(Outcome {
        output_dir,
        steps: stopped.map_or(run.total_steps, |(step, _)| step),
        eval_loss: last_eval.and_then(|e| e["eval_loss"].as_f64()),
        perplexity: last_eval.and_then(|e| e["perplexity"].as_f64()),
        stopped_on: stopped.map(|(_, signal)| signal),
    })
}

/// HTTP/2 pings every few seconds: a worker whose host vanished without closing its connection
/// is dropped (and so reported) within KEEPALIVE x 3, at the transport level beside the heartbeats.
fn server_builder() -> tonic::transport::Server {
    tonic::transport::Server::builder().http2_keepalive_interval(Some(KEEPALIVE)).http2_keepalive_timeout(Some(2 * KEEPALIVE))
}

pub const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(10);

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "localhost".into())
}

/// HF refuses a non-empty output_dir unless told to overwrite; so do we.
fn check_output_dir(plan: &TrainPlan) -> Result<()> {
    let dir = &plan.output_dir;
    let non_empty = std::fs::read_dir(dir).map(|mut d| d.next().is_some()).unwrap_or(false);
    if non_empty && !plan.overwrite_output_dir {
        return Err(CoordinatorError::Flag(format!(
            "--output_dir {} exists and is not empty; pass --overwrite_output_dir to train into it anyway",
            dir.display()
        )));
    }
    Ok(())
}

fn worker_plan(plan: &TrainPlan, prepared: &Prepared) -> Result<WorkerPlan> {
    let model = match &plan.model {
        ModelChoice::Pretrained(dir) => {
            let dir = dir.canonicalize().map_err(io_err(dir))?;
            ModelSource::Pretrained { dir: dir.to_string_lossy().into_owned() }
        }
        ModelChoice::Scratch(_) => ModelSource::Scratch { config: prepared.config.to_hf_json("float32") },
    };
    Ok(WorkerPlan {
        model,
        precision: plan.precision,
        optimizer: plan.optimizer,
        schedule: Schedule { kind: plan.schedule, warmup_steps: prepared.warmup_steps, total_steps: prepared.total_steps },
        max_grad_norm: plan.max_grad_norm,
        loss_scaler: plan.loss_scaler,
        seed: plan.seed,
        gradient_accumulation_steps: plan.accumulation as u32,
        zero_stage: plan.zero.stage,
        offload_optimizer: plan.zero.offload_optimizer,
        reduce_bucket_size: plan.zero.reduce_bucket_size,
        offload_tile: zerotune_proto::plan::DEFAULT_OFFLOAD_TILE,
        resume: None,
        heartbeat_timeout_ms: plan.heartbeat_timeout.as_millis() as u64,
        collectives: collectives(plan),
    })
}

fn collectives(plan: &TrainPlan) -> Collectives {
    match (plan.device.as_str(), plan.num_gpus_given) {
        ("cpu", _) if plan.world_size > 1 => Collectives::Ring,
        ("cpu", _) => Collectives::None,
        (_, true) => Collectives::Nccl,
        _ if plan.world_size > 1 => Collectives::Nccl,
        _ => Collectives::None,
    }
}

fn write_run_json(output_dir: &Path, plan: &TrainPlan, prepared: &Prepared, worker: &WorkerPlan) -> Result<()> {
    let run = json!({
        "train_file": plan.train_file,
        "validation_file": plan.validation_file,
        "token_cache": prepared.cache.path,
        "train_blocks": prepared.cache.train_blocks,
        "validation_blocks": prepared.cache.validation_blocks,
        "block_size": prepared.block_size,
        "world_size": plan.world_size,
        "per_device_train_batch_size": plan.micro_batch,
        "gradient_accumulation_steps": plan.accumulation,
        "total_steps": prepared.total_steps,
        "device": plan.device,
        "zero_optimization": plan.zero,
        "model_config": prepared.config.to_hf_json("float32"),
        "worker_plan": worker,
    });
    zerotune_hf::write::write_json(&output_dir.join("run.json"), &run)?;
    Ok(())
}

/// The ordered commands for one rank; stops early if the rank's stream is gone.
#[allow(clippy::too_many_arguments)]
fn produce_commands(
    sampler: &Sampler,
    cache: &TokenCache,
    cadence: &Cadence,
    pace: &Pace,
    rank: u32,
    world: u32,
    first_step: u64,
    tx: mpsc::Sender<std::result::Result<Command, Status>>,
) {
    let send = |kind: command::Kind| tx.blocking_send(Ok(Command { kind: Some(kind) })).is_ok();
    let batch = |blocks: &[usize], read: &dyn Fn(usize) -> Vec<u32>| Batch {
        rows: blocks.len() as u32,
        cols: cache.block_size as u32,
        tokens: blocks.iter().flat_map(|&b| read(b)).collect(),
    };
    let eval_blocks: Vec<usize> = (rank as usize..cache.validation_blocks).step_by(world as usize).collect();
    let evaluate = |step: u64| {
        let batches = eval_blocks.chunks(cadence.eval_batch).map(|c| batch(c, &|b| cache.validation_block(b))).collect();
        command::Kind::Evaluate(Evaluate { step, batches })
    };
    for step in first_step..=cadence.total_steps {
        if !pace.start(rank, step) {
            return;
        }
        let micro_batches = sampler.step_batches(step - 1, rank as usize).iter().map(|m| batch(m, &|b| cache.train_block(b))).collect();
        if !send(command::Kind::Step(TrainStep { step, micro_batches })) {
            return;
        }
        if cadence.do_eval && cadence.eval_steps.is_some_and(|n| step % n == 0) && step != cadence.total_steps && !send(evaluate(step)) {
            return;
        }
        let (requested, stop) = pace.at(step);
        if requested || cadence.save_steps.is_some_and(|n| step % n == 0) {
            let dir = checkpoint_dir(&cadence.output_dir, step).to_string_lossy().into_owned();
            if !send(command::Kind::Save(Save { step, dir })) {
                return;
            }
        }
        if stop {
            send(command::Kind::Stop(Stop { step }));
            return;
        }
    }
    if cadence.do_eval && !send(evaluate(cadence.total_steps)) {
        return;
    }
    let dir = cadence.output_dir.to_string_lossy().into_owned();
    send(command::Kind::Finish(Finish { step: cadence.total_steps, dir }));
}

/// The driver's bookkeeping while workers run.
struct Job<'a> {
    world: u32,
    output_dir: PathBuf,
    tokenizer_files: &'a [(String, Vec<u8>)],
    plan: &'a TrainPlan,
    total_steps: u64,
    sampler: Sampler,
    hosts: BTreeMap<u32, String>,
    /// Acknowledgements per (step, directory) saved.
    saves: BTreeMap<(u64, String), u32>,
    /// (loss sum, tokens, ranks) per evaluated step.
    evals: BTreeMap<u64, (f64, u64, u32)>,
    finished: u32,
    /// Ranks whose last save (final model, or the checkpoint of a requested stop) is acknowledged:
    /// each may exit successfully before the others' acknowledgements arrive.
    done: BTreeSet<u32>,
    /// Processes we started and watch (0 when started by hand).
    processes: u32,
    exited: u32,
    pace: Arc<Pace>,
    /// A stop was asked for, on this signal (its step is the pace's `stop_at`).
    stop: Option<&'static str>,
    /// The step whose checkpoint ended the run on request.
    stopped_at: Option<u64>,
}

impl Job<'_> {
    async fn drive(
        &mut self,
        events: &mut mpsc::UnboundedReceiver<Event>,
        controls: &mut mpsc::UnboundedReceiver<Control>,
        progress: &mut Progress,
    ) -> Result<()> {
        use tokio::time::Instant;
        // One death makes every rank fail (their collectives break), so the first report is
        // often not the cause: collect failures until every process is gone (or a grace period
        // passed) and blame the most direct one: a signal; a rank's own error or missed
        // heartbeats; an exit or a dropped connection; a peer's broken collective; srun's exit.
        let mut failures: Vec<(u8, CoordinatorError)> = vec![];
        let mut deadline: Option<Instant> = None;
        // Progress watchdog (--ddp_timeout): a rank that hangs alive stops everyone's progress.
        let mut last_progress = Instant::now();
        let mut last_step: BTreeMap<u32, u64> = (0..self.world).map(|r| (r, 0)).collect();
        // Liveness (--heartbeat_timeout): when each working rank last beat, and its step then.
        let mut beats: BTreeMap<u32, (Instant, u64)> = BTreeMap::new();
        let mut reported = BTreeSet::new();
        loop {
            let hung_at = last_progress + self.plan.ddp_timeout;
            let silent =
                beats.iter().min_by_key(|(_, (at, _))| *at).map(|(&rank, &(at, step))| (rank, step, at + self.plan.heartbeat_timeout));
            let wake = [Some(hung_at), deadline, silent.map(|s| s.2)].into_iter().flatten().min().expect("hung_at");
            let next = async {
                tokio::select! {
                    event = events.recv() => event,
                    Some(control) = controls.recv() => Some(Event::Control(control)),
                }
            };
            let event = match tokio::time::timeout_at(wake, next).await {
                Ok(event) => event,
                Err(_) => match silent.filter(|s| s.2 <= Instant::now()) {
                    Some((rank, beat_step, _)) => {
                        let step = last_step.get(&rank).map_or(beat_step, |&s| s.max(beat_step));
                        let message = format!(
                            "no heartbeat for {} s (--heartbeat_timeout) after step {step}: the process is stopped or frozen, \
                             or its host is unreachable",
                            self.plan.heartbeat_timeout.as_secs()
                        );
                        failures.push((1, self.worker_error(rank, message)));
                        break;
                    }
                    None if deadline.is_none() => return Err(self.hung(&last_step)),
                    None => break,
                },
            };
            let Some(event) = event else { break };
            if matches!(event, Event::Step(_) | Event::Eval(_) | Event::Saved(_)) {
                last_progress = Instant::now();
            }
            if let Event::Step(report) = &event {
                last_step.insert(report.rank, report.step);
                self.pace.finished(report.rank, report.step);
            }
            let failure = match event {
                Event::Registered { rank, local_rank, host, device, pid } => {
                    progress.note(&format!("rank {rank} joined: {host} {device} pid {pid} local rank {local_rank}"));
                    self.hosts.insert(rank, host);
                    beats.insert(rank, (Instant::now(), 0));
                    None
                }
                Event::Heartbeat { rank, step } => {
                    if let Some(beat) = beats.get_mut(&rank) {
                        *beat = (Instant::now(), step);
                    }
                    None
                }
                Event::Control(control) => {
                    self.control(control, progress)?;
                    None
                }
                Event::Step(report) => {
                    if report.rank == 0 && failures.is_empty() {
                        progress.step(report)?;
                    }
                    None
                }
                Event::Eval(report) => {
                    let entry = self.evals.entry(report.step).or_default();
                    entry.0 += report.loss_sum;
                    entry.1 += report.tokens;
                    entry.2 += 1;
                    if entry.2 == self.world {
                        let (sum, tokens, _) = *entry;
                        progress.eval(report.step, sum, tokens)?;
                    }
                    None
                }
                Event::Saved(report) => {
                    let last = Path::new(&report.dir) == self.output_dir || self.pace.at(report.step).1;
                    if last {
                        beats.remove(&report.rank); // its work is done: it exits without beating again
                        self.done.insert(report.rank);
                    }
                    let acks = self.saves.entry((report.step, report.dir.clone())).or_default();
                    *acks += 1;
                    if *acks == self.world && failures.is_empty() {
                        if Path::new(&report.dir) == self.output_dir {
                            checkpoint::write_files(&self.output_dir, self.tokenizer_files)?;
                            self.finished = self.world;
                            progress.note(&format!("saved the final model to {}", self.output_dir.display()));
                            if self.processes == 0 {
                                return Ok(()); // started by hand: nothing of ours to wait for
                            }
                        } else {
                            let state = self.trainer_state(report.step, progress);
                            checkpoint::finalize(&self.output_dir, report.step, self.tokenizer_files, &state, self.plan.save_total_limit)?;
                            progress.note(&format!("saved checkpoint-{}", report.step));
                            if last {
                                self.stopped_at = Some(report.step);
                                self.finished = self.world;
                                if self.processes == 0 {
                                    return Ok(());
                                }
                            }
                        }
                    }
                    None
                }
                // A rank that said why it failed then disconnects: no news.
                Event::Disconnected { rank } if self.finished < self.world && !reported.contains(&rank) && !self.done.contains(&rank) => {
                    let message =
                        "its connection to the coordinator closed before the run finished (the process died or its host is unreachable)";
                    Some((2, self.worker_error(rank, message.into())))
                }
                Event::Disconnected { .. } => None,
                Event::Failed { rank, message } => {
                    reported.insert(rank);
                    let secondary = message.starts_with("collective failed");
                    Some((if secondary { 3 } else { 1 }, self.worker_error(rank, message)))
                }
                Event::Exited { rank, success, status } => {
                    self.exited += 1;
                    if success && rank.map_or(self.finished == self.world, |rank| self.done.contains(&rank)) {
                        if self.exited == self.processes && failures.is_empty() {
                            return Ok(());
                        }
                        None
                    } else if let Some(rank) = rank {
                        let killed = status.contains("signal");
                        let message = format!("the worker process exited ({status}) before the run finished");
                        Some((if killed { 0 } else { 2 }, self.worker_error(rank, message)))
                    } else {
                        // srun ends when any rank does: the ranks' own reports say more.
                        Some((5, CoordinatorError::Launcher(format!("srun (every rank) exited ({status}) before the run finished"))))
                    }
                }
            };
            if let Some(failure) = failure {
                failures.push(failure);
                deadline.get_or_insert(tokio::time::Instant::now() + FAILURE_GRACE);
            }
            let all_gone = self.processes > 0 && self.exited == self.processes;
            let expired = deadline.is_some_and(|at| tokio::time::Instant::now() >= at);
            if !failures.is_empty() && (all_gone || expired) {
                break;
            }
        }
        failures.sort_by_key(|(priority, _)| *priority);
        Err(failures
            .into_iter()
            .next()
            .map_or_else(|| CoordinatorError::Server("all workers disconnected before the run finished".into()), |(_, err)| err))
    }

    /// Carries out a user's request: checkpoints at the next step every rank can reach, or an abort.
    fn control(&mut self, control: Control, progress: &mut Progress) -> Result<()> {
        let signal = match control {
            Control::Abort { signal } => {
                return Err(CoordinatorError::Flag(format!(
                    "aborted on a second {signal}; the last complete checkpoint (`latest`) is kept"
                )))
            }
            Control::Stop { signal } => Some(signal),
            Control::Save => None,
        };
        let Some(at) = self.pace.checkpoint(signal.is_some(), self.total_steps) else {
            progress.note(&format!("{}: the run is about to finish; nothing to checkpoint", signal.unwrap_or("SIGUSR1")));
            return Ok(());
        };
        match signal {
            Some(signal) => {
                self.stop = Some(signal);
                progress.note(&format!("{signal}: stopping after checkpoint-{at}; send it again to abort now"));
            }
            None => progress.note(&format!("SIGUSR1: saving checkpoint-{at}")),
        }
        Ok(())
    }

    /// The error for a job without progress for --ddp_timeout: blames the ranks furthest behind.
    fn hung(&self, last_step: &BTreeMap<u32, u64>) -> CoordinatorError {
        let behind = last_step.values().copied().min().unwrap_or(0);
        let ranks: Vec<String> = last_step.iter().filter(|(_, &s)| s == behind).map(|(r, _)| format!("{r} ({})", self.host(*r))).collect();
        let rank = last_step.iter().find(|(_, &s)| s == behind).map_or(0, |(r, _)| *r);
        let message = format!(
            "no progress for {} s (--ddp_timeout): rank(s) {} last finished step {behind}; a hung process or collective. The job was stopped",
            self.plan.ddp_timeout.as_secs(),
            ranks.join(", ")
        );
        CoordinatorError::Worker { rank, host: self.host(rank), message }
    }

    fn worker_error(&self, rank: u32, message: String) -> CoordinatorError {
        CoordinatorError::Worker { rank, host: self.host(rank), message }
    }

    fn host(&self, rank: u32) -> String {
        self.hosts.get(&rank).cloned().unwrap_or_else(|| "not registered".into())
    }

    /// HF-style trainer_state.json plus what an exact resume needs.
    fn trainer_state(&self, step: u64, progress: &Progress) -> serde_json::Value {
        let per_epoch = self.sampler.steps_per_epoch() as u64;
        json!({
            "global_step": step,
            "epoch": progress.epoch(step),
            "max_steps": self.total_steps,
            "train_batch_size": self.plan.micro_batch,
            "gradient_accumulation_steps": self.plan.accumulation,
            "world_size": self.world,
            "sampler": {"seed": self.sampler.seed, "epoch": step / per_epoch, "step_in_epoch": step % per_epoch, "blocks": self.sampler.blocks},
            "log_history": progress.history,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_requested_checkpoint_lands_on_the_first_step_no_rank_was_sent() {
        let pace = Arc::new(Pace::new(2, 5)); // resumed after step 4
        assert!(pace.start(0, 5) && pace.start(0, 6) && pace.start(1, 5));
        assert_eq!(pace.checkpoint(false, 100), Some(7));
        assert_eq!(pace.checkpoint(true, 100), Some(7));
        assert_eq!(pace.checkpoint(true, 7), None, "the last step saves the final model anyway");
        assert_eq!((pace.at(6), pace.at(7)), ((false, false), (true, true)));

        // Rank 0 gets step 7 once it finished step 5 (LOOKAHEAD 2); a closed pace frees waiters.
        let next = std::thread::spawn({
            let pace = pace.clone();
            move || pace.start(0, 7)
        });
        pace.finished(0, 5);
        assert!(next.join().unwrap());
        let waiting = std::thread::spawn({
            let pace = pace.clone();
            move || pace.start(1, 9)
        });
        pace.close();
        assert!(!waiting.join().unwrap(), "after the attempt, producers stop");
        assert_eq!(pace.checkpoint(false, 100), Some(10), "requests count every step already handed out");
    }

    /// With ZeRO stage 0, rank 1 has nothing to write for the final model: it acknowledges at once
    /// and exits while rank 0 still saves. That is a finished rank, not a failed one.
    #[tokio::test]
    async fn a_rank_may_exit_once_its_final_save_is_acknowledged() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: crate::config::TrainArgs,
        }
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().to_string_lossy().into_owned();
        let argv = ["x", "--config_name", "tiny", "--train_tokenizer", "400", "--train_file", "d.jsonl", "--output_dir", &out];
        let flags = ["--do_train", "--device", "cpu", "--worker_bin", "/bin/true", "--num_workers", "2"];
        let plan = TrainPlan::resolve(&<Cli as clap::Parser>::parse_from(argv.iter().chain(&flags)).args).unwrap();
        let sampler = Sampler { blocks: 100, world: 2, micro_batch: 1, accumulation: 1, seed: 0 };
        let mut job = Job {
            world: 2,
            output_dir: dir.path().to_path_buf(),
            tokenizer_files: &[],
            plan: &plan,
            total_steps: 4,
            sampler,
            hosts: BTreeMap::new(),
            saves: BTreeMap::new(),
            evals: BTreeMap::new(),
            finished: 0,
            done: BTreeSet::new(),
            processes: 2,
            exited: 0,
            pace: Arc::new(Pace::new(2, 1)),
            stop: None,
            stopped_at: None,
        };
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let (_controls_tx, mut controls) = mpsc::unbounded_channel();
        let saved = |rank| Event::Saved(zerotune_proto::v1::SavedReport { rank, step: 4, dir: out.clone() });
        let exited = |rank| Event::Exited { rank: Some(rank), success: true, status: "exit status: 0".into() };
        for event in [saved(1), exited(1), Event::Disconnected { rank: 1 }, saved(0), exited(0)] {
            events_tx.send(event).unwrap();
        }
        let mut progress = Progress::new(dir.path(), 4, 50, 1, false).unwrap();
        let result = job.drive(&mut events, &mut controls, &mut progress).await;
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(job.finished, 2);
    }
}
