//! The memory planner against real runs: on a CPU rank its per-rank total is within 15% of the
//! peak RSS the job reaches, with and without --gradient_checkpointing; a job planned not to fit
//! is refused before any worker starts, naming the largest term. The 350M shape (block 128,
//! micro 2, ZeRO-2 + offload) takes ~9 GiB and a minute a run on 2 cores, so it is measured by
//! bench/rank_memory.sh (bench/results/rank_memory-*.md: planner / measured 0.96 both ways); here
//! a 70M-parameter shape with the 350M vocabulary and width stands in for it, in seconds.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};

use common::{binary, fixtures, s, source_dir};

const TOLERANCE: f64 = 0.15;

/// The config of the stand-in shape: codegen-350M's vocabulary and head size, 6 layers of 512.
fn config_file(dir: &Path) -> String {
    let config = serde_json::json!({
        "model_type": "codegen", "vocab_size": 51200, "n_positions": 2048, "n_ctx": 2048, "n_embd": 512, "n_layer": 6,
        "n_head": 8, "rotary_dim": 32, "activation_function": "gelu_new", "resid_pdrop": 0.0, "embd_pdrop": 0.0,
        "attn_pdrop": 0.0, "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "bos_token_id": 1, "eos_token_id": 2,
    });
    let path = dir.join("config.json");
    std::fs::write(&path, config.to_string()).unwrap();
    s(&path)
}

fn flags(dir: &Path, checkpointing: bool) -> Vec<String> {
    let ds = dir.join("ds.json");
    std::fs::write(&ds, r#"{"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}"#).unwrap();
    [
        "--config_name",
        &config_file(dir),
        "--tokenizer_name",
        &s(&fixtures().join("tokenizer-big")),
        "--train_file",
        &s(&source_dir()),
        "--do_train",
        "--device",
        "cpu",
        "--deepspeed",
        &s(&ds),
        "--block_size",
        "128",
        "--per_device_train_batch_size",
        "4",
        "--gradient_accumulation_steps",
        "2",
        "--max_steps",
        "2",
        "--save_steps",
        "0",
        "--logging_steps",
        "1",
        "--completion_eval_positions",
        "0",
        "--cache_dir",
        &s(&dir.join("cache")),
        "--output_dir",
        &s(&dir.join(format!("out-{checkpointing}"))),
        "--gradient_checkpointing",
        if checkpointing { "true" } else { "false" },
    ]
    .map(String::from)
    .to_vec()
}

/// Runs `coordinator train FLAGS` and returns the peak RSS in bytes of the largest process of its
/// tree (wait4's ru_maxrss covers the waited-for descendants: the worker).
#[allow(clippy::zombie_processes)] // reaped by wait4, which also reports the peak
fn peak_rss(flags: &[String]) -> u64 {
    let mut child =
        Command::new(binary("coordinator")).arg("train").args(flags).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let stderr_pipe = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || std::io::read_to_string(stderr_pipe).unwrap());
    let (mut status, mut usage) = (0, unsafe { std::mem::zeroed::<libc::rusage>() });
    // SAFETY: waits for our own child, writing into locals.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    let stderr = reader.join().unwrap();
    assert_eq!(pid, child.id() as i32);
    assert!(std::process::ExitStatus::from_raw(status).success(), "the run failed:\n{stderr}");
    usage.ru_maxrss as u64 * 1024
}

/// `coordinator estimate FLAGS`: the per-rank total it prints.
fn planned(flags: &[String]) -> u64 {
    let out = Command::new(binary("coordinator")).arg("estimate").args(flags).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let line = text.lines().find(|l| l.contains("total per CPU rank")).unwrap_or_else(|| panic!("no total in:\n{text}"));
    line.split('(').nth(2).and_then(|rest| rest.split(' ').next()).and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{line}"))
}

#[test]
fn the_planner_is_within_15_percent_of_a_cpu_rank_s_peak_rss() {
    let dir = tempfile::tempdir().unwrap();
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let mut plans = vec![];
    for checkpointing in [false, true] {
        let flags = flags(dir.path(), checkpointing);
        let (plan, measured) = (planned(&flags), peak_rss(&flags));
        let ratio = plan as f64 / measured as f64;
        println!("checkpointing {checkpointing}: planned {:.3} GiB, measured peak RSS {:.3} GiB: {ratio:.3}", gib(plan), gib(measured));
        assert!((ratio - 1.0).abs() <= TOLERANCE, "checkpointing {checkpointing}: planned {plan} vs measured {measured} ({ratio:.3})");
        plans.push(plan);
    }
    assert!(plans[1] < plans[0], "checkpointing lowers the plan");
}

