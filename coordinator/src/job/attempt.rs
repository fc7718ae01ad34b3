//! One launch of every worker: serve gRPC (loopback unless ranks run elsewhere), start the
//! workers, spawn one command producer per rank and drive the job until it ends or a rank fails;
//! then make sure every worker is gone. Also the signals that steer a running job.

use std::sync::Arc;

use tokio::sync::mpsc;
use zerotune_proto::plan::{Resume, WorkerPlan};
use zerotune_proto::{hostname, KEEPALIVE, KEEPALIVE_TIMEOUT};

use super::commands::produce_commands;
use super::driver::{Job, JobSpec};
use super::pace::Pace;
use super::{Outcome, Run};
use crate::config::Launcher;
use crate::config::TrainPlan;
use crate::error::{os_err, CoordinatorError, Result};
use crate::events::{Control, Signal};
use crate::launch::{self, LaunchSpec};
use crate::progress::Progress;
use crate::service::{AbortSwitch, JobService};

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
    let output_dir = run.cadence.output_dir.clone();
    let first_step = resume.as_ref().map_or(1, |r| r.step + 1);
    if let Some(r) = &resume {
        eprintln!("resuming from {} at step {}", r.dir, r.step);
    }
    let worker_plan = WorkerPlan { resume, ..run.worker_plan.clone() };
    let world = plan.world_size() as u32;
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
    let (bind, host) = match plan.launch.launcher {
        Launcher::Local => ("127.0.0.1".to_string(), "127.0.0.1".to_string()),
        _ => ("0.0.0.0".to_string(), plan.launch.master_addr.clone().unwrap_or_else(hostname)),
    };
    let port = if plan.launch.launcher == Launcher::Local { 0 } else { plan.launch.master_port };
    let listener = tokio::net::TcpListener::bind((bind.as_str(), port))
        .await
        .map_err(|source| CoordinatorError::Listen { addr: format!("{bind}:{port}"), source })?;
    let port = listener.local_addr().map_err(os_err("the coordinator's listening address"))?.port();
    let scheme = if plan.launch.tls.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://{host}:{port}");
    let mut builder = server_builder();
    if let Some(tls) = &plan.launch.tls {
        let identity = tonic::transport::Identity::from_pem(&tls.cert, &tls.key);
        builder = builder
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .map_err(|e| CoordinatorError::flag("--tls_cert/--tls_key", "", e.to_string()))?;
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
    let watchers = launch::start(&spec, &url, &secret, &events_tx)?;
    drop(events_tx);

    let steps_per_epoch = run.sampler.steps_per_epoch() as u64;
    let mut progress = Progress::new(&output_dir, run.total_steps, steps_per_epoch, plan.output.logging_steps, first_step > 1)?;
    let mut checkpoints = vec![];
    if let Some(r) = &worker_plan.resume {
        // The resumed checkpoint's history comes first, so later checkpoints carry the whole run's.
        let state = crate::checkpoint::read_trainer_state(std::path::Path::new(&r.dir))?;
        progress.resume_history(state.log_history, r.step);
        checkpoints = if state.checkpoints.is_empty() { vec![r.step] } else { state.checkpoints };
    }
    let mut job = Job::new(JobSpec {
        world,
        output_dir: output_dir.clone(),
        tokenizer_files: &run.tokenizer_files,
        plan,
        total_steps: run.total_steps,
        sampler: run.sampler,
        processes: watchers.len() as u32,
        pace: pace.clone(),
        checkpoints,
        data: &run.data,
    });
    let result = match (job.drive(&mut events, controls, &mut progress).await, job.stop) {
        // The user asked to stop: no restart.
        (Err(err @ CoordinatorError::Worker { .. }), Some(signal)) => {
            Err(CoordinatorError::WhileStopping { signal, source: Box::new(err) })
        }
        (result, _) => result,
    };
    pace.close();
    if result.is_err() && matches!(plan.launch.launcher, Launcher::Ssh { .. } | Launcher::Manual) {
        // Ranks we cannot kill ourselves hear the abort in their next heartbeat, even mid-step;
        // those whose connection closed never will.
        abort.throw();
        let limit = 2 * zerotune_proto::plan::heartbeat_interval(plan.launch.heartbeat_timeout);
        abort.wait_told(&job.still_connected(), limit).await;
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
        eval_loss: last_eval.map(|e| e.eval_loss),
        perplexity: last_eval.map(|e| e.perplexity),
        stopped_on: stopped.map(|(_, signal)| signal),
    })
}

/// HTTP/2 pings every few seconds: a worker whose host vanished without closing its connection
/// is dropped (and so reported) within KEEPALIVE x 3, at the transport level beside the heartbeats.
fn server_builder() -> tonic::transport::Server {
    tonic::transport::Server::builder().http2_keepalive_interval(Some(KEEPALIVE)).http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
}
