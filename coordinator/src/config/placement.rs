//! Where the ranks run and how they are started: the hostfile or this machine, narrowed by
//! --include/--exclude/--num_nodes/--num_gpus (or Slurm's environment), the launcher, and the
//! coordinator's TLS identity. An estimate without a hostfile plans --num_nodes alike nodes.

use std::path::Path;

use super::args::{LaunchArgs, LauncherKind};
use super::{Device, Purpose, Tls};
use crate::error::{flag_file_err, CoordinatorError, Result};
use crate::hosts::{self, Node, Placement};
use crate::slurm::{self, SlurmFlags};

/// How workers are started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Launcher {
    Local,
    /// `command host script`: ssh, or any stand-in with the same calling convention.
    Ssh {
        command: Vec<String>,
    },
    /// `srun` inside an allocation; `world_from` says where the world size came from.
    Slurm {
        world_from: String,
    },
    /// Print each rank's command; the user starts them.
    Manual,
}

/// The ranks in global order, and the launcher that starts them.
pub fn placements_and_launcher(args: &LaunchArgs, device: Device, purpose: Purpose) -> Result<(Vec<Placement>, Launcher)> {
    let per_node = ranks_per_node(args, device)?;
    if args.launcher == Some(LauncherKind::Slurm) {
        let env = |key: &str| std::env::var(key).ok();
        let flags = SlurmFlags { num_nodes: args.num_nodes, num_gpus: args.num_gpus, num_workers: args.num_workers };
        let allocation = slurm::slurm_allocation(&env, &flags)?;
        return Ok((allocation.placements, Launcher::Slurm { world_from: allocation.world_from }));
    }
    let nodes = nodes(args, device, purpose, per_node)?;
    let selection = hosts::Selection {
        include: args.include.as_deref(),
        exclude: args.exclude.as_deref(),
        num_nodes: args.num_nodes,
        num_gpus: if args.hostfile.is_some() { per_node } else { None },
    };
    let placements = hosts::placements(&hosts::select(nodes, &selection)?);
    let remote = placements.iter().find(|p| !hosts::is_local(&p.host)).map(|p| p.host.clone());
    Ok((placements, launcher(args, remote)?))
}

/// Ranks per node that --num_gpus or --num_workers ask for, each flag with its device (`cuda:N`
/// names one rank's GPU, not several).
fn ranks_per_node(args: &LaunchArgs, device: Device) -> Result<Option<usize>> {
    let (gpus, workers) = (args.num_gpus, args.num_workers);
    match (gpus, workers) {
        (Some(_), Some(_)) => {
            return Err(CoordinatorError::flags(
                &["--num_gpus", "--num_workers"],
                "pass either --num_gpus (GPU ranks) or --num_workers (CPU ranks), not both",
            ))
        }
        (Some(0), _) | (_, Some(0)) => {
            return Err(CoordinatorError::flags(&["--num_gpus", "--num_workers"], "--num_gpus / --num_workers must be at least 1"))
        }
        (Some(n), None) if device == Device::Cpu => {
            return Err(CoordinatorError::flags(
                &["--num_gpus", "--device"],
                format!("--num_gpus {n} with --device cpu: use --num_workers {n} for CPU ranks"),
            ))
        }
        (None, Some(n)) if device != Device::Cpu => {
            return Err(CoordinatorError::flags(
                &["--num_workers", "--device"],
                format!("--num_workers {n} starts CPU ranks: add --device cpu, or use --num_gpus for GPUs"),
            ))
        }
        _ => {}
    }
    let per_node = gpus.or(workers);
    if let Device::Cuda(Some(index)) = device {
        let several = per_node.is_some() || args.hostfile.is_some() || args.include.is_some() || args.exclude.is_some();
        if several || args.launcher == Some(LauncherKind::Slurm) {
            return Err(CoordinatorError::flags(
                &["--device", "--num_gpus", "--include"],
                format!("--device cuda:{index} runs one rank on GPU {index}: to choose GPUs for several ranks, use --device cuda with --include localhost:{index},..."),
            ));
        }
    }
    Ok(per_node)
}

