//! Multi-node launching through the real ssh launcher code, with two "hosts" served by a
//! stand-in remote shell that runs the command on this machine (like `ssh host script`), and the
//! manual launcher whose printed commands the test starts itself. Both must train exactly like
//! the local launcher.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{binary, fixtures, kill_rank_1_at_step_3, s, source_dir, stderr, weights_rel_err};
use zerotune_hf::WeightFiles;

/// Flags shared by every run here: 2 ranks' worth of work on the tiny fixture.
fn train_args(out: &Path, cache: &Path) -> Vec<String> {
    let tiny = s(&fixtures().join("tiny"));
    [
        "train",
        "--device",
        "cpu",
        "--cache_dir",
        &s(cache),
        "--model_name_or_path",
        &tiny,
        "--train_file",
        &s(&source_dir()),
        "--output_dir",
        &s(out),
        "--do_train",
        "--per_device_train_batch_size",
        "1",
        "--gradient_accumulation_steps",
        "2",
        "--block_size",
        "32",
        "--learning_rate",
        "2e-3",
        "--max_steps",
        "4",
        "--save_steps",
        "0",
        "--logging_steps",
        "1",
    ]
    .map(String::from)
    .to_vec()
}

fn same_weights(a: &Path, b: &Path) {
    let (x, y) = (WeightFiles::open(a).unwrap(), WeightFiles::open(b).unwrap());
    for name in y.names() {
        assert_eq!(x.read(name).unwrap(), y.read(name).unwrap(), "{name} differs between launchers");
    }
}

fn executable(path: &Path, script: &str) {
    std::fs::write(path, script).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn local_two_ranks(t: &Path) -> PathBuf {
    let out = t.join("local");
    let run = Command::new(binary("coordinator")).args(train_args(&out, &t.join("cache"))).args(["--num_workers", "2"]).output().unwrap();
    assert!(run.status.success(), "{}", stderr(&run));
    out
}

#[test]
fn ssh_launcher_starts_ranks_on_two_hosts_with_their_environment() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let reference = local_two_ranks(t);

    // `fake-ssh HOST SCRIPT`: logs the call, then runs SCRIPT here (stdin, with the secret, passes through).
    let log = t.join("ssh.log");
    let fake = t.join("fake-ssh");
    executable(&fake, &format!("#!/bin/sh\nprintf '%s %s\\n' \"$1\" \"$2\" >> '{}'\nexec sh -c \"$2\"\n", s(&log)));
    let hostfile = t.join("hostfile");
    std::fs::write(&hostfile, "# two machines, one rank each\nnode-a slots=1\nnode-b slots=1\n").unwrap();
    let workdir = t.join("job");
    std::fs::create_dir(&workdir).unwrap();
    std::fs::write(workdir.join(".deepspeed_env"), "ZEROTUNE_MARK=from-deepspeed-env\n").unwrap();

    let out = t.join("ssh");
    let run = Command::new(binary("coordinator"))
        .current_dir(&workdir)
        .args(train_args(&out, &t.join("cache")))
        .args(["--hostfile", &s(&hostfile), "--ssh_command", &s(&fake), "--master_addr", "127.0.0.1", "--master_port", "0"])
        .env("NCCL_DEBUG", "WARN")
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", stderr(&run));
    let calls = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = calls.lines().collect();
    assert_eq!(lines.len(), 2, "one remote shell per rank: {calls}");
    assert!(lines.iter().any(|l| l.starts_with("node-a ") && l.contains("RANK=0")), "{calls}");
    assert!(lines.iter().any(|l| l.starts_with("node-b ") && l.contains("RANK=1")), "{calls}");
    for line in &lines {
        assert!(line.contains("NCCL_DEBUG=WARN") && line.contains("ZEROTUNE_MARK=from-deepspeed-env"), "environment propagated: {line}");
        assert!(!line.contains(&run_secret_hint()), "the secret never appears on a command line");
        assert!(line.contains(&format!("cd {}", s(&workdir))), "same working directory: {line}");
    }
    same_weights(&out, &reference);
}

