//! `--launcher slurm` on a real one-node Slurm cluster (slurmctld, slurmd and munge on loopback,
//! started by the test: common/slurm.rs): allocations sized with `-n` and `--ntasks-per-node`
//! train on every task they hold, as the local launcher does; a SIGKILLed task ends the job
//! within 2 s; `scancel --signal=TERM --full` (what a time limit sends) checkpoints and stops a
//! batch job, and a new allocation resumes it to the weights of the uninterrupted run. Without
//! Slurm installed these tests fail, saying what to install.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use common::slurm::Cluster;
use common::{binary, fixtures, kill_rank_1_at_step_3, s, source_dir, stderr, weights_rel_err};
use zerotune_hf::WeightFiles;

/// A killed task ends the job within this (issue 29; over ssh it takes under 0.5 s).
const KILL_BOUND: Duration = Duration::from_secs(2);

/// The cluster, started once for this binary and held by one test at a time: its 2 CPUs take one
/// job of 2 tasks, and the kill is timed with nothing else running. The cluster stops when this
/// process has gone (scripts/slurm_cluster.sh --owner).
fn cluster() -> MutexGuard<'static, Cluster> {
    static CLUSTER: OnceLock<Mutex<Cluster>> = OnceLock::new();
    CLUSTER.get_or_init(|| Mutex::new(Cluster::start())).lock().unwrap_or_else(PoisonError::into_inner)
}

/// `coordinator train` flags for `steps` steps of 2 ranks' worth of work on the tiny fixture.
fn train_args(out: &Path, cache: &Path, steps: u32, save_steps: u32) -> Vec<String> {
    let (tiny, data) = (s(&fixtures().join("tiny")), s(&source_dir()));
    let flags = [
        ("--device", "cpu"),
        ("--cache_dir", &s(cache)),
        ("--model_name_or_path", &tiny),
        ("--train_file", &data),
        ("--output_dir", &s(out)),
        ("--per_device_train_batch_size", "1"),
        ("--gradient_accumulation_steps", "2"),
        ("--block_size", "32"),
        ("--learning_rate", "2e-3"),
        ("--max_steps", &steps.to_string()),
        ("--save_steps", &save_steps.to_string()),
        ("--logging_steps", "1"),
    ];
    let mut args = vec!["train".to_string(), "--do_train".into()];
    args.extend(flags.iter().flat_map(|(flag, value)| [flag.to_string(), value.to_string()]));
    args
}

/// The same run on two local CPU ranks: the reference every Slurm run must equal.
fn local_two_ranks(out: &Path, cache: &Path, steps: u32) {
    let run = Command::new(binary("coordinator")).args(train_args(out, cache, steps, 0)).args(["--num_workers", "2"]).output().unwrap();
    assert!(run.status.success(), "{}", stderr(&run));
}

/// `salloc ALLOCATION coordinator train ARGS --launcher slurm` on `cluster`.
fn salloc(cluster: &Cluster, allocation: &[&str], args: &[String]) -> Command {
    let mut command = Command::new("salloc");
    command.envs(cluster.env()).args(allocation).arg(binary("coordinator")).args(args);
    command.args(["--launcher", "slurm", "--master_addr", "127.0.0.1", "--master_port", "0"]);
    command
}

fn same_weights(a: &Path, b: &Path) {
    let (x, y) = (WeightFiles::open(a).unwrap(), WeightFiles::open(b).unwrap());
    for name in y.names() {
        assert_eq!(x.read(name).unwrap(), y.read(name).unwrap(), "{name} differs from the local run");
    }
}

/// `salloc -N1 -n2` (Slurm sets SLURM_NTASKS and SLURM_TASKS_PER_NODE, no SLURM_NTASKS_PER_NODE)
/// and `salloc -N1 --ntasks-per-node=2` both train on 2 ranks, say so and where it came from, and
/// end with the local two-rank run's weights; a flag that disagrees is refused naming both.
#[test]
fn salloc_n2_and_ntasks_per_node_2_train_on_both_tasks() {
    let tmp = tempfile::tempdir().unwrap();
    let (t, cache) = (tmp.path(), tmp.path().join("cache"));
    let reference = t.join("local");
    local_two_ranks(&reference, &cache, 4);
    let cluster = cluster();
    for (name, allocation) in [("n2", ["-N1", "-n2"]), ("per-node", ["-N1", "--ntasks-per-node=2"])] {
        let out = t.join(name);
        let run = salloc(&cluster, &allocation, &train_args(&out, &cache, 4, 0)).output().unwrap();
        let err = stderr(&run);
        assert!(run.status.success(), "salloc {allocation:?}:\n{err}\n{}", cluster.logs());
        assert!(err.contains("x world 2 from SLURM_TASKS_PER_NODE=2, block 32"), "{err}");
        assert!(err.contains("rank 0 joined: ") && err.contains("rank 1 joined: "), "{err}");
        same_weights(&out, &reference);
    }
    let out = t.join("disagrees");
    let run = salloc(&cluster, &["-N1", "-n2"], &train_args(&out, &cache, 4, 0)).args(["--num_workers", "1"]).output().unwrap();
    let err = stderr(&run);
    assert!(!run.status.success() && !err.contains("panicked"), "{err}");
    assert!(err.contains("--num_workers 1 but the allocation has 2 tasks per node (SLURM_TASKS_PER_NODE=2)"), "{err}");
    assert!(!out.exists(), "refused before anything is written");
}

