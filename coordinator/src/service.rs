//! The gRPC service workers talk to: registration, the per-rank command streams, reports and
//! heartbeats, which it forwards as plain `Event`s (`events.rs`) to the job driver, and the abort switch the
//! driver throws. Every call must carry the job secret.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use zerotune_proto::v1::coordinator_server::{Coordinator, CoordinatorServer};
use zerotune_proto::v1::*;
use zerotune_proto::SECRET_HEADER;

use crate::events::Event;

/// The job's abort switch, shared by the driver and the Heartbeat RPC: once thrown, every
/// heartbeat reply says abort, so ranks started elsewhere exit even when stuck in a step.
#[derive(Default)]
pub struct AbortSwitch {
    thrown: AtomicBool,
    told: Mutex<BTreeSet<u32>>,
    heard: tokio::sync::Notify,
}

impl AbortSwitch {
    pub fn throw(&self) {
        self.thrown.store(true, Ordering::SeqCst);
    }

    /// Whether `rank` must abort; remembers that it was told.
    fn tell(&self, rank: u32) -> bool {
        let thrown = self.thrown.load(Ordering::SeqCst);
        if thrown {
            self.told.lock().expect("abort lock").insert(rank);
            self.heard.notify_waiters();
        }
        thrown
    }

    /// Waits until every one of `ranks` heard the abort, or `limit` passed.
    pub async fn wait_told(&self, ranks: &BTreeSet<u32>, limit: std::time::Duration) {
        let _ = tokio::time::timeout(limit, async {
            loop {
                let heard = self.heard.notified();
                if self.told.lock().expect("abort lock").is_superset(ranks) {
                    return;
                }
                heard.await;
            }
        })
        .await;
    }
}

/// One rank's ordered commands, as the `Commands` RPC streams them.
pub type CommandReceiver = mpsc::Receiver<Result<Command, Status>>;

/// Shared state behind the RPCs.
pub struct JobService {
    plan_json: String,
    world_size: u32,
    /// Each rank's command stream, taken once by that rank's `Commands` call.
    commands: Mutex<Vec<Option<CommandReceiver>>>,
    events: mpsc::UnboundedSender<Event>,
    /// Rendezvous requests so far, by rank; the reply is published once all are in.
    rendezvous: Mutex<Vec<Option<RendezvousRequest>>>,
    rendezvous_done: tokio::sync::watch::Sender<Option<RendezvousReply>>,
    abort: Arc<AbortSwitch>,
}

impl JobService {
    pub fn new(plan_json: String, commands: Vec<CommandReceiver>, events: mpsc::UnboundedSender<Event>, abort: Arc<AbortSwitch>) -> Self {
        let world_size = commands.len() as u32;
        Self {
            plan_json,
            world_size,
            commands: Mutex::new(commands.into_iter().map(Some).collect()),
            events,
            rendezvous: Mutex::new(vec![None; world_size as usize]),
            rendezvous_done: tokio::sync::watch::channel(None).0,
            abort,
        }
    }

    /// The tonic service, refusing calls without `secret`.
    pub fn into_server(
        self,
        secret: String,
    ) -> tonic::service::interceptor::InterceptedService<CoordinatorServer<Self>, impl tonic::service::Interceptor + Clone> {
        let check = move |req: Request<()>| match req.metadata().get(SECRET_HEADER) {
            Some(value) if value.as_bytes() == secret.as_bytes() => Ok(req),
            _ => Err(Status::unauthenticated("missing or wrong job secret")),
        };
        CoordinatorServer::with_interceptor(self, check)
    }

    fn rank(&self, rank: u32) -> Result<usize, Status> {
        if rank < self.world_size {
            Ok(rank as usize)
        } else {
            Err(Status::invalid_argument(format!("rank {rank} is outside the world of {}", self.world_size)))
        }
    }

    fn send(&self, event: Event) -> Result<Response<Ack>, Status> {
        self.events.send(event).map_err(|_| Status::unavailable("the job is shutting down"))?;
        Ok(Response::new(Ack {}))
    }
}

