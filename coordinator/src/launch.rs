//! Starting workers. Today: local processes, one per rank, with DeepSpeed's per-process
//! environment (RANK, LOCAL_RANK, WORLD_SIZE) and the job secret; each is killed if the
//! coordinator goes away, and its exit is reported to the driver as an event.

use std::path::{Path, PathBuf};

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
) -> Result<tokio::task::JoinHandle<()>> {
    let mut command = tokio::process::Command::new(worker);
    command
        .env(zerotune_proto::SECRET_ENV, secret)
        .env("RANK", rank.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .kill_on_drop(true);
    let device = if device == "cpu" {
        "cpu".to_string()
    } else {
        // One process per GPU, like the deepspeed launcher: it sees only its own device.
        command.env("CUDA_VISIBLE_DEVICES", rank.to_string());
        if let Some(dir) = nccl_shim() {
            let path = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
            command.env("LD_LIBRARY_PATH", format!("{}:{path}", dir.display()));
        }
        "cuda:0".to_string()
    };
    command.args(["run", "--coordinator", coordinator_url, "--rank", &rank.to_string(), "--device", &device]);
    let mut child = command.spawn().map_err(|e| CoordinatorError::Flag(format!("cannot start worker {}: {e}", worker.display())))?;
    let watcher = tokio::spawn(async move {
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
    Ok(watcher)
}

/// A directory holding `libnccl.so` -> the pip wheel's `libnccl.so.2` (the only name it ships,
/// and one cudarc does not look for), found from $ZEROTUNE_NCCL or next to libtorch.
fn nccl_shim() -> Option<PathBuf> {
    let candidates = std::env::var_os("ZEROTUNE_NCCL").map(PathBuf::from).into_iter().chain(
        std::env::var("LD_LIBRARY_PATH")
            .unwrap_or_default()
            .split(':')
            .filter(|d| !d.is_empty())
            .flat_map(|d| [Path::new(d).join("libnccl.so.2"), Path::new(d).join("../../nvidia/nccl/lib/libnccl.so.2")])
            .collect::<Vec<_>>(),
    );
    let library = candidates.into_iter().find(|p| p.is_file())?.canonicalize().ok()?;
    let dir = std::env::temp_dir().join(format!("zerotune-nccl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).ok()?;
    let link = dir.join("libnccl.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&library, &link).ok()?;
    Some(dir)
}

/// A random per-job secret (128 bits, hex).
pub fn job_secret() -> Result<String> {
    let mut buf = [0u8; 16];
    use std::io::Read;
    let mut f = std::fs::File::open("/dev/urandom").map_err(|e| CoordinatorError::Flag(format!("cannot read /dev/urandom: {e}")))?;
    f.read_exact(&mut buf).map_err(|e| CoordinatorError::Flag(format!("cannot read /dev/urandom: {e}")))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}
