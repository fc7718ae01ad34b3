//! The event loop of one attempt: progress and metrics from step and eval reports, checkpoints
//! made complete once every rank acknowledged them, the user's signals, liveness (heartbeats,
//! --ddp_timeout), and the verdict on a failure (`blame.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::pace::Pace;
use crate::blame::{Blame, Cause};
use crate::checkpoint;
use crate::config::{Launcher, TrainPlan};
use crate::error::{CoordinatorError, Result};
use crate::events::{Control, Event, ExitStatus, Signal};
use crate::progress::Progress;
use crate::sampler::Sampler;
use zerotune_proto::state::{DataIdentity, SamplerPosition, TrainerState};
use zerotune_proto::v1::{FailureKind, SaveKind, SavedReport};

/// After the first failure, how long to wait for the other ranks' reports before blaming one.
const FAILURE_GRACE: std::time::Duration = std::time::Duration::from_secs(10);
/// How long a rank's closed connection waits for the rank's own report before it counts as the
/// rank's end, where no process of the rank's own says so (srun runs every rank): a task killed
/// under srun ends the job about this long after its connection closed.
const DISCONNECT_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Each rank's last heartbeat: when, and at which step.
type Beats = BTreeMap<u32, (Instant, u64)>;

/// A failure as an event reports it: its cause, the rank it names (none for srun's own exit), and
/// the error the job ends with if it is the first.
type Failure = (Cause, Option<u32>, CoordinatorError);

/// What an event means for the event loop.
enum Next {
    /// Go on; with a failure to weigh when the event was one.
    Continue(Option<Failure>),
    /// The run is over: every process finished, or the ranks were started by hand and saved.
    Finished,
}

/// Liveness: the progress watchdog (--ddp_timeout: a rank that hangs alive stops everyone's
/// progress) and heartbeats (--heartbeat_timeout).
struct Watch {
    last_progress: Instant,
    last_step: BTreeMap<u32, u64>,
    /// When each working rank last beat, and its step then.
    beats: Beats,
}

impl Watch {
    fn new(world: u32) -> Self {
        Self { last_progress: Instant::now(), last_step: (0..world).map(|r| (r, 0)).collect(), beats: BTreeMap::new() }
    }

    /// The rank silent longest: (rank, its step, when its silence becomes a failure).
    fn most_silent(&self, timeout: std::time::Duration) -> Option<(u32, u64, Instant)> {
        self.beats.iter().min_by_key(|(_, (at, _))| *at).map(|(&rank, &(at, step))| (rank, step, at + timeout))
    }

    /// A finished step, save or evaluation is progress.
    fn saw(&mut self, event: &Event) {
        if matches!(event, Event::Step(_) | Event::Eval(_) | Event::Saved(_)) {
            self.last_progress = Instant::now();
        }
        if let Event::Step(report) = event {
            self.last_step.insert(report.rank, report.step);
        }
    }
}

/// The run's fixed facts, as the driver needs them.
pub(super) struct JobSpec<'a> {
    pub world: u32,
    pub output_dir: PathBuf,
    pub tokenizer_files: &'a [(String, Vec<u8>)],
    pub plan: &'a TrainPlan,
    pub total_steps: u64,
    pub sampler: Sampler,
    /// Processes we started and watch (0 when started by hand).
    pub processes: u32,
    pub pace: Arc<Pace>,
    /// The checkpoints saved so far, oldest first: those of the checkpoint this attempt resumed from, then its own.
    pub checkpoints: Vec<u64>,
    /// The data the run trains on, recorded in every checkpoint.
    pub data: &'a DataIdentity,
    /// Tokens per training block (recorded in every checkpoint).
    pub block_size: usize,
}

