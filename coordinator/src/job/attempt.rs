//! One launch of every worker: serve gRPC (loopback unless ranks run elsewhere), start the
//! workers, spawn one command producer per rank and drive the job until it ends or a rank fails;
//! then make sure every worker is gone. Also the signals that steer a running job.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use zerotune_proto::plan::{Resume, WorkerPlan};
use zerotune_proto::{hostname, KEEPALIVE, KEEPALIVE_TIMEOUT};

use super::commands::produce_commands;
use super::driver::{JobSpec, RunningJob};
use super::pace::Pace;
use super::{Outcome, Run};
use crate::config::{LaunchPlan, Launcher, TrainPlan};
use crate::error::{os_err, CoordinatorError, Result};
use crate::events::{Control, Event, Signal};
use crate::launch::{self, LaunchSpec};
use crate::progress::Progress;
use crate::service::{AbortSwitch, CommandReceiver, JobService};

/// Turns signals to the coordinator into `Control`s: SIGUSR1 saves a checkpoint, the first SIGINT
/// or SIGTERM saves one and stops, the next aborts. (Workers run in process groups of their own,
/// so a terminal's Ctrl-C reaches only the coordinator.)
pub(super) fn forward_signals() -> Result<mpsc::UnboundedReceiver<Control>> {
    use tokio::signal::unix::{signal, SignalKind};
    let listen = |kind| signal(kind).map_err(os_err("cannot listen for signals"));
    let (mut int, mut term, mut usr1) =
        (listen(SignalKind::interrupt())?, listen(SignalKind::terminate())?, listen(SignalKind::user_defined1())?);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stopping = false;
        loop {
            let stop = tokio::select! {
                _ = int.recv() => Some(Signal::Int),
                _ = term.recv() => Some(Signal::Term),
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

/// One launch of all workers, from `resume` or the start, until the run ends or a rank fails.
pub(super) async fn attempt(
    plan: &TrainPlan,
    run: &Run,
    resume: Option<Resume>,
    controls: &mut mpsc::UnboundedReceiver<Control>,
) -> Result<Outcome> {
    let first_step = resume.as_ref().map_or(1, |r| r.step + 1);
    if let Some(r) = &resume {
        tracing::info!("resuming from {} at step {}", r.dir, r.step);
    }
    let worker_plan = WorkerPlan { resume, ..run.worker_plan.clone() };
    let world = plan.world_size() as u32;
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let pace = Arc::new(Pace::new(world, first_step));
    let receivers = (0..world).map(|rank| spawn_producer(run, &pace, rank, world, first_step)).collect();
    let secret = launch::job_secret()?;
    let abort = Arc::new(AbortSwitch::default());
    let plan_json = serde_json::to_string(&worker_plan).expect("plan serialises");
    let service = JobService::new(plan_json, receivers, events_tx.clone(), abort.clone());
    let server = Server::start(plan, service, &secret).await?;
    let watchers = launch_workers(plan, &server.url, &secret, &events_tx)?;
    drop(events_tx);

    let (mut progress, checkpoints) = progress_from(plan, run, worker_plan.resume.as_ref(), first_step)?;
    let mut job = RunningJob::new(JobSpec {
        world,
        output_dir: run.cadence.output_dir.clone(),
        tokenizer_files: &run.tokenizer_files,
        plan,
        total_steps: run.total_steps,
        sampler: run.sampler,
        processes: watchers.len() as u32,
        pace: pace.clone(),
        checkpoints,
        data: &run.data,
        block_size: run.cache.block_size,
    });
    let result = unless_stopping(job.drive(&mut events, controls, &mut progress).await, job.stop);
    pace.close();
    if result.is_err() && !launch::kills_its_workers(&plan.launch.launcher) {
        // Ranks we cannot kill ourselves hear the abort in their next heartbeat, even mid-step;
        // those whose connection closed never will.
        abort.throw();
        let limit = 2 * zerotune_proto::plan::heartbeat_interval(plan.launch.heartbeat_timeout);
        abort.wait_told(&job.still_connected(), limit).await;
    }
    drop(events); // workers still running see their launcher go and are killed
    server.stop_after(watchers).await;
    result?;
    let last_eval = progress.last_eval();
    let stopped = job.stopped_at.zip(job.stop);
    Ok(Outcome {
        output_dir: run.cadence.output_dir.clone(),
        steps: stopped.map_or(run.total_steps, |(step, _)| step),
        eval_loss: last_eval.map(|e| e.eval_loss),
        perplexity: last_eval.map(|e| e.perplexity),
        stopped_on: stopped.map(|(_, signal)| signal),
    })
}

/// The command producer of `rank` (on a blocking thread, as it reads the token cache), and the
/// channel the rank's command stream takes its commands from.
fn spawn_producer(run: &Run, pace: &Arc<Pace>, rank: u32, world: u32, first_step: u64) -> CommandReceiver {
    let (tx, rx) = mpsc::channel(4);
    let (cache, cadence, sampler, pace) = (run.cache.clone(), run.cadence.clone(), run.sampler, pace.clone());
    tokio::task::spawn_blocking(move || produce_commands(&sampler, &cache, &cadence, &pace, rank, world, first_step, tx));
    rx
}

/// A failure that came while the user's stop was under way is reported as such: no restart.
fn unless_stopping(result: Result<()>, stop: Option<Signal>) -> Result<()> {
    match (result, stop) {
        (Err(err @ CoordinatorError::Worker { .. }), Some(signal)) => {
            Err(CoordinatorError::WhileStopping { signal, source: Box::new(err) })
        }
        (result, _) => result,
    }
}

/// The attempt's progress, and its save history: a resumed checkpoint's history comes first, so
/// later checkpoints carry the whole run's.
fn progress_from(plan: &TrainPlan, run: &Run, resume: Option<&Resume>, first_step: u64) -> Result<(Progress, Vec<u64>)> {
    let steps_per_epoch = run.sampler.steps_per_epoch() as u64;
    let output_dir = &run.cadence.output_dir;
    let mut progress = Progress::new(output_dir, run.total_steps, steps_per_epoch, plan.output.logging_steps, first_step > 1)?;
    let Some(r) = resume else { return Ok((progress, vec![])) };
    let state = crate::checkpoint::read_trainer_state(std::path::Path::new(&r.dir))?;
    progress.resume_history(state.log_history, r.step);
    let checkpoints = if state.checkpoints.is_empty() { vec![r.step] } else { state.checkpoints };
    Ok((progress, checkpoints))
}

/// Starts every worker of `plan` (none for the manual launcher, which prints their commands),
/// told to reach `url`, with the environment they inherit and the TLS CA.
fn launch_workers(plan: &TrainPlan, url: &str, secret: &str, events: &mpsc::UnboundedSender<Event>) -> Result<Vec<JoinHandle<()>>> {
    let mut env = launch::propagated_env()?;
    if let Some(tls) = &plan.launch.tls {
        env.push((zerotune_proto::TLS_CA_ENV.into(), String::from_utf8_lossy(&tls.ca).into_owned()));
    }
    let spec = LaunchSpec {
        launcher: &plan.launch.launcher,
        placements: &plan.launch.placements,
        device: plan.launch.device,
        worker: &plan.launch.worker_bin,
        env: &env,
    };
    launch::start(&spec, url, secret, events)
}

/// Where the coordinator listens and how workers reach it: loopback on a free port when they run
/// here; else every interface on `--master_port`, reached at `--master_addr` (or this host's name).
fn endpoint(launch: &LaunchPlan) -> (String, String, u16) {
    match launch.launcher {
        Launcher::Local => ("127.0.0.1".into(), "127.0.0.1".into(), 0),
        _ => ("0.0.0.0".into(), launch.master_addr.clone().unwrap_or_else(hostname), launch.master_port),
    }
}

/// The job's gRPC server, serving until told to stop.
struct Server {
    url: String,
    stop: tokio::sync::oneshot::Sender<()>,
    serving: JoinHandle<std::result::Result<(), tonic::transport::Error>>,
}

impl Server {
    /// Listens where `endpoint` says (with TLS when asked) and serves `service` there to callers
    /// holding `secret`.
    async fn start(plan: &TrainPlan, service: JobService, secret: &str) -> Result<Server> {
        let (bind, host, port) = endpoint(&plan.launch);
        let listener = tokio::net::TcpListener::bind((bind.as_str(), port))
            .await
            .map_err(|source| CoordinatorError::Listen { addr: format!("{bind}:{port}"), source })?;
        let port = listener.local_addr().map_err(os_err("the coordinator's listening address"))?.port();
        let scheme = if plan.launch.tls.is_some() { "https" } else { "http" };
        let mut builder = server_builder();
        if let Some(tls) = &plan.launch.tls {
            let identity = tonic::transport::Identity::from_pem(&tls.cert, &tls.key);
            builder = builder
                .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
                .map_err(|e| CoordinatorError::flag("--tls_cert/--tls_key", "", e.to_string()))?;
        }
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let serving =
            tokio::spawn(builder.add_service(service.into_server(secret.to_string())).serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            }));
        Ok(Server { url: format!("{scheme}://{host}:{port}"), stop, serving })
    }

    /// Stops serving, then waits until every worker process and the server are gone (before a
    /// restart starts new ones).
    async fn stop_after(self, watchers: Vec<JoinHandle<()>>) {
        let _ = self.stop.send(());
        for watcher in watchers {
            let _ = watcher.await;
        }
        let _ = self.serving.await;
    }
}

/// HTTP/2 pings every few seconds: a worker whose host vanished without closing its connection
/// is dropped (and so reported) within KEEPALIVE x 3, at the transport level beside the heartbeats.
fn server_builder() -> tonic::transport::Server {
    tonic::transport::Server::builder().http2_keepalive_interval(Some(KEEPALIVE)).http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn worker_failure() -> CoordinatorError {
        CoordinatorError::Worker { rank: 1, host: "node-1".into(), message: "exited with code 1".into() }
    }

    #[test]
    fn a_rank_failing_during_the_users_stop_is_not_restarted() {
        let failed = unless_stopping(Err(worker_failure()), Some(Signal::Term));
        assert!(
            matches!(failed, Err(CoordinatorError::WhileStopping { signal: Signal::Term, ref source }) if matches!(**source, CoordinatorError::Worker { rank: 1, .. }))
        );
        // Without a stop, the failure stays a worker's, which the job may restart.
        assert!(matches!(unless_stopping(Err(worker_failure()), None), Err(CoordinatorError::Worker { rank: 1, .. })));
        assert!(matches!(unless_stopping(Err(CoordinatorError::Disconnected), Some(Signal::Int)), Err(CoordinatorError::Disconnected)));
        assert!(unless_stopping(Ok(()), Some(Signal::Int)).is_ok());
    }

    #[test]
    fn local_ranks_reach_a_free_loopback_port_and_remote_ones_the_master_address() {
        let mut plan = super::super::test_plan(Path::new("/nonexistent/out"), &["--master_port", "29511"]);
        assert_eq!(endpoint(&plan.launch), ("127.0.0.1".into(), "127.0.0.1".into(), 0));
        plan.launch.launcher = Launcher::Ssh { command: vec!["ssh".into()] };
        plan.launch.master_addr = Some("head-node".into());
        assert_eq!(endpoint(&plan.launch), ("0.0.0.0".into(), "head-node".into(), 29511));
        plan.launch.master_addr = None;
        assert_eq!(endpoint(&plan.launch).1, hostname(), "no --master_addr: this host's name");
    }

    #[test]
    fn only_ranks_the_coordinator_started_itself_end_with_their_launcher() {
        assert!(launch::kills_its_workers(&Launcher::Local));
        assert!(!launch::kills_its_workers(&Launcher::Ssh { command: vec!["ssh".into()] }));
        assert!(launch::kills_its_workers(&Launcher::Slurm { world_from: "SLURM_NTASKS=2".into() }));
        assert!(!launch::kills_its_workers(&Launcher::Manual));
    }
}
