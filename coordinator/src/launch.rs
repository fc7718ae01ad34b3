//! Starting workers like the `deepspeed` launcher: one process per rank with RANK, LOCAL_RANK,
//! WORLD_SIZE and CUDA_VISIBLE_DEVICES (its one GPU), locally, over ssh (one connection per
//! rank, NCCL_*/UCX_* and `.deepspeed_env` propagated, the job secret on stdin), under Slurm
//! (`srun`), or by hand (the commands are printed). Each process is watched: its exit reaches the
//! driver as an event, and it is killed when the coordinator stops.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::config::{Device, DeviceSpec, Launcher};
use crate::error::{io_err, os_err, CoordinatorError, Result};
use crate::events::{Event, ExitStatus};
use crate::hosts::{self, Placement};

/// Everything needed to start the ranks of one attempt.
pub struct LaunchSpec<'a> {
    pub launcher: &'a Launcher,
    pub placements: &'a [Placement],
    pub device: Device,
    pub worker: &'a Path,
    /// Extra environment for every worker (`.deepspeed_env`, NCCL_*, ...).
    pub env: &'a [(String, String)],
}

/// Whether stopping the launcher's processes ends every rank: not over ssh (a remote rank may
/// outlive its ssh) nor for ranks the user started, which hear the abort in a heartbeat instead.
pub fn kills_its_workers(launcher: &Launcher) -> bool {
    !matches!(launcher, Launcher::Ssh { .. } | Launcher::Manual)
}

/// Starts every rank; each returned task ends once its process is gone.
pub fn start(
    spec: &LaunchSpec,
    url: &str,
    secret: &str,
    events: &mpsc::UnboundedSender<Event>,
) -> Result<Vec<tokio::task::JoinHandle<()>>> {
    let world = spec.placements.len();
    match spec.launcher {
        Launcher::Local => {
            // GPU workers find NCCL through one shim directory, made once per launch.
            let library_path = (spec.device != Device::Cpu)
                .then(nccl_shim)
                .flatten()
                .map(|dir| format!("{}:{}", dir.display(), std::env::var("LD_LIBRARY_PATH").unwrap_or_default()));
            spec.placements
                .iter()
                .map(|p| {
                    let mut command = tokio::process::Command::new(spec.worker);
                    command.envs(rank_env(p, world, spec.device)).envs(spec.env.iter().cloned()).env(zerotune_proto::SECRET_ENV, secret);
                    if let Some(path) = &library_path {
                        command.env("LD_LIBRARY_PATH", path);
                    }
                    command.args(worker_args(url, p.rank, spec.device));
                    watch(command, Some(p.rank as u32), None, events)
                })
                .collect()
        }
        Launcher::Ssh { command: ssh } => {
            let cwd = std::env::current_dir().map_err(os_err("current directory"))?;
            spec.placements
                .iter()
                .map(|p| {
                    let mut command = tokio::process::Command::new(&ssh[0]);
                    let script = remote_script(p, world, spec.device, url, spec.worker, spec.env, &cwd);
                    command.args(&ssh[1..]).arg(&p.host).arg(script);
                    watch(command, Some(p.rank as u32), Some(format!("{secret}\n")), events)
                })
                .collect()
        }
        Launcher::Slurm { .. } => {
            let argv = srun_argv(spec, url);
            let mut command = tokio::process::Command::new(&argv[0]);
            command.args(&argv[1..]).envs(spec.env.iter().cloned()).env(zerotune_proto::SECRET_ENV, secret);
            Ok(vec![watch(command, None, None, events)?])
        }
        Launcher::Manual => {
            // Instructions for the user, with the job secret in them: the terminal, never the log.
            eprintln!("start these {world} worker(s), each on its host (they must reach {url}):");
            for p in spec.placements {
                let mut env: Vec<(String, String)> = rank_env(p, world, spec.device);
                env.extend(spec.env.iter().cloned());
                env.push((zerotune_proto::SECRET_ENV.into(), secret.into()));
                let vars: Vec<String> = env.iter().map(|(k, v)| format!("{k}={}", quote(v))).collect();
                let args: Vec<String> = worker_args(url, p.rank, spec.device).iter().map(|a| quote(a)).collect();
                eprintln!("  [{}] {} {} {}", p.host, vars.join(" "), quote(&spec.worker.to_string_lossy()), args.join(" "));
            }
            Ok(vec![])
        }
    }
}