/// The driver's bookkeeping while workers run.
pub(super) struct RunningJob<'a> {
    spec: JobSpec<'a>,
    pub hosts: BTreeMap<u32, String>,
    /// Acknowledgements per (step, directory) saved.
    saves: BTreeMap<(u64, String), u32>,
    /// (loss sum, tokens, ranks) per evaluated step.
    evals: BTreeMap<u64, (f64, u64, u32)>,
    finished: u32,
    /// Ranks whose last save (final model, or the checkpoint of a requested stop) is acknowledged:
    /// each may exit successfully before the others' acknowledgements arrive.
    done: BTreeSet<u32>,
    exited: u32,
    /// Ranks whose end we heard of (a failure reported, the process exited): once all are, a
    /// failed attempt has nothing more to tell. A closed connection alone is not an end: the
    /// rank's report may still follow. Without per-rank processes (srun, started by hand), a
    /// rank that dies silently is heard of once its connection has been closed for
    /// DISCONNECT_GRACE (`disconnected`).
    ended: BTreeSet<u32>,
    /// When each rank's connection closed.
    disconnected: BTreeMap<u32, Instant>,
    /// A stop was asked for, on this signal (its step is the pace's `stop_at`).
    pub stop: Option<Signal>,
    /// The step whose checkpoint ended the run on request.
    pub stopped_at: Option<u64>,
}

impl<'a> RunningJob<'a> {
    pub fn new(spec: JobSpec<'a>) -> Self {
        Self {
            spec,
            hosts: BTreeMap::new(),
            saves: BTreeMap::new(),
            evals: BTreeMap::new(),
            finished: 0,
            done: BTreeSet::new(),
            exited: 0,
            ended: BTreeSet::new(),
            disconnected: BTreeMap::new(),
            stop: None,
            stopped_at: None,
        }
    }

