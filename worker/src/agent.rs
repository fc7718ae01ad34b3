//! The worker side of the job: register with the coordinator, receive the plan, then execute the
//! command stream (train steps, evaluations, saves, finish) and report each result, with a
//! heartbeat beside it that also carries the coordinator's abort.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tch::{Device, Tensor};
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use zerotune_hf::layout;
use zerotune_proto::plan::{Collectives, WorkerPlan};
use zerotune_proto::v1::coordinator_client::CoordinatorClient;
use zerotune_proto::v1::{
    command, Batch, CommandsRequest, EvalReport, FailureKind, FailureReport, HeartbeatRequest, RegisterRequest, RendezvousRequest,
    SaveKind, SavedReport, StepReport,
};
use zerotune_proto::SECRET_HEADER;

use crate::comm::ring::TcpRing;
use crate::comm::{nccl, Collective, Single};
use crate::error::WorkerError;
use crate::train::{batch_tensor, Trainer};

/// Adds the job secret to every request.
#[derive(Clone)]
struct AddSecret(MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for AddSecret {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        request.metadata_mut().insert(SECRET_HEADER, self.0.clone());
        Ok(request)
    }
}

type Client = CoordinatorClient<InterceptedService<Channel, AddSecret>>;

/// How to reach the coordinator and who this worker is.
pub struct AgentArgs {
    pub coordinator: String,
    pub secret: String,
    pub rank: u32,
    pub device: Device,
    pub device_name: String,
}

/// Runs the job to completion; on failure tells the coordinator why before returning the error,
/// and before its command stream closes, so the report is there before the disconnect.
pub fn run(args: AgentArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let mut client = rt.block_on(connect(&args))?;
    let mut stream = None;
    let finished_step = Arc::new(AtomicU64::new(0));
    let result = serve(&rt, &mut client, &args, &mut stream, &finished_step);
    if let Err(err) = &result {
        let kind = match err.downcast_ref::<WorkerError>() {
            Some(WorkerError::Peer(_)) => FailureKind::PeerLost,
            _ => FailureKind::Own,
        };
        let report = FailureReport { rank: args.rank, message: zerotune_hf::os::error_report(err.as_ref()), kind: kind.into() };
        let _ = rt.block_on(client.report_failure(report));
        if kind == FailureKind::PeerLost {
            // The peer may have left because the coordinator aborted the job, before this rank's
            // own heartbeat heard it: then that is what ended this rank too.
            let beat = HeartbeatRequest { rank: args.rank, step: finished_step.load(Ordering::Relaxed) };
            let asked = rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), client.heartbeat(beat)).await });
            if let Ok(Ok(reply)) = asked {
                if reply.get_ref().abort {
                    tracing::warn!("rank {}: the coordinator aborted the job; exiting", args.rank);
                }
            }
        }
    }
    drop(stream);
    result
}

async fn connect(args: &AgentArgs) -> anyhow::Result<Client> {
    // Pings keep a dead coordinator host from going unnoticed (the command stream then fails).
    let mut endpoint = Channel::from_shared(args.coordinator.clone())?;
    if args.coordinator.starts_with("https://") {
        let ca = std::env::var(zerotune_proto::TLS_CA_ENV).map_err(|_| {
            anyhow::anyhow!("the coordinator {} uses TLS: set {} to its CA certificate (PEM)", args.coordinator, zerotune_proto::TLS_CA_ENV)
        })?;
        let host = endpoint.uri().host().unwrap_or("localhost").to_string();
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)).domain_name(host);
        endpoint = endpoint.tls_config(tls)?;
    }
    let channel = endpoint
        .http2_keep_alive_interval(zerotune_proto::KEEPALIVE)
        .keep_alive_timeout(zerotune_proto::KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the coordinator at {}: {e}", args.coordinator))?;
    let secret =
        args.secret.parse().map_err(|_| anyhow::anyhow!("{} holds characters a secret cannot have", zerotune_proto::SECRET_ENV))?;
    Ok(CoordinatorClient::with_interceptor(channel, AddSecret(secret)).max_decoding_message_size(256 << 20))
}