/// How long a host may take to run `true` through the remote shell before it counts as gone.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The hosts that no longer answer: each host of an ssh launch is asked to run `true` through the
/// remote shell, all at once. Other launchers cannot tell (local ranks, Slurm's allocation, ranks
/// started by hand) and report none.
pub async fn unreachable_hosts(launcher: &Launcher, placements: &[Placement]) -> BTreeSet<String> {
    let Launcher::Ssh { command: ssh } = launcher else { return BTreeSet::new() };
    let mut probes = tokio::task::JoinSet::new();
    for host in placements.iter().map(|p| p.host.clone()).collect::<BTreeSet<_>>() {
        let mut probe = tokio::process::Command::new(&ssh[0]);
        probe.args(&ssh[1..]).arg(&host).arg("true").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).kill_on_drop(true);
        probes.spawn(async move {
            let answered = match probe.spawn() {
                Ok(mut child) => matches!(tokio::time::timeout(PROBE_TIMEOUT, child.wait()).await, Ok(Ok(status)) if status.success()),
                Err(_) => false,
            };
            (host, answered)
        });
    }
    let mut lost = BTreeSet::new();
    while let Some(probed) = probes.join_next().await {
        if let Ok((host, false)) = probed {
            lost.insert(host);
        }
    }
    lost
}

/// DeepSpeed's per-process environment.
fn rank_env(p: &Placement, world: usize, device: Device) -> Vec<(String, String)> {
    let mut env = vec![
        ("RANK".to_string(), p.rank.to_string()),
        ("LOCAL_RANK".to_string(), p.local_rank.to_string()),
        ("WORLD_SIZE".to_string(), world.to_string()),
    ];
    if device != Device::Cpu {
        // One process per GPU: it sees only its own device.
        env.push(("CUDA_VISIBLE_DEVICES".to_string(), p.slot.to_string()));
    }
    env
}

fn worker_args(url: &str, rank: usize, device: Device) -> Vec<String> {
    // Each GPU rank sees its one GPU (CUDA_VISIBLE_DEVICES) as the first.
    let device = if device == Device::Cpu { DeviceSpec::Cpu } else { DeviceSpec::Cuda(Some(0)) };
    ["run", "--coordinator", url, "--rank", &rank.to_string(), "--device", &device.to_string()].map(String::from).to_vec()
}

/// The shell script one ssh connection runs: same directory and worker path as here, the secret
/// read from stdin (never on a command line), the rank's environment, then the worker.
pub fn remote_script(
    p: &Placement,
    world: usize,
    device: Device,
    url: &str,
    worker: &Path,
    env: &[(String, String)],
    cwd: &Path,
) -> String {
    let mut vars: Vec<String> = rank_env(p, world, device).iter().chain(env).map(|(k, v)| format!("{k}={}", quote(v))).collect();
    vars.sort();
    let args: Vec<String> = worker_args(url, p.rank, device).iter().map(|a| quote(a)).collect();
    format!(
        "cd {} && IFS= read -r {secret} && export {secret} && exec env {} {} {}",
        quote(&cwd.to_string_lossy()),
        vars.join(" "),
        quote(&worker.to_string_lossy()),
        args.join(" "),
        secret = zerotune_proto::SECRET_ENV,
    )
}

/// `srun` for the whole job: Slurm starts one task per rank; each reads its rank and local GPU
/// from SLURM_PROCID / SLURM_LOCALID and, as under the other launchers, sees that one GPU alone
/// (`SLURM_ONE_GPU`). Tasks ignore SIGINT and SIGTERM: at a time limit Slurm signals every
/// process of the job, and the coordinator turns its own signal into a checkpoint and a stop
/// that the workers must live to carry out (SIGKILL still ends them).
pub fn srun_argv(spec: &LaunchSpec, url: &str) -> Vec<String> {
    let world = spec.placements.len();
    let nodes = spec.placements.iter().map(|p| &p.host).collect::<std::collections::BTreeSet<_>>().len();
    let (gpu, device) = if spec.device == Device::Cpu { ("", "cpu") } else { (SLURM_ONE_GPU, "cuda:0") };
    let script = format!(
        "trap '' INT TERM; {gpu}RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE={world} exec {} run --coordinator {} --rank $SLURM_PROCID --device {device}",
        quote(&spec.worker.to_string_lossy()),
        quote(url)
    );
    ["srun", &format!("--nodes={nodes}"), &format!("--ntasks={world}"), "--kill-on-bad-exit=1", "sh", "-c", &script]
        .map(String::from)
        .to_vec()
}