/// A rank SIGKILLed over ssh is named and its job ends within 2 s of the kill: the coordinator
/// waits for the abort to reach only the ranks still connected, not the killed one (which never
/// heartbeats again), as it did for two heartbeat intervals before.
#[test]
fn a_rank_killed_over_ssh_ends_the_job_within_two_seconds() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let fake = t.join("fake-ssh");
    executable(&fake, "#!/bin/sh\nexec sh -c \"$2\"\n");
    let hostfile = t.join("hostfile");
    std::fs::write(&hostfile, "node-a slots=1\nnode-b slots=1\n").unwrap();
    let mut args = train_args(&t.join("out"), &t.join("cache"));
    let at = args.iter().position(|a| a == "--max_steps").unwrap() + 1;
    args[at] = "400".into();
    let job = Command::new(binary("coordinator"))
        .args(args)
        .args(["--hostfile", &s(&hostfile), "--ssh_command", &s(&fake), "--master_addr", "127.0.0.1", "--master_port", "0"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (code, took, log) = kill_rank_1_at_step_3(job);
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("worker rank 1 (") && log.contains("SIGKILL") && !log.contains("panicked"), "{log}");
    assert!(took < std::time::Duration::from_secs(2), "the job ended {took:?} after the kill:\n{log}");
}

/// `--max_restarts` continues on the hosts still available: rank 1 SIGKILLs itself at step 4 (both
/// ranks acknowledged checkpoint-2 before step 3, which needs them both) and
/// its host stops answering the remote shell from then on (the fault's marker is node-b's "down"
/// file). The restart asks both hosts, drops node-b and resumes from checkpoint-2 on node-a alone
/// with accumulation 4: the same global batches, so the weights of the uninterrupted 2-rank run.
#[test]
fn a_restart_continues_on_the_hosts_still_available() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let with_checkpoints = |out: &Path| {
        let mut args = train_args(out, &t.join("cache"));
        let at = args.iter().position(|a| a == "--save_steps").unwrap();
        args[at + 1] = "2".into();
        args
    };
    let reference = t.join("local");
    let run = Command::new(binary("coordinator")).args(with_checkpoints(&reference)).args(["--num_workers", "2"]).output().unwrap();
    assert!(run.status.success(), "{}", stderr(&run));

    // `fake-ssh HOST SCRIPT` runs SCRIPT here, unless HOST is marked down: then it fails as ssh
    // does when it cannot connect.
    let down = t.join("down");
    std::fs::create_dir(&down).unwrap();
    let fake = t.join("fake-ssh");
    executable(
        &fake,
        &format!(
            "#!/bin/sh
[ -e '{}'/\"$1\" ] && exit 255
exec sh -c \"$2\"
",
            s(&down)
        ),
    );
    let hostfile = t.join("hostfile");
    std::fs::write(&hostfile, "node-a slots=1\nnode-b slots=1\n").unwrap();
    let out = t.join("ssh");
    let run = Command::new(binary("coordinator"))
        .args(with_checkpoints(&out))
        .args(["--hostfile", &s(&hostfile), "--ssh_command", &s(&fake), "--master_addr", "127.0.0.1", "--master_port", "0"])
        .args(["--max_restarts", "1"])
        .env("ZEROTUNE_FAULT", format!("1:4:{}", s(&down.join("node-b"))))
        .output()
        .unwrap();
    let err = stderr(&run);
    assert!(run.status.success() && !err.contains("panicked"), "{err}");
    assert!(err.contains("worker rank 1 (") && err.contains("SIGKILL"), "{err}");
    let shrunk = "host(s) node-b do not answer: continuing on the 1 rank(s) still available, gradient accumulation 2 -> 4 \
                  (the global batch stays 4)";
    assert!(err.contains(shrunk), "{err}");
    assert!(err.contains("restart 1 of 1: resuming from checkpoint-2"), "{err}");
    let rel = weights_rel_err(&out, &reference);
    assert!(rel < 1e-5, "resumed on one host vs the uninterrupted two-rank run: rel {rel:.2e}");
    assert!(weights_rel_err(&out, &fixtures().join("tiny")) > 1e-4, "the weights moved");
}