#[test]
fn a_job_planned_not_to_fit_is_refused_before_any_worker_starts() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    let started = std::time::Instant::now();
    let out = Command::new(binary("coordinator"))
        .args(["train", "--config_name", "codegen-350M", "--tokenizer_name", &s(&fixtures().join("tokenizer-big"))])
        .args(["--train_file", &s(&source_dir()), "--do_train"])
        .args(["--device", "cpu", "--block_size", "128", "--per_device_train_batch_size", "2", "--gpu_memory", "1GiB"])
        .args(["--output_dir", &s(&out_dir), "--cache_dir", &s(&dir.path().join("cache"))])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("memory planner: the job needs") && err.contains("but 1.00 GiB is available"), "{err}");
    assert!(err.contains("the largest term is optimizer state (3.99 GiB"), "{err}");
    assert!(!err.contains("joined") && !out_dir.exists(), "nothing started, nothing written:\n{err}");
    assert!(started.elapsed().as_secs() < 10, "refused at once, before tokenizing");
}

/// The `#SBATCH` value of `key` in `script` (`#SBATCH --nodes=3   # comment` -> "3").
fn sbatch_value<'a>(script: &'a str, key: &str) -> &'a str {
    let prefix = format!("#SBATCH --{key}=");
    let line = script.lines().find_map(|l| l.strip_prefix(&prefix)).unwrap_or_else(|| panic!("no {prefix} in:\n{script}"));
    line.split_whitespace().next().unwrap()
}

/// README's sbatch script for the 16B recipe asks for what the planner plans for its command on
/// those nodes: the world its nodes x tasks per node make, one A100-80GB per task that it fits, and
/// at least the planner's memory per host.
#[test]
fn the_readme_sbatch_script_asks_for_what_the_planner_plans() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let script = readme.split("```bash\n#!/bin/bash\n#SBATCH --job-name=zerotune-16b\n").nth(1).expect("README's sbatch script");
    let script = &script[..script.find("```").unwrap()];
    let (nodes, per_node) = (sbatch_value(script, "nodes"), sbatch_value(script, "ntasks-per-node"));
    assert_eq!(sbatch_value(script, "gpus-per-task"), "1");
    let mem: f64 = sbatch_value(script, "mem").strip_suffix('G').and_then(|g| g.parse().ok()).expect("--mem=NG");
    // The exec'd command, its flags less those an estimate does without.
    let command = script[script.find("coordinator train").expect("the coordinator command")..].replace("\\\n", " ");
    let mut flags: Vec<&str> = command.split_whitespace().skip(2).collect();
    for (flag, takes_value) in [("--launcher", true), ("--train_file", true), ("--output_dir", true), ("\"${resume[@]}\"", false)] {
        let at = flags.iter().position(|f| *f == flag).unwrap_or_else(|| panic!("{flag} in {command}"));
        flags.drain(at..at + 1 + usize::from(takes_value));
    }
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds_offload.json");
    let ds_line = readme.lines().find(|l| l.starts_with("echo '{") && l.ends_with("> ds_offload.json")).expect("README's ds_offload.json");
    std::fs::write(&ds, ds_line.trim_start_matches("echo '").trim_end_matches("' > ds_offload.json")).unwrap();
    let ds = s(&ds);
    let flags: Vec<&str> = flags.into_iter().map(|f| if f == "ds_offload.json" { ds.as_str() } else { f }).collect();
    let out = Command::new(binary("coordinator"))
        .arg("estimate")
        .args(&flags)
        .args(["--num_nodes", nodes, "--num_gpus", per_node, "--gpu_model", "a100-80gb"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}{}", String::from_utf8_lossy(&out.stderr));
    let world = nodes.parse::<usize>().unwrap() * per_node.parse::<usize>().unwrap();
    assert!(table.starts_with(&format!("memory plan: 16032155648 parameters, world {world} ({per_node} per host)")), "{table}");
    assert!(table.contains("total per GPU: ") && table.contains(": fits in 80.00 GiB"), "{table}");
    let host = table.lines().find_map(|l| l.strip_prefix(&format!("  total per host ({per_node} ranks): "))).expect("a host total");
    let host: f64 = host.split(" GiB").next().and_then(|g| g.parse().ok()).unwrap_or_else(|| panic!("{host}"));
    assert!(host <= mem, "--mem={mem}G but the planner needs {host} GiB per host:\n{table}");
}