/// Leaves a Slurm task's CUDA_VISIBLE_DEVICES naming its one GPU: kept when Slurm bound one GPU to
/// the task, the SLURM_LOCALID-th of the list when the task sees the node's GPUs, SLURM_LOCALID
/// when it is unset; a task left without one stops, saying so. NCCL and the worker then use
/// `cuda:0`, as with the other launchers.
const SLURM_ONE_GPU: &str = "gpus=${CUDA_VISIBLE_DEVICES-$SLURM_LOCALID}; case $gpus in *,*) \
    gpus=$(printf '%s' \"$gpus\" | cut -d, -f$((SLURM_LOCALID + 1))) ;; esac; [ -n \"$gpus\" ] || { echo \
    \"rank $SLURM_PROCID: no GPU for local task $SLURM_LOCALID in CUDA_VISIBLE_DEVICES='${CUDA_VISIBLE_DEVICES-}' \
    (give each task a GPU: srun --gpus-per-task=1, or as many GPUs per node as tasks)\" >&2; exit 1; }; \
    export CUDA_VISIBLE_DEVICES=$gpus; ";

/// Single-quotes `s` for a POSIX shell.
fn quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:=,@".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Spawns `command` (stdin carrying `input`, if any) and reports its exit as `Event::Exited`;
/// kills it when the driver stops listening.
fn watch(
    mut command: tokio::process::Command,
    rank: Option<u32>,
    input: Option<String>,
    events: &mpsc::UnboundedSender<Event>,
) -> Result<tokio::task::JoinHandle<()>> {
    // A process group of its own: a terminal's Ctrl-C reaches the coordinator, which stops the
    // workers after a checkpoint, instead of killing them all at once.
    command.kill_on_drop(true).process_group(0).stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() });
    let program = command.as_std().get_program().to_string_lossy().into_owned();
    let mut child = command.spawn().map_err(|source| CoordinatorError::Spawn { program, source })?;
    let stdin = child.stdin.take();
    let events = events.clone();
    Ok(tokio::spawn(async move {
        if let (Some(mut stdin), Some(input)) = (stdin, input) {
            let _ = stdin.write_all(input.as_bytes()).await;
        }
        let status = tokio::select! {
            status = child.wait() => status.map_or(ExitStatus::Code(-1), ExitStatus::from),
            _ = events.closed() => {
                let _ = child.kill().await;
                return;
            }
        };
        let _ = events.send(Event::Exited { rank, status });
    }))
}