/// A SIGKILLed task is named and its job ends within [`KILL_BOUND`] of the kill: the coordinator
/// acts on the closed connection, not on srun's teardown of the step.
#[test]
fn a_killed_task_is_named_and_ends_the_job_within_two_seconds() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let cluster = cluster();
    let job =
        salloc(&cluster, &["-N1", "-n2"], &train_args(&t.join("out"), &t.join("cache"), 400, 0)).stderr(Stdio::piped()).spawn().unwrap();
    let (code, took, log) = kill_rank_1_at_step_3(job);
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("worker rank 1 (") && !log.contains("panicked"), "{log}");
    assert!(took < KILL_BOUND, "the job ended {took:?} after the kill (bound {KILL_BOUND:?}):\n{log}");
    eprintln!("kill to exit under salloc -n2: {took:?}");
}

/// Waits (60 s at most) until `log` has a line starting with `prefix`: a batch job's output is a
/// file, not a pipe.
fn wait_for_line(log: &Path, prefix: &str, cluster: &Cluster) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(log).unwrap_or_default().lines().any(|l| l.starts_with(prefix)) {
        assert!(Instant::now() < deadline, "no {prefix:?} in {} after 60 s:\n{}", log.display(), cluster.logs());
        std::thread::sleep(Duration::from_millis(50)); // polling: the job writes it, not our child
    }
}

/// The state and exit code `scontrol` reports for batch job `id` once it has left the queue
/// (60 s at most).
fn finished(cluster: &Cluster, id: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let show = Command::new("scontrol").envs(cluster.env()).args(["show", "job", id]).output().unwrap();
        let text = String::from_utf8_lossy(&show.stdout).into_owned();
        if !["JobState=RUNNING", "JobState=PENDING", "JobState=COMPLETING"].iter().any(|s| text.contains(s)) {
            return text;
        }
        assert!(Instant::now() < deadline, "job {id} still runs after 60 s:\n{text}");
        std::thread::sleep(Duration::from_millis(100)); // polling: slurmctld's state
    }
}

/// `sbatch -n2` runs the job; `scancel --signal=TERM --full` (what a time limit sends to every
/// process of the job) makes it save a checkpoint and stop with 143; a new allocation with
/// `--resume_from_checkpoint latest` finishes it, to the weights of the uninterrupted run.
#[test]
fn scancel_term_checkpoints_and_stops_and_a_new_allocation_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let (t, cache) = (tmp.path(), tmp.path().join("cache"));
    let steps = 30;
    let reference = t.join("local");
    local_two_ranks(&reference, &cache, steps);
    let cluster = cluster();
    let out = t.join("batch");
    let log = t.join("batch.log");
    let script: Vec<String> = [binary("coordinator")].iter().map(|p| s(p)).chain(train_args(&out, &cache, steps, 0)).collect();
    let script = format!("exec {} --launcher slurm --master_addr 127.0.0.1 --master_port 0", script.join(" "));
    let submit = Command::new("sbatch")
        .envs(cluster.env())
        .args(["--parsable", "-N1", "-n2", "--output", &s(&log), "--chdir", &s(t), "--wrap", &script])
        .output()
        .unwrap();
    assert!(submit.status.success(), "{}\n{}", stderr(&submit), cluster.logs());
    let id = String::from_utf8_lossy(&submit.stdout).trim().to_string();
    wait_for_line(&log, "step 2/", &cluster);
    let cancel = Command::new("scancel").envs(cluster.env()).args(["--signal=TERM", "--full", &id]).output().unwrap();
    assert!(cancel.status.success(), "{}", stderr(&cancel));
    let state = finished(&cluster, &id);
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(state.contains("ExitCode=143:0"), "{state}\n{said}");
    assert!(said.contains("stopped on SIGTERM after checkpoint-") && !said.contains("panicked"), "{said}");
    let latest = std::fs::read_to_string(out.join("latest")).unwrap();
    let at: u32 = latest.trim().trim_start_matches("checkpoint-").parse().unwrap_or_else(|_| panic!("latest: {latest:?}"));
    assert!((2..steps).contains(&at), "stopped at step {at} of {steps}:\n{said}");

    let mut args = train_args(&out, &cache, steps, 0);
    args.extend(["--resume_from_checkpoint".into(), "latest".into()]);
    let run = salloc(&cluster, &["-N1", "-n2"], &args).output().unwrap();
    let err = stderr(&run);
    assert!(run.status.success(), "{err}");
    assert!(err.contains(&format!("{} at step {at}", latest.trim())), "resumed from latest: {err}");
    let rel = weights_rel_err(&out, &reference);
    assert!(rel < 1e-5, "stopped at step {at} and resumed vs the uninterrupted run: rel {rel:.2e}\n{err}");
    assert!(weights_rel_err(&out, &fixtures().join("tiny")) > 1e-4, "the weights moved");
}
