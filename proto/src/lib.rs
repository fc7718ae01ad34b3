//! The coordinator <-> worker wire: generated gRPC code (`zerotune/v1/coordinator.proto`), the
//! job plan the coordinator hands each worker, the `--device` grammar both parse (`device.rs`),
//! the GPU precision rule both apply (`precision.rs`), the checkpoint's JSON files both sides read, the run directory's records
//! (`records.rs`), and the metadata key that carries the job secret.

pub mod device;
pub mod plan;
pub mod precision;
pub mod records;
pub mod state;

pub mod v1 {
    tonic::include_proto!("zerotune.v1");
}

/// gRPC metadata key holding the per-job secret; calls without it are refused.
pub const SECRET_HEADER: &str = "x-zerotune-secret";
/// Environment variable through which the launcher hands the secret to a worker.
pub const SECRET_ENV: &str = "ZEROTUNE_JOB_SECRET";
/// Environment variable with the CA certificate (PEM) a worker verifies an `https://`
/// coordinator with.
pub const TLS_CA_ENV: &str = "ZEROTUNE_TLS_CA";

/// HTTP/2 ping interval on both ends of the gRPC connection: a peer whose host vanished without
/// closing its connection is noticed at the transport level, beside the heartbeats.
pub const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(10);
/// How long a ping may go unanswered before the connection counts as dropped.
pub const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// This machine's name (`/proc/sys/kernel/hostname`), or `localhost`: what a worker registers
/// with and the coordinator's default rendezvous address.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "localhost".into())
}