/// Registers, joins the collectives and executes the command stream, which it leaves in `stream`.
fn serve(
    rt: &tokio::runtime::Runtime,
    client: &mut Client,
    args: &AgentArgs,
    stream: &mut Option<tonic::Streaming<zerotune_proto::v1::Command>>,
    finished_step: &Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let host = zerotune_proto::hostname();
    let local_rank = std::env::var("LOCAL_RANK").ok().and_then(|r| r.parse().ok()).unwrap_or(0);
    let register = RegisterRequest { rank: args.rank, host, device: args.device_name.clone(), pid: std::process::id(), local_rank };
    let reply = rt.block_on(client.register(register))?.into_inner();
    let plan: WorkerPlan = serde_json::from_str(&reply.plan_json)?;
    finished_step.store(plan.resume.as_ref().map_or(0, |r| r.step), Ordering::Relaxed);
    let timeout = Duration::from_millis(plan.heartbeat_timeout_ms);
    rt.spawn(heartbeat(client.clone(), args.rank, finished_step.clone(), plan.heartbeat_interval(), timeout));
    let comm = rt.block_on(collectives(client, args, plan.collectives, reply.world_size as usize))?;
    let mut trainer = Trainer::with_comm(plan, args.device, comm)?;
    let stream = stream.insert(rt.block_on(client.commands(CommandsRequest { rank: args.rank }))?.into_inner());
    let rank = args.rank;
    while let Some(cmd) = rt.block_on(stream.message())? {
        match cmd.kind {
            Some(command::Kind::Step(step)) => {
                crate::test_hook::fault(rank, step.step);
                let batches = tensors(&step.micro_batches, args.device)?;
                let o = trainer.train_step(&batches)?;
                let report = StepReport {
                    rank,
                    step: step.step,
                    loss: o.loss,
                    learning_rate: o.learning_rate,
                    grad_norm: o.grad_norm,
                    tokens: o.tokens,
                    skipped: o.skipped,
                    loss_scale: o.loss_scale,
                };
                rt.block_on(client.report_step(report))?;
                finished_step.store(step.step, Ordering::Relaxed);
            }
            Some(command::Kind::Evaluate(eval)) => {
                let batches = tensors(&eval.batches, args.device)?;
                let (loss_sum, tokens) = trainer.evaluate(&batches)?;
                rt.block_on(client.report_eval(EvalReport { rank, step: eval.step, loss_sum, tokens }))?;
            }
            Some(command::Kind::Save(save)) => {
                let dir = Path::new(&save.dir);
                trainer.save_model(&dir.join(layout::MODEL_DIR))?;
                trainer.save_optimizer(&dir.join(layout::OPTIMIZER_DIR))?;
                let kind = SaveKind::Checkpoint.into();
                rt.block_on(client.report_saved(SavedReport { rank, step: save.step, dir: save.dir, kind }))?;
            }
            Some(command::Kind::Finish(finish)) => {
                trainer.save_model(Path::new(&finish.dir))?;
                let kind = SaveKind::FinalModel.into();
                rt.block_on(client.report_saved(SavedReport { rank, step: finish.step, dir: finish.dir, kind }))?;
                return Ok(());
            }
            Some(command::Kind::Stop(stop)) => {
                tracing::info!("rank {rank}: stopping after step {} on the coordinator's request", stop.step);
                return Ok(());
            }
            None => anyhow::bail!("the coordinator sent an empty command (version mismatch?)"),
        }
    }
    anyhow::bail!("the coordinator closed the command stream before the run finished")
}

/// Beats every `interval` beside the work (so also mid-step or stuck in a collective), and ends
/// the process when the coordinator says abort or has not answered for `timeout`: no orphans.
/// It ends with `_exit`: the exit handlers of the CUDA runtime and NCCL could wait forever on the
/// collective another thread is stuck in.
async fn heartbeat(mut client: Client, rank: u32, finished_step: Arc<AtomicU64>, interval: Duration, timeout: Duration) {
    let mut ticks = tokio::time::interval(interval);
    let mut answered = Instant::now();
    loop {
        ticks.tick().await;
        let beat = HeartbeatRequest { rank, step: finished_step.load(Ordering::Relaxed) };
        match tokio::time::timeout(timeout, client.heartbeat(beat)).await {
            Ok(Ok(reply)) if reply.get_ref().abort => {
                tracing::warn!("rank {rank}: the coordinator aborted the job; exiting");
                exit_now(1);
            }
            Ok(Ok(_)) => answered = Instant::now(),
            _ if answered.elapsed() >= timeout => {
                tracing::error!("rank {rank}: no answer from the coordinator for {} s (--heartbeat_timeout); exiting", timeout.as_secs());
                exit_now(1);
            }
            _ => {}
        }
    }
}

/// Opens this rank's collectives through the coordinator's rendezvous: NCCL between GPUs (rank 0
/// makes the id), a TCP ring between CPU ranks (each listens where it reaches the coordinator).
async fn collectives(client: &mut Client, args: &AgentArgs, backend: Collectives, world: usize) -> anyhow::Result<Box<dyn Collective>> {
    let rank = args.rank;
    if backend == Collectives::None || (backend == Collectives::Ring && world == 1) {
        return Ok(Box::new(Single));
    }
    if backend == Collectives::Nccl {
        if args.device == Device::Cpu {
            anyhow::bail!("NCCL collectives need a GPU, but this rank runs on the CPU");
        }
        let nccl_id = if rank == 0 { nccl::unique_id()? } else { vec![] };
        let reply = client.rendezvous(RendezvousRequest { rank, ring_address: String::new(), nccl_id }).await?.into_inner();
        return Ok(Box::new(tokio::task::block_in_place(|| nccl::Nccl::join(&reply.nccl_id, rank as usize, world, args.device))?));
    }
    let host = reachable_ip(&args.coordinator)?;
    let listener = std::net::TcpListener::bind((host, 0)).map_err(|e| anyhow::anyhow!("cannot listen for the ring on {host}: {e}"))?;
    let ring_address = listener.local_addr()?.to_string();
    let reply = client.rendezvous(RendezvousRequest { rank, ring_address, nccl_id: vec![] }).await?.into_inner();
    let ring = tokio::task::block_in_place(|| {
        TcpRing::connect(listener, rank as usize, reply.ring_addresses, &args.secret, std::time::Duration::from_secs(120))
    })?;
    Ok(Box::new(ring))
}

/// The local address this machine uses to reach `url`'s host: peers on the same network reach
/// us there (no packet is sent).
fn reachable_ip(url: &str) -> anyhow::Result<std::net::IpAddr> {
    let authority = url.split("://").last().unwrap_or(url).trim_end_matches('/');
    let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
    socket.connect(authority).map_err(|e| anyhow::anyhow!("cannot resolve the coordinator address {authority}: {e}"))?;
    Ok(socket.local_addr()?.ip())
}

fn tensors(batches: &[Batch], device: Device) -> anyhow::Result<Vec<Tensor>> {
    Ok(batches.iter().map(|b| batch_tensor(b.rows, b.cols, &b.tokens, device)).collect::<Result<_, _>>()?)
}

/// Ends the process at once, without exit handlers (stderr is unbuffered: what was said is out).
fn exit_now(code: i32) -> ! {
    // SAFETY: _exit only ends the process.
    unsafe { libc::_exit(code) }
}
