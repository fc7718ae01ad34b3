//! The coordinator <-> worker wire: generated gRPC code (`zerotune/v1/coordinator.proto`), the
//! job plan the coordinator hands each worker, and the metadata key that carries the job secret.

pub mod plan;

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
