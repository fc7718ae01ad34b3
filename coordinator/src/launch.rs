//! Starting workers. Today: local processes, one per rank, with DeepSpeed's per-process
//! environment (RANK, LOCAL_RANK, WORLD_SIZE) and the job secret; each is killed if the
//! coordinator goes away, and its exit is reported to the driver as an event.

use std::path::Path;

use tokio::sync::mpsc;

use crate::error::{CoordinatorError, Result};
use crate::service::Event;

/// One local worker process for `rank`; its exit status arrives later as `Event::Exited`.
pub fn spawn_local(
    worker: &Path,
    coordinator_url: &str,
    rank: u32,
    world: u32,
    device: &str,
    secret: &str,
    events: mpsc::UnboundedSender<Event>,
) -> Result<u32> {
    let mut child = tokio::process::Command::new(worker)
        .args(["run", "--coordinator", coordinator_url, "--rank", &rank.to_string(), "--device", device])
        .env(zerotune_proto::SECRET_ENV, secret)
        .env("RANK", rank.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| CoordinatorError::Flag(format!("cannot start worker {}: {e}", worker.display())))?;
    let pid = child.id().unwrap_or(0);
    tokio::spawn(async move {
        let status = tokio::select! {
            status = child.wait() => status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
            _ = events.closed() => {
                let _ = child.kill().await;
                return;
            }
        };
        let success = status == "exit status: 0";
        let _ = events.send(Event::Exited { rank, success, status });
    });
    Ok(pid)
}

/// A random per-job secret (128 bits, hex).
pub fn job_secret() -> Result<String> {
    let mut buf = [0u8; 16];
    use std::io::Read;
    let mut f = std::fs::File::open("/dev/urandom").map_err(|e| CoordinatorError::Flag(format!("cannot read /dev/urandom: {e}")))?;
    f.read_exact(&mut buf).map_err(|e| CoordinatorError::Flag(format!("cannot read /dev/urandom: {e}")))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}