#[tonic::async_trait]
impl Coordinator for JobService {
    async fn register(&self, request: Request<RegisterRequest>) -> Result<Response<RegisterReply>, Status> {
        let r = request.into_inner();
        self.rank(r.rank)?;
        self.send(Event::Registered { rank: r.rank, local_rank: r.local_rank, host: r.host, device: r.device, pid: r.pid })?;
        Ok(Response::new(RegisterReply { plan_json: self.plan_json.clone(), world_size: self.world_size }))
    }

    async fn rendezvous(&self, request: Request<RendezvousRequest>) -> Result<Response<RendezvousReply>, Status> {
        let r = request.into_inner();
        let rank = self.rank(r.rank)?;
        let mut done = self.rendezvous_done.subscribe();
        {
            let mut arrived = self.rendezvous.lock().expect("rendezvous lock");
            arrived[rank] = Some(r);
            if arrived.iter().all(Option::is_some) {
                let all: Vec<&RendezvousRequest> = arrived.iter().flatten().collect();
                let reply = RendezvousReply {
                    ring_addresses: all.iter().map(|r| r.ring_address.clone()).collect(),
                    nccl_id: all[0].nccl_id.clone(),
                };
                self.rendezvous_done.send_replace(Some(reply));
            }
        }
        let reply = done.wait_for(Option::is_some).await.map_err(|_| Status::unavailable("the job is shutting down"))?;
        Ok(Response::new(reply.clone().expect("published")))
    }

    type CommandsStream = Watched;

    async fn commands(&self, request: Request<CommandsRequest>) -> Result<Response<Self::CommandsStream>, Status> {
        let rank = self.rank(request.into_inner().rank)?;
        let receiver = self.commands.lock().expect("commands lock")[rank]
            .take()
            .ok_or_else(|| Status::already_exists(format!("rank {rank} already holds its command stream")))?;
        let events = self.events.clone();
        Ok(Response::new(Watched { inner: ReceiverStream::new(receiver), rank: rank as u32, events, completed: false }))
    }

    async fn report_step(&self, request: Request<StepReport>) -> Result<Response<Ack>, Status> {
        self.send(Event::Step(request.into_inner()))
    }

    async fn report_eval(&self, request: Request<EvalReport>) -> Result<Response<Ack>, Status> {
        self.send(Event::Eval(request.into_inner()))
    }

    async fn report_saved(&self, request: Request<SavedReport>) -> Result<Response<Ack>, Status> {
        self.send(Event::Saved(request.into_inner()))
    }

    async fn report_failure(&self, request: Request<FailureReport>) -> Result<Response<Ack>, Status> {
        let r = request.into_inner();
        self.send(Event::Failed { rank: r.rank, kind: r.kind(), message: r.message })
    }

    async fn heartbeat(&self, request: Request<HeartbeatRequest>) -> Result<Response<HeartbeatReply>, Status> {
        let r = request.into_inner();
        self.rank(r.rank)?;
        let abort = self.abort.tell(r.rank);
        if !abort {
            self.send(Event::Heartbeat { rank: r.rank, step: r.step })?;
        }
        Ok(Response::new(HeartbeatReply { abort }))
    }
}

/// A rank's command stream that tells the driver when it is dropped before its last command
/// went out (the worker disconnected), sooner than a missing heartbeat would.
pub struct Watched {
    inner: ReceiverStream<Result<Command, Status>>,
    rank: u32,
    events: mpsc::UnboundedSender<Event>,
    completed: bool,
}

impl tokio_stream::Stream for Watched {
    type Item = Result<Command, Status>;