/// Environment every worker gets besides its rank's: NCCL_* and UCX_* from here, then the
/// `.deepspeed_env` file of the current directory or the home directory (as DeepSpeed reads it).
pub fn propagated_env() -> Result<Vec<(String, String)>> {
    let mut env: Vec<(String, String)> =
        std::env::vars().filter(|(k, _)| k.starts_with("NCCL_") || k.starts_with("UCX_") || k == "ZEROTUNE_NCCL" || k == "RUST_LOG").collect();
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let files = [Some(PathBuf::from(".deepspeed_env")), home.map(|h| h.join(".deepspeed_env"))];
    if let Some(path) = files.into_iter().flatten().find(|p| p.is_file()) {
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        env.extend(hosts::parse_env_file(&text, &path)?);
    }
    Ok(env)
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
    let mut f = std::fs::File::open("/dev/urandom").map_err(os_err("cannot read /dev/urandom"))?;
    f.read_exact(&mut buf).map_err(os_err("cannot read /dev/urandom"))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placement(rank: usize, host: &str, slot: usize) -> Placement {
        Placement { rank, host: host.into(), local_rank: slot, slot }
    }

    #[test]
    fn remote_script_reads_the_secret_from_stdin_and_sets_the_rank() {
        let env = [("NCCL_DEBUG".to_string(), "INFO".to_string()), ("X".to_string(), "a b'c".to_string())];
        let script = remote_script(
            &placement(3, "n1", 1),
            4,
            Device::Cuda(None),
            "http://10.0.0.1:29500",
            Path::new("/opt/zt/worker"),
            &env,
            Path::new("/w d"),
        );
        assert_eq!(
            script,
            "cd '/w d' && IFS= read -r ZEROTUNE_JOB_SECRET && export ZEROTUNE_JOB_SECRET && exec env CUDA_VISIBLE_DEVICES=1 \
             LOCAL_RANK=1 NCCL_DEBUG=INFO RANK=3 WORLD_SIZE=4 X='a b'\\''c' /opt/zt/worker run --coordinator http://10.0.0.1:29500 \
             --rank 3 --device cuda:0"
        );
    }

    #[test]
    fn srun_runs_one_task_per_rank() {
        let placements = [placement(0, "a", 0), placement(1, "a", 1), placement(2, "b", 0), placement(3, "b", 1)];
        let spec = LaunchSpec {
            launcher: &Launcher::Slurm { world_from: "SLURM_NTASKS=4".into() },
            placements: &placements,
            device: Device::Cuda(None),
            worker: Path::new("/w"),
            env: &[],
        };
        let argv = srun_argv(&spec, "http://h:1");
        assert_eq!(argv[..4], ["srun", "--nodes=2", "--ntasks=4", "--kill-on-bad-exit=1"]);
        assert!(argv[6].ends_with("--rank $SLURM_PROCID --device cuda:0") && argv[6].contains("WORLD_SIZE=4"));
        assert!(argv[6].starts_with("trap '' INT TERM; "), "tasks outlive Slurm's SIGTERM to checkpoint");
        assert!(argv[6].contains(SLURM_ONE_GPU));
        let cpu = srun_argv(&LaunchSpec { device: Device::Cpu, ..spec }, "http://h:1");
        assert!(cpu[6].ends_with("--device cpu") && !cpu[6].contains("CUDA_VISIBLE_DEVICES"));
    }

    /// The task's GPU, run through a real shell: (CUDA_VISIBLE_DEVICES as Slurm left it,
    /// SLURM_LOCALID) -> what the worker sees, or the task's refusal.
    #[test]
    fn a_slurm_task_sees_its_one_gpu() {
        let task = |visible: Option<&str>, local: &str| {
            let mut sh = std::process::Command::new("sh");
            sh.arg("-c")
                .arg(format!("{SLURM_ONE_GPU}echo \"$CUDA_VISIBLE_DEVICES\""))
                .envs([("SLURM_LOCALID", local), ("SLURM_PROCID", "5")]);
            match visible {
                Some(v) => sh.env("CUDA_VISIBLE_DEVICES", v),
                None => sh.env_remove("CUDA_VISIBLE_DEVICES"),
            };
            let out = {
                let _forking = crate::forking();
                sh.output().unwrap()
            };
            (out.status.code(), String::from_utf8_lossy(&out.stdout).trim().to_string(), String::from_utf8_lossy(&out.stderr).into_owned())
        };
        let uuids = "GPU-a1b2,GPU-c3d4";
        for (visible, local, want) in [
            (None, "2", "2"),
            (Some("0,1,2,3"), "2", "2"),
            (Some("4,5,6,7"), "1", "5"),
            (Some("3"), "1", "3"),
            (Some(uuids), "1", "GPU-c3d4"),
        ] {
            assert_eq!(task(visible, local), (Some(0), want.to_string(), String::new()), "{visible:?} local {local}");
        }
        for (visible, local) in [(Some(""), "0"), (Some("0,1"), "3")] {
            let (code, seen, err) = task(visible, local);
            assert_eq!((code, seen.as_str()), (Some(1), ""), "{visible:?} local {local}: {err}");
            assert!(
                err.starts_with(&format!("rank 5: no GPU for local task {local} in CUDA_VISIBLE_DEVICES='{}'", visible.unwrap())),
                "{err}"
            );
        }
    }
}