/// A stand-in `srun` for what the one-node cluster of tests/slurm.rs cannot show, an allocation of
/// two nodes (what the coordinator calls under `--launcher slurm`): logs its flags and runs
/// `--ntasks` copies of its command here with SLURM_PROCID/LOCALID/NODEID set, failing if one
/// does. Signals, a killed task and a resume go through the real Slurm of tests/slurm.rs.
const FAKE_SRUN: &str = r#"#!/bin/bash
echo "$@" >> "$SRUN_LOG"
nodes=1 ntasks=1
while [[ $1 == --* ]]; do
  case $1 in --nodes=*) nodes=${1#*=} ;; --ntasks=*) ntasks=${1#*=} ;; esac
  shift
done
per_node=$((ntasks / nodes)) pids=() status=0
for ((i = 0; i < ntasks; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$((i % per_node)) SLURM_NODEID=$((i / per_node)) "$@" &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"#;

#[test]
fn slurm_launcher_runs_every_rank_through_one_srun() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let reference = local_two_ranks(t);
    let bin = t.join("bin");
    std::fs::create_dir(&bin).unwrap();
    executable(&bin.join("srun"), FAKE_SRUN);
    let log = t.join("srun.log");
    let path = format!("{}:{}", s(&bin), std::env::var("PATH").unwrap());
    // Inside an allocation of two nodes with one task each.
    let out = t.join("slurm");
    let run = Command::new(binary("coordinator"))
        .args(train_args(&out, &t.join("cache")))
        .args(["--launcher", "slurm", "--master_addr", "127.0.0.1", "--master_port", "0"])
        .envs([("PATH", path.as_str()), ("SRUN_LOG", &s(&log)), ("SLURM_JOB_ID", "42")])
        .envs([("SLURM_JOB_NUM_NODES", "2"), ("SLURM_NTASKS", "2"), ("SLURM_TASKS_PER_NODE", "1(x2)")])
        .output()
        .unwrap();
    let err = stderr(&run);
    assert!(run.status.success(), "{err}");
    assert!(err.contains("x world 2 from SLURM_TASKS_PER_NODE=1(x2), block 32"), "{err}");
    let calls = std::fs::read_to_string(&log).unwrap();
    assert_eq!(calls.lines().count(), 1, "one srun for the job: {calls}");
    assert!(calls.starts_with("--nodes=2 --ntasks=2 --kill-on-bad-exit=1 sh -c "), "{calls}");
    assert!(!calls.contains(&run_secret_hint()), "the secret never appears on a command line");
    same_weights(&out, &reference);
}

/// The secret is random per job; a command line could only carry it as the env assignment.
fn run_secret_hint() -> String {
    "ZEROTUNE_JOB_SECRET=".into()
}

#[test]
fn manual_launcher_prints_commands_that_start_the_job() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let reference = local_two_ranks(t);
    let out = t.join("manual");
    let mut coordinator = Command::new(binary("coordinator"))
        .args(train_args(&out, &t.join("cache")))
        .args(["--num_workers", "2", "--launcher", "manual", "--master_addr", "127.0.0.1", "--master_port", "0"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(coordinator.stderr.take().unwrap()).lines().map(Result::unwrap);
    let mut workers = vec![];
    let mut seen = vec![];
    for line in lines.by_ref() {
        seen.push(line.clone());
        if let Some(command) = line.trim_start().strip_prefix("[localhost] ") {
            workers.push(Command::new("sh").args(["-c", command]).stdout(Stdio::null()).spawn().unwrap());
            if workers.len() == 2 {
                break;
            }
        }
    }
    assert_eq!(workers.len(), 2, "two commands printed: {}", seen.join("\n"));
    let rest: Vec<String> = lines.collect();
    assert!(coordinator.wait().unwrap().success(), "{}", rest.join("\n"));
    for mut w in workers {
        assert!(w.wait().unwrap().success());
    }
    same_weights(&out, &reference);
}

#[test]
fn launcher_flag_conflicts_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let hostfile = t.join("hostfile");
    std::fs::write(&hostfile, "node-a slots=2\nnode-b slots=2\n").unwrap();
    let out = t.join("x");
    for (extra, needle) in [
        (vec!["--num_workers", "2", "--num_gpus", "1"], "either --num_gpus"),
        (vec!["--num_gpus", "2"], "--num_gpus 2 with --device cpu"),
        (vec!["--hostfile", &s(&hostfile), "--include", "node-a", "--exclude", "node-b"], "mutually exclusive"),
        (vec!["--hostfile", &s(&hostfile), "--include", "node-c"], "node-c is not in the hostfile"),
        (vec!["--hostfile", &s(&hostfile), "--launcher", "local"], "--launcher local cannot start ranks on node-a"),
        (vec!["--num_nodes", "2"], "--num_nodes > 1 needs --hostfile"),
        (vec!["--launcher", "pdsh"], "invalid value 'pdsh' for '--launcher <LAUNCHER>'"),
    ] {
        let run = Command::new(binary("coordinator")).args(train_args(&out, &t.join("cache"))).args(&extra).output().unwrap();
        let err = stderr(&run);
        assert!(!run.status.success() && err.contains(needle), "{extra:?}: {err}");
        assert!(!out.exists(), "{extra:?}: nothing written");
    }
}

#[test]
fn tls_between_coordinator_and_workers() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let reference = local_two_ranks(t);
    let key = rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    let (cert, pem_key) = (t.join("cert.pem"), t.join("key.pem"));
    std::fs::write(&cert, key.cert.pem()).unwrap();
    std::fs::write(&pem_key, key.signing_key.serialize_pem()).unwrap();
    let tls = ["--tls_cert", &s(&cert), "--tls_key", &s(&pem_key)];

    let out = t.join("tls");
    let run = Command::new(binary("coordinator"))
        .args(train_args(&out, &t.join("cache")))
        .args(["--num_workers", "2"])
        .args(tls)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", stderr(&run));
    same_weights(&out, &reference);

    // A worker that speaks plain HTTP/2 to the TLS coordinator gets nowhere.
    let mut coordinator = Command::new(binary("coordinator"))
        .args(train_args(&t.join("tls-manual"), &t.join("cache")))
        .args(["--num_workers", "1", "--launcher", "manual", "--master_addr", "127.0.0.1", "--master_port", "0"])
        .args(tls)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let url = BufReader::new(coordinator.stderr.take().unwrap())
        .lines()
        .map(Result::unwrap)
        .find_map(|l| l.split("they must reach ").nth(1).map(|u| u.trim_end_matches("):").to_string()))
        .unwrap();
    assert!(url.starts_with("https://"), "{url}");
    let plain = Command::new(binary("worker"))
        .args(["run", "--coordinator", &url.replace("https://", "http://"), "--rank", "0", "--device", "cpu"])
        .env("ZEROTUNE_JOB_SECRET", "irrelevant")
        .output()
        .unwrap();
    coordinator.kill().unwrap();
    coordinator.wait().unwrap();
    assert!(!plain.status.success(), "a plaintext worker must not get in");
    assert!(!stderr(&plain).contains("panicked"), "{}", stderr(&plain));

    // Half a TLS configuration is refused up front.
    let half = Command::new(binary("coordinator"))
        .args(train_args(&t.join("half"), &t.join("cache")))
        .args(["--tls_cert", &s(&cert)])
        .output()
        .unwrap();
    assert!(!half.status.success() && stderr(&half).contains("needs both --tls_cert and --tls_key"), "{}", stderr(&half));
}

/// Two jobs into one `--output_dir`: the second is refused before it writes anything, naming the
/// first; once the first is killed, the next job takes its lock over and says so.
#[test]
fn a_second_job_on_the_same_output_dir_is_refused_naming_the_first() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let out = t.join("shared");
    let job = || {
        let mut command = Command::new(binary("coordinator"));
        command.args(train_args(&out, &t.join("cache"))).args(["--num_workers", "1", "--overwrite_output_dir"]);
        command
    };
    // A manual launch holds the dir while it waits for its workers: it has printed their command.
    let held = |command: &mut Command| {
        let manual = ["--launcher", "manual", "--master_addr", "127.0.0.1", "--master_port", "0"];
        let mut child = KillOnDrop(command.args(manual).stderr(Stdio::piped()).spawn().unwrap());
        let mut seen = vec![];
        for line in BufReader::new(child.0.stderr.take().unwrap()).lines().map(Result::unwrap) {
            let printed = line.trim_start().starts_with("[localhost] ");
            seen.push(line);
            if printed {
                return (child, seen);
            }
        }
        panic!("no worker command printed:\n{}", seen.join("\n"));
    };
    let (mut first, _) = held(&mut job());
    let run_json = std::fs::read_to_string(out.join("run.json")).unwrap();

    let second = job().output().unwrap();
    let err = stderr(&second);
    assert!(!second.status.success(), "{err}");
    assert!(err.contains("another job is using it") && err.contains(&format!("pid {}", first.0.id())), "{err}");
    assert_eq!(std::fs::read_to_string(out.join("run.json")).unwrap(), run_json, "the first job's files are untouched");

    let pid = first.0.id();
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    let (_third, seen) = held(&mut job());
    assert!(seen.iter().any(|l| l.contains("taking over the lock left by") && l.contains(&format!("pid {pid}"))), "{}", seen.join("\n"));
}

/// A coordinator that waits for workers nobody starts: killed when the test ends, passed or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