    fn poll_next(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Self::Item>> {
        let next = std::pin::Pin::new(&mut self.inner).poll_next(cx);
        if let std::task::Poll::Ready(None) = next {
            self.completed = true;
        }
        next
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        if !self.completed {
            let _ = self.events.send(Event::Disconnected { rank: self.rank });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerotune_proto::v1::coordinator_client::CoordinatorClient;

    /// Serves a one-rank job on a real loopback socket; returns its URL.
    async fn serve(secret: &str) -> (String, mpsc::UnboundedReceiver<Event>) {
        let (events, rx) = mpsc::unbounded_channel();
        let (_tx, commands) = mpsc::channel(1);
        let service = JobService::new("{}".into(), vec![commands], events, Default::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tonic::transport::Server::builder().add_service(service.into_server(secret.into()));
        tokio::spawn(server.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)));
        (url, rx)
    }

    fn register() -> Request<RegisterRequest> {
        Request::new(RegisterRequest { rank: 0, host: "h".into(), device: "cpu".into(), pid: 1, local_rank: 0 })
    }

    #[tokio::test]
    async fn calls_without_the_job_secret_are_refused() {
        let (url, mut events) = serve("s3cret").await;
        let mut client = CoordinatorClient::connect(url).await.unwrap();
        let refused = client.register(register()).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        let mut wrong = register();
        wrong.metadata_mut().insert(SECRET_HEADER, "guess".parse().unwrap());
        assert_eq!(client.register(wrong).await.unwrap_err().code(), tonic::Code::Unauthenticated);
        assert!(events.try_recv().is_err(), "a refused call reaches nothing");

        let mut right = register();
        right.metadata_mut().insert(SECRET_HEADER, "s3cret".parse().unwrap());
        let reply = client.register(right).await.unwrap().into_inner();
        assert_eq!(reply.world_size, 1);
        assert!(matches!(events.recv().await, Some(Event::Registered { rank: 0, .. })));
    }

    #[tokio::test]
    async fn heartbeats_reach_the_driver_until_the_abort_switch_is_thrown() {
        let (events, mut rx) = mpsc::unbounded_channel();
        let abort = Arc::new(AbortSwitch::default());
        let service = JobService::new("{}".into(), vec![mpsc::channel(1).1, mpsc::channel(1).1], events, abort.clone());
        let beat = |rank| Request::new(HeartbeatRequest { rank, step: 5 });
        assert!(!service.heartbeat(beat(1)).await.unwrap().into_inner().abort);
        assert!(matches!(rx.try_recv(), Ok(Event::Heartbeat { rank: 1, step: 5 })));
        abort.throw();
        let waiting = tokio::spawn({
            let abort = abort.clone();
            async move { abort.wait_told(&[0, 1].into(), std::time::Duration::from_secs(600)).await }
        });
        assert!(service.heartbeat(beat(0)).await.unwrap().into_inner().abort);
        assert!(service.heartbeat(beat(1)).await.unwrap().into_inner().abort);
        waiting.await.unwrap(); // returns once both ranks heard it, long before its limit
        assert!(rx.try_recv().is_err(), "after the abort, beats are no longer news");
        assert_eq!(service.heartbeat(beat(2)).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    }

    #[tokio::test]
    async fn rendezvous_answers_once_every_rank_arrived() {
        let (events, _rx) = mpsc::unbounded_channel();
        let commands = (0..3).map(|_| mpsc::channel(1).1).collect();
        let service = Arc::new(JobService::new("{}".into(), commands, events, Default::default()));
        let calls: Vec<_> = (0..3u32)
            .map(|rank| {
                let service = service.clone();
                tokio::spawn(async move {
                    let nccl_id = if rank == 0 { vec![7; 128] } else { vec![] };
                    let request = RendezvousRequest { rank, ring_address: format!("10.0.0.{rank}:1"), nccl_id };
                    service.rendezvous(Request::new(request)).await.unwrap().into_inner()
                })
            })
            .collect();
        for call in calls {
            let reply = call.await.unwrap();
            assert_eq!(reply.ring_addresses, ["10.0.0.0:1", "10.0.0.1:1", "10.0.0.2:1"]);
            assert_eq!(reply.nccl_id, vec![7; 128], "rank 0's NCCL id goes to everyone");
        }
    }
}