/// The nodes ranks may run on: the hostfile's, an estimate's planned ones, or this machine.
fn nodes(args: &LaunchArgs, device: Device, purpose: Purpose, per_node: Option<usize>) -> Result<Vec<Node>> {
    Ok(match &args.hostfile {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(flag_file_err("--hostfile", path))?;
            hosts::parse_hostfile(&text, path)?
        }
        // Planned nodes, each with this machine's slots, named for the table only.
        None if purpose == Purpose::Estimate && args.num_nodes.is_some_and(|n| n > 1) => {
            let slots = local_slots(args, device, per_node);
            (0..args.num_nodes.unwrap_or(1)).map(|i| Node { host: format!("node-{i}"), slots: slots.clone() }).collect()
        }
        None if args.num_nodes.is_some_and(|n| n > 1) => {
            return Err(CoordinatorError::flags(
                &["--num_nodes", "--hostfile"],
                "--num_nodes > 1 needs --hostfile (one \"hostname slots=N\" per line)",
            ))
        }
        None => vec![Node { host: "localhost".into(), slots: local_slots(args, device, per_node) }],
    })
}

/// The launcher asked for, or the default: ssh when a rank runs on another host, else local.
fn launcher(args: &LaunchArgs, remote: Option<String>) -> Result<Launcher> {
    Ok(match (args.launcher, remote) {
        (None, Some(_)) | (Some(LauncherKind::Ssh), _) => Launcher::Ssh { command: ssh_command(&args.ssh_command)? },
        (Some(LauncherKind::Local), Some(host)) => {
            return Err(CoordinatorError::flags(
                &["--launcher", "--hostfile"],
                format!("--launcher local cannot start ranks on {host}: use ssh, slurm or manual"),
            ))
        }
        (None | Some(LauncherKind::Local), None) => Launcher::Local,
        (Some(LauncherKind::Slurm), _) => unreachable!("a Slurm launch returned above"),
        (Some(LauncherKind::Manual), _) => Launcher::Manual,
    })
}

/// This machine's slots: the ones asked for, its GPUs (for --include/--exclude), or the one
/// GPU `cuda:N` names.
fn local_slots(args: &LaunchArgs, device: Device, per_node: Option<usize>) -> Vec<usize> {
    if let Device::Cuda(Some(index)) = device {
        return vec![index];
    }
    let visible = (0..64).take_while(|i| Path::new(&format!("/dev/nvidia{i}")).exists()).count();
    let count = match per_node {
        Some(n) => n,
        None if device != Device::Cpu && (args.include.is_some() || args.exclude.is_some()) => visible.max(1),
        None => 1,
    };
    (0..count).collect()
}

fn ssh_command(spec: &str) -> Result<Vec<String>> {
    let words: Vec<String> = spec.split_whitespace().map(String::from).collect();
    if words.is_empty() {
        return Err(CoordinatorError::flag("--ssh_command", "", "is empty"));
    }
    Ok(words)
}

fn read_pem(path: &Path, flag_name: &'static str) -> Result<Vec<u8>> {
    let pem = std::fs::read(path).map_err(flag_file_err(flag_name, path))?;
    if !pem.starts_with(b"-----BEGIN") {
        return Err(CoordinatorError::flag(flag_name, path.display(), "not a PEM file (expected -----BEGIN ...)"));
    }
    Ok(pem)
}

/// The coordinator's certificate and key, and the CA its workers trust.
pub fn tls(args: &LaunchArgs) -> Result<Option<Tls>> {
    match (&args.tls_cert, &args.tls_key) {
        (None, None) if args.tls_ca.is_none() => Ok(None),
        (Some(cert), Some(key)) => {
            let cert_pem = read_pem(cert, "--tls_cert")?;
            let ca = match &args.tls_ca {
                Some(ca) => read_pem(ca, "--tls_ca")?,
                None => cert_pem.clone(),
            };
            Ok(Some(Tls { cert: cert_pem, key: read_pem(key, "--tls_key")?, ca }))
        }
        _ => Err(CoordinatorError::flags(
            &["--tls_cert", "--tls_key", "--tls_ca"],
            "TLS needs both --tls_cert and --tls_key (and optionally --tls_ca)",
        )),
    }
}