    /// Runs the attempt to its end: Ok once every rank finished (or stopped on request), or the
    /// error of the most direct failure.
    pub async fn drive(
        &mut self,
        events: &mut mpsc::UnboundedReceiver<Event>,
        controls: &mut mpsc::UnboundedReceiver<Control>,
        progress: &mut Progress,
    ) -> Result<()> {
        // One death makes every rank fail (their collectives break), so the first report is
        // often not the cause: after the first failure, collect the others until every process
        // is gone and every registered rank's end was heard of (or a grace period passed), then
        // let `Blame` pick the most direct.
        let mut blame = Blame::default();
        let mut deadline: Option<Instant> = None;
        let mut watch = Watch::new(self.spec.world);
        let plan = self.spec.plan;
        let launch = &plan.launch;
        loop {
            let settled = if blame.is_empty() { None } else { self.settled_at() };
            if settled.is_some_and(|at| at <= Instant::now()) {
                break;
            }
            let hung_at = watch.last_progress + launch.ddp_timeout;
            let silent = watch.most_silent(launch.heartbeat_timeout);
            let wake = [Some(hung_at), deadline, silent.map(|s| s.2), settled].into_iter().flatten().min().expect("hung_at");
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
                        let step = watch.last_step.get(&rank).map_or(beat_step, |&s| s.max(beat_step));
                        let message = format!(
                            "no heartbeat for {} s (--heartbeat_timeout) after step {step}: the process is stopped or frozen, \
                             or its host is unreachable",
                            launch.heartbeat_timeout.as_secs()
                        );
                        blame.add(Cause::OwnError, Some(rank), self.worker_error(rank, message));
                        break;
                    }
                    None if deadline.is_none() => return Err(self.hung(&watch.last_step)),
                    None => break,
                },
            };
            let Some(event) = event else { break };
            watch.saw(&event);
            if let Event::Step(report) = &event {
                self.spec.pace.finished(report.rank, report.step);
            }
            match self.on_event(event, blame.is_empty(), &mut watch.beats, progress)? {
                Next::Finished => return Ok(()),
                Next::Continue(None) => {}
                Next::Continue(Some((cause, rank, error))) => {
                    blame.add(cause, rank, error);
                    deadline.get_or_insert(Instant::now() + FAILURE_GRACE);
                }
            }
            if deadline.is_some_and(|at| Instant::now() >= at) {
                break;
            }
        }
        Err(blame.verdict().unwrap_or_else(|| CoordinatorError::Disconnected))
    }

    /// When a failed attempt has nothing more to tell: once every process is gone and every
    /// rank's end was heard of. Where ranks have no process of their own (srun, whose one process
    /// runs every rank and outlives a killed task by Slurm's KillWait; ranks started by hand), a
    /// rank's connection closed for DISCONNECT_GRACE is its end, and srun is not waited for.
    /// None while some rank may still report.
    fn settled_at(&self) -> Option<Instant> {
        let own_processes = matches!(self.spec.plan.launch.launcher, Launcher::Local | Launcher::Ssh { .. });
        if own_processes && self.spec.processes > 0 && self.exited < self.spec.processes {
            return None;
        }
        let mut at = Instant::now();
        for rank in self.hosts.keys().filter(|rank| !self.ended.contains(rank) && !self.done.contains(rank)) {
            let closed = self.disconnected.get(rank).filter(|_| !own_processes)?;
            at = at.max(*closed + DISCONNECT_GRACE);
        }
        Some(at)
    }

    /// What one report, exit or signal means: bookkeeping, and a failure to weigh if it is one.
    /// `healthy`: no failure so far (after one, steps are no longer progress to show).
    fn on_event(&mut self, event: Event, healthy: bool, beats: &mut Beats, progress: &mut Progress) -> Result<Next> {
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
                if report.rank == 0 && healthy {
                    progress.step(report)?;
                }
                None
            }
            Event::Eval(report) => {
                self.eval(report, progress)?;
                None
            }
            Event::Saved(report) => return self.on_saved(report, healthy, beats, progress),
            Event::Disconnected { rank } => self.on_disconnected(rank, beats),
            Event::Failed { rank, kind, message } => {
                self.ended.insert(rank);
                beats.remove(&rank);
                let cause = if kind == FailureKind::PeerLost { Cause::PeerLost } else { Cause::OwnError };
                Some((cause, Some(rank), self.worker_error(rank, message)))
            }
            Event::Exited { rank, status } => return Ok(self.on_exited(rank, status, healthy, beats)),
        };
        Ok(Next::Continue(failure))
    }

    /// One rank's save: its last (the final model, or the checkpoint a stop asked for) means its
    /// work is done and it exits without beating again.
    fn on_saved(&mut self, report: SavedReport, healthy: bool, beats: &mut Beats, progress: &mut Progress) -> Result<Next> {
        let last = report.kind() == SaveKind::FinalModel || self.spec.pace.at(report.step).1;
        if last {
            beats.remove(&report.rank);
            self.done.insert(report.rank);
        }
        if self.saved(report, last, healthy, progress)? {
            return Ok(Next::Finished); // started by hand: nothing of ours to wait for
        }
        Ok(Next::Continue(None))
    }

    /// A rank's connection closed: it cannot beat any more, so its silence is no news. A failure
    /// unless its work was done; not an end yet, as the rank's own report may still follow.
    fn on_disconnected(&mut self, rank: u32, beats: &mut Beats) -> Option<Failure> {
        beats.remove(&rank);
        self.disconnected.insert(rank, Instant::now());
        (self.finished < self.spec.world && !self.done.contains(&rank)).then(|| {
            let message = "its connection to the coordinator closed before the run finished (the process died or its host is unreachable)";
            (Cause::Disconnected, Some(rank), self.worker_error(rank, message.into()))
        })
    }

    /// A watched process ended (`rank` none: srun, which runs every rank): the run's end once
    /// every process has exited after its work, else a failure.
    fn on_exited(&mut self, rank: Option<u32>, status: ExitStatus, healthy: bool, beats: &mut Beats) -> Next {
        self.exited += 1;
        if let Some(rank) = rank {
            self.ended.insert(rank);
            beats.remove(&rank);
        }
        let failure = if status.success() && rank.map_or(self.finished == self.spec.world, |rank| self.done.contains(&rank)) {
            if self.exited == self.spec.processes && healthy {
                return Next::Finished;
            }
            None
        } else if let Some(rank) = rank {
            let cause = if matches!(status, ExitStatus::Signal(_)) { Cause::Killed } else { Cause::Exited };
            let message = format!("the worker process exited ({status}) before the run finished");
            Some((cause, Some(rank), self.worker_error(rank, message)))
        } else {
            Some((Cause::LauncherExited, None, CoordinatorError::SrunExited { status }))
        };
        Next::Continue(failure)
    }

    /// Adds one rank's share of an evaluation; once every rank's is in, records it.
    fn eval(&mut self, report: zerotune_proto::v1::EvalReport, progress: &mut Progress) -> Result<()> {
        let entry = self.evals.entry(report.step).or_default();
        entry.0 += report.loss_sum;
        entry.1 += report.tokens;
        entry.2 += 1;
        if entry.2 == self.spec.world {
            let (sum, tokens, _) = *entry;
            progress.eval(report.step, sum, tokens)?;
        }
        Ok(())
    }

    /// Counts one rank's acknowledgement of a save; once every rank's is in (and nothing failed),
    /// completes the checkpoint or the final model. True when that ends a job started by hand.
    fn saved(&mut self, report: SavedReport, last: bool, healthy: bool, progress: &mut Progress) -> Result<bool> {
        let acks = self.saves.entry((report.step, report.dir.clone())).or_default();
        let kind = report.kind();
        *acks += 1;
        if *acks < self.spec.world || !healthy {
            return Ok(false);
        }
        let output_dir = &self.spec.output_dir;
        if kind == SaveKind::FinalModel {
            checkpoint::finalize_model(output_dir, self.spec.tokenizer_files)?;
            self.finished = self.spec.world;
            progress.note(&format!("saved the final model to {}", output_dir.display()));
        } else {
            // A step saved again (after a restart) counts as saved now.
            self.spec.checkpoints.retain(|&step| step != report.step);
            self.spec.checkpoints.push(report.step);
            let state = self.trainer_state(report.step, progress);
            checkpoint::finalize(output_dir, report.step, self.spec.tokenizer_files, &state, self.spec.plan.output.save_total_limit)?;
            progress.note(&format!("saved checkpoint-{}", report.step));
            if !last {
                return Ok(false);
            }
            self.stopped_at = Some(report.step);
            self.finished = self.spec.world;
        }
        Ok(self.spec.processes == 0)
    }

    /// Carries out a user's request: checkpoints at the next step every rank can reach, or an abort.
    fn control(&mut self, control: Control, progress: &mut Progress) -> Result<()> {
        let signal = match control {
            Control::Abort { signal } => return Err(CoordinatorError::Aborted { signal }),
            Control::Stop { signal } => Some(signal),
            Control::Save => None,
        };
        let Some(at) = self.spec.pace.checkpoint(signal.is_some(), self.spec.total_steps) else {
            progress.note(&format!("{}: the run is about to finish; nothing to checkpoint", signal.unwrap_or(Signal::Usr1)));
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
            self.spec.plan.launch.ddp_timeout.as_secs(),
            ranks.join(", ")
        );
        CoordinatorError::Worker { rank, host: self.host(rank), message }
    }

    fn worker_error(&self, rank: u32, message: String) -> CoordinatorError {
        CoordinatorError::Worker { rank, host: self.host(rank), message }
    }

    /// The registered ranks whose connection has not closed: those an abort can still reach
    /// through their heartbeat.
    pub fn still_connected(&self) -> BTreeSet<u32> {
        self.hosts.keys().copied().filter(|rank| !self.disconnected.contains_key(rank)).collect()
    }

    fn host(&self, rank: u32) -> String {
        self.hosts.get(&rank).cloned().unwrap_or_else(|| "not registered".into())
    }

    /// HF-style trainer_state.json plus what an exact resume needs.
    fn trainer_state(&self, step: u64, progress: &Progress) -> TrainerState {
        let (sampler, per_epoch) = (&self.spec.sampler, self.spec.sampler.steps_per_epoch() as u64);
        let (epoch, step_in_epoch) = (step / per_epoch, step % per_epoch);
        TrainerState {
            global_step: step,
            epoch: progress.epoch(step),
            max_steps: self.spec.total_steps,
            train_batch_size: self.spec.plan.batch.micro,
            gradient_accumulation_steps: self.spec.plan.batch.accumulation,
            world_size: self.spec.world,
            block_size: Some(self.spec.block_size),
            sampler: SamplerPosition { seed: sampler.seed, epoch, step_in_epoch, blocks: sampler.blocks },
            log_history: progress.history.clone(),
            checkpoints: self.spec.checkpoints.clone(),
            data: Some(self.spec.data.clone()),
        }
    }
}

#[cfg(test)]
#[path = "driver_tests.rs"]
mod tests;
