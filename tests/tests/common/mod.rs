//! Helpers for the end-to-end tests: the real `coordinator` and `worker` binaries, the HF
//! fixtures from tests/fixtures/make_fixtures.py, and a small real dataset (this repo's source).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub mod http;
pub mod server;
pub mod slurm;

#[allow(unused_imports)] // each test binary uses its own few
pub use zerotune_tests::{fixtures, s, stderr};

/// `target/<profile>/<name>`, next to the test executable's `deps/` directory.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(path.is_file(), "{} is missing: run scripts/test.sh (or cargo build --workspace --bins) first", path.display());
    path
}

/// A directory of real source files to train on.
pub fn source_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../coordinator/src")
}

/// A copy of the model directory `from` at `to` (files only), with config.json's `key` set to
/// `value`: the same weights under another setting.
#[allow(dead_code)] // not every test binary edits a model
pub fn model_with(from: &Path, to: &Path, key: &str, value: serde_json::Value) -> PathBuf {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
    }
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(to.join("config.json")).unwrap()).unwrap();
    config[key] = value;
    std::fs::write(to.join("config.json"), config.to_string()).unwrap();
    to.to_path_buf()
}

/// `coordinator train` with the given flags plus a private token cache; returns its output.
pub fn train(cache: &Path, args: &[&str]) -> Output {
    let out = Command::new(binary("coordinator"))
        .arg("train")
        .args(["--device", "cpu", "--cache_dir", &cache.to_string_lossy()])
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "a panic reached the user:\n{stderr}");
    out
}

/// The pid in a coordinator line `rank R joined: HOST DEVICE pid PID local rank L`.
pub fn joined_pid(line: &str) -> Option<u32> {
    line.split(" pid ").nth(1)?.split_whitespace().next()?.parse().ok()
}

/// Waits (30 s at most) until process `pid`, which is not our child, is gone.
pub fn wait_gone(pid: u32, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z ")) {
        assert!(std::time::Instant::now() < deadline, "{what} {pid} still runs after 30 s");
        std::thread::sleep(std::time::Duration::from_millis(20)); // polling: not our child, no wait()
    }
}

/// Sends `signal` to process `pid`.
pub fn signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) on a process of this test's own job.
    assert_eq!(unsafe { libc::kill(pid as i32, signal) }, 0);
}

/// The largest `rel_err` over the tensors of two model dirs.
pub fn weights_rel_err(ours: &Path, reference: &Path) -> f64 {
    let (a, b) = (zerotune_hf::WeightFiles::open(ours).unwrap(), zerotune_hf::WeightFiles::open(reference).unwrap());
    let values = |files: &zerotune_hf::WeightFiles, name: &str| files.read(name).unwrap().to_f32().unwrap();
    b.names().map(|name| zerotune_tests::rel_err(&values(&a, name), &values(&b, name))).fold(0.0, zerotune_tests::nan_max)
}

/// Runs `job` (its stderr piped) to its end, SIGKILLing rank 1 (the pid of its `rank 1 joined`
/// line) at the first `step 3/` line. Returns the exit code, the time from the kill to the exit,
/// and the whole stderr.
pub fn kill_rank_1_at_step_3(mut job: std::process::Child) -> (Option<i32>, std::time::Duration, String) {
    use std::io::{BufRead, BufReader};
    let (mut rank1, mut killed_at, mut lines) = (None, None, vec![]);
    for line in BufReader::new(job.stderr.take().expect("stderr piped")).lines().map(Result::unwrap) {
        if line.starts_with("rank 1 joined: ") {
            rank1 = joined_pid(&line);
        }
        if let (true, Some(pid), None) = (line.starts_with("step 3/"), rank1, killed_at) {
            signal(pid, libc::SIGKILL);
            killed_at = Some(std::time::Instant::now());
        }
        lines.push(line);
    }
    let status = job.wait().unwrap();
    let log = lines.join("\n");
    let took = killed_at.unwrap_or_else(|| panic!("rank 1 joined and step 3 was reached:\n{log}")).elapsed();
    (status.code(), took, log)
}
