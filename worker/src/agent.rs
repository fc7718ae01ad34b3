//! The worker side of the job: register with the coordinator, receive the plan, then execute the
//! command stream (train steps, evaluations, saves, finish) and report each result.

use std::path::Path;

use tch::{Device, Tensor};
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use zerotune_proto::plan::WorkerPlan;
use zerotune_proto::v1::coordinator_client::CoordinatorClient;
use zerotune_proto::v1::{command, Batch, CommandsRequest, EvalReport, FailureReport, RegisterRequest, SavedReport, StepReport};
use zerotune_proto::SECRET_HEADER;

use crate::train::{batch_tensor, Trainer};

/// Adds the job secret to every request.
type AddSecret = Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send>;
type Client = CoordinatorClient<InterceptedService<Channel, AddSecret>>;

/// How to reach the coordinator and who this worker is.
pub struct AgentArgs {
    pub coordinator: String,
    pub secret: String,
    pub rank: u32,
    pub device: Device,
    pub device_name: String,
}

/// Runs the job to completion; on failure tells the coordinator why before returning the error.
pub fn run(args: AgentArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let mut client = rt.block_on(connect(&args))?;
    let result = serve(&rt, &mut client, &args);
    if let Err(err) = &result {
        let report = FailureReport { rank: args.rank, message: format!("{err:#}") };
        let _ = rt.block_on(client.report_failure(report));
    }
    result
}

async fn connect(args: &AgentArgs) -> anyhow::Result<Client> {
    let channel = Channel::from_shared(args.coordinator.clone())?
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the coordinator at {}: {e}", args.coordinator))?;
    let secret: MetadataValue<_> = args.secret.parse()?;
    let interceptor: AddSecret = Box::new(move |mut req: tonic::Request<()>| {
        req.metadata_mut().insert(SECRET_HEADER, secret.clone());
        Ok(req)
    });
    Ok(CoordinatorClient::with_interceptor(channel, interceptor).max_decoding_message_size(256 << 20))
}

fn serve(rt: &tokio::runtime::Runtime, client: &mut Client, args: &AgentArgs) -> anyhow::Result<()> {
    let host = hostname();
    let register = RegisterRequest { rank: args.rank, host, device: args.device_name.clone(), pid: std::process::id() };
    let reply = rt.block_on(client.register(register))?.into_inner();
    let plan: WorkerPlan = serde_json::from_str(&reply.plan_json)?;
    let world_size = reply.world_size;
    let mut trainer = Trainer::new(plan, args.device)?;
    let mut stream = rt.block_on(client.commands(CommandsRequest { rank: args.rank }))?.into_inner();
    let rank = args.rank;
    while let Some(cmd) = rt.block_on(stream.message())? {
        match cmd.kind {
            Some(command::Kind::Step(step)) => {
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
            }
            Some(command::Kind::Evaluate(eval)) => {
                let batches = tensors(&eval.batches, args.device)?;
                let (loss_sum, tokens) = trainer.evaluate(&batches)?;
                rt.block_on(client.report_eval(EvalReport { rank, step: eval.step, loss_sum, tokens }))?;
            }
            Some(command::Kind::Save(save)) => {
                let dir = Path::new(&save.dir);
                if rank == 0 {
                    trainer.save_model(&dir.join("model"))?;
                }
                trainer.save_optimizer(&dir.join("optimizer"), rank, world_size)?;
                rt.block_on(client.report_saved(SavedReport { rank, step: save.step, dir: save.dir }))?;
            }
            Some(command::Kind::Finish(finish)) => {
                if rank == 0 {
                    trainer.save_model(Path::new(&finish.dir))?;
                }
                rt.block_on(client.report_saved(SavedReport { rank, step: finish.step, dir: finish.dir }))?;
                return Ok(());
            }
            None => anyhow::bail!("the coordinator sent an empty command (version mismatch?)"),
        }
    }
    anyhow::bail!("the coordinator closed the command stream before the run finished")
}

fn tensors(batches: &[Batch], device: Device) -> anyhow::Result<Vec<Tensor>> {
    Ok(batches.iter().map(|b| batch_tensor(b.rows, b.cols, &b.tokens, device)).collect::<Result<_, _>>()?)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "localhost".into())
}
