//! Distributed training through real coordinator and worker processes on CPU ranks (TCP ring):
//! ZeRO stages and offload give the weights of single-rank training on the same global batches;
//! resume continues exactly, also on another world size; a killed, frozen or hung worker stops the
//! job with its name, and `--max_restarts` finishes the run from the last checkpoint; signals to
//! the coordinator checkpoint, stop and abort.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{binary, fixtures, joined_pid, s, signal, source_dir, stderr, wait_gone, weights_rel_err};

const REL: f64 = 1e-5;
/// Loss and gradient norm per step across world sizes (the norm does not depend on the partition).
const STEP_REL: f64 = 1e-6;

/// A ds_config selecting the ZeRO stage and optimizer offload (batch values are "auto"), with
/// stage-2 buckets small enough that every run reduce-scatters in many (and a short last one).
fn ds_config(dir: &Path, stage: u8, offload: bool) -> PathBuf {
    let path = dir.join(format!("ds-{stage}-{offload}.json"));
    let device = if offload { "cpu" } else { "none" };
    let config = serde_json::json!({
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "zero_optimization": {"stage": stage, "offload_optimizer": {"device": device}, "reduce_bucket_size": 10000},
    });
    std::fs::write(&path, config.to_string()).unwrap();
    path
}

/// `coordinator train` fine-tuning the tiny fixture into `out` on `world` CPU ranks, with the
/// ZeRO settings of `ds`, plus `extra` flags.
fn coordinator(t: &Path, out: &Path, world: usize, accumulation: usize, ds: &Path, extra: &[&str]) -> Command {
    coordinator_of(&pretrained(&fixtures().join("tiny")), t, out, world, accumulation, ds, extra)
}

/// `--model_name_or_path DIR`.
fn pretrained(dir: &Path) -> Vec<String> {
    vec!["--model_name_or_path".into(), s(dir)]
}

/// The same, training the model `model` names (`pretrained`, or `--config_name` flags).
fn coordinator_of(model: &[String], t: &Path, out: &Path, world: usize, accumulation: usize, ds: &Path, extra: &[&str]) -> Command {
    let mut command = Command::new(binary("coordinator"));
    command
        .args(["train", "--device", "cpu", "--cache_dir", &s(&t.join("cache"))])
        .args(model)
        .args(["--train_file", &s(&source_dir()), "--output_dir", &s(out)])
        .args(["--do_train", "--num_workers", &world.to_string(), "--gradient_accumulation_steps", &accumulation.to_string()])
        .args(["--per_device_train_batch_size", "1", "--block_size", "32", "--learning_rate", "2e-3", "--weight_decay", "0.1"])
        .args(["--adam_epsilon", "1e-6", "--warmup_steps", "2", "--max_grad_norm", "0.5", "--logging_steps", "1"])
        .args(["--deepspeed", &s(ds)])
        .args(extra);
    command
}

/// Runs `coordinator(..)` to success into `t/name`; returns the output dir.
fn run(t: &Path, name: &str, world: usize, accumulation: usize, ds: &Path, extra: &[&str]) -> PathBuf {
    run_of(&pretrained(&fixtures().join("tiny")), t, name, world, accumulation, ds, extra)
}

/// The same for the model `model` names.
fn run_of(model: &[String], t: &Path, name: &str, world: usize, accumulation: usize, ds: &Path, extra: &[&str]) -> PathBuf {
    let out = t.join(name);
    let result = coordinator_of(model, t, &out, world, accumulation, ds, extra).output().unwrap();
    let err = stderr(&result);
    assert!(result.status.success() && !err.contains("panicked"), "{name}: {err}");
    out
}

/// (loss, grad_norm) of every logged step in `out/metrics.jsonl`.
fn step_metrics(out: &Path) -> Vec<(f64, f64)> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let records = text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap());
    records.filter(|r| r.get("grad_norm").is_some()).map(|r| (r["loss"].as_f64().unwrap(), r["grad_norm"].as_f64().unwrap())).collect()
}

/// The largest relative difference of the per-step loss and of the per-step grad norm; the
/// norms must be above the clipping threshold (0.5), so clipping is active.
fn per_step_rel_err(out: &Path, reference: &Path) -> (f64, f64) {
    let (ours, theirs) = (step_metrics(out), step_metrics(reference));
    assert_eq!(ours.len(), theirs.len(), "one record per step");
    assert!(theirs.iter().all(|&(_, norm)| norm > 0.5), "clipping is active at every step: {theirs:?}");
    let rel = |a: f64, b: f64| ((a - b) / b).abs();
    ours.iter().zip(&theirs).fold((0.0, 0.0), |(l, n), (a, b)| (f64::max(l, rel(a.0, b.0)), f64::max(n, rel(a.1, b.1))))
}

/// Weights moved from the start: the comparison is not between two untouched copies.
fn moved(out: &Path) -> f64 {
    weights_rel_err(out, &fixtures().join("tiny"))
}

#[test]
fn zero_ranks_equal_single_rank_training_on_the_same_global_batches() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let steps = ["--max_steps", "8", "--save_steps", "0"];
    for world in [1, 2, 3] {
        let reference = run(t, &format!("single-acc{}", 4 * world), 1, 4 * world, &ds_config(t, 0, true), &steps);
        assert!(moved(&reference) > 1e-3, "training changed the weights");
        let mut cases = vec![(2, true), (2, false)];
        if world == 2 {
            cases.extend([(0, true), (1, false)]);
        }
        for (stage, offload) in cases {
            let out = run(t, &format!("w{world}-s{stage}-o{offload}"), world, 4, &ds_config(t, stage, offload), &steps);
            let err = weights_rel_err(&out, &reference);
            let (loss, norm) = per_step_rel_err(&out, &reference);
            println!(
                "world {world} stage {stage} offload {offload}: weights rel {err:.2e}, per-step loss {loss:.2e}, grad norm {norm:.2e} \
                 vs 1 rank x accumulation {}",
                4 * world
            );
            assert!(err < REL, "world {world} stage {stage} offload {offload}: rel {err}");
            assert!(loss < STEP_REL && norm < STEP_REL, "world {world} stage {stage} offload {offload}: loss {loss}, norm {norm}");
        }
    }
}

/// A Llama with one KV head and an untied head, from scratch (`--config_name`, HF's init), with
/// the fixtures' tokenizer.
fn mqa_untied(t: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(fixtures().join("decoders/llama-mqa-tied/config.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
    config["tie_word_embeddings"] = false.into();
    config["initializer_range"] = 0.02.into();
    let path = t.join("llama-mqa-untied.json");
    std::fs::write(&path, config.to_string()).unwrap();
    ["--config_name", &s(&path), "--tokenizer_name", &s(&fixtures().join("tiny"))].map(String::from).to_vec()
}

/// The decoder family trains across ranks as CodeGen does: grouped KV heads with a tied head (one
/// parameter, partitioned, reduced and clipped once) and with an untied one, one KV head with an
/// untied head, sliding windows inside the blocks, on 2 and 3 ranks with ZeRO-2 and offload (the
/// Llama also with stages 0 and 1 and without offload); then a resume on 3 ranks from a 2-rank
/// checkpoint.
#[test]
fn decoder_models_train_on_any_world_size_as_on_one_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let ds = ds_config(t, 2, true);
    // At HF's init range (0.02): with 0.2, gradient noise between orders of summation reaches
    // Adam's eps in a few weights (the per-step loss and norm still agree to 1e-8).
    let dir = |name: &str| pretrained(&fixtures().join("decoders").join(format!("{name}-train")));
    let models = [("starcoder2", dir("starcoder2")), ("llama", dir("llama")), ("llama-mqa-untied", mqa_untied(t))];
    for (name, model) in models {
        let steps = ["--max_steps", "6", "--save_steps", "3"];
        let reference = run_of(&model, t, &format!("{name}-single"), 1, 12, &ds, &steps);
        let halfway = reference.join("checkpoint-3/model");
        assert!(weights_rel_err(&reference, &halfway) > 1e-3, "{name}: training changed the weights");
        // Every stage and offload on one of them; ZeRO-2 + offload on all.
        let mut cases = vec![(2, 2, true), (3, 2, true)];
        if name == "llama" {
            cases.extend([(2, 0, true), (2, 1, false), (3, 2, false)]);
        }
        for (world, stage, offload) in cases {
            let ds = ds_config(t, stage, offload);
            let out = run_of(&model, t, &format!("{name}-w{world}-s{stage}-o{offload}"), world, 12 / world, &ds, &steps);
            let err = weights_rel_err(&out, &reference);
            let (loss, norm) = per_step_rel_err(&out, &reference);
            println!("{name} world {world} stage {stage} offload {offload}: weights rel {err:.2e}, per-step loss {loss:.2e}, grad norm {norm:.2e} vs 1 rank");
            assert!(
                err < REL && loss < STEP_REL && norm < STEP_REL,
                "{name} world {world} stage {stage}: weights {err}, loss {loss}, norm {norm}"
            );
        }
        let checkpoint = s(&t.join(format!("{name}-w2-s2-otrue/checkpoint-3")));
        let resumed =
            run_of(&model, t, &format!("{name}-resumed"), 3, 4, &ds, &[&steps[..], &["--resume_from_checkpoint", &checkpoint]].concat());
        let err = weights_rel_err(&resumed, &reference);
        println!("{name} resumed at 3 on 3 ranks from a 2-rank checkpoint: rel {err:.2e}");
        assert!(err < REL, "{name} resumed: rel {err}");
    }
}

#[test]
fn resume_continues_exactly_on_the_same_or_another_world_size() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let ds = ds_config(t, 2, true);
    let full = run(t, "uninterrupted", 2, 3, &ds, &["--max_steps", "12", "--save_steps", "6"]);
    let checkpoint = s(&full.join("checkpoint-6"));
    assert!(full.join("checkpoint-6/optimizer/rank-00001-of-00002.safetensors").is_file());
    // Same world size, and 3 ranks from a 2-rank checkpoint (global batch kept: 2 x 3 = 3 x 2).
    for (world, accumulation) in [(2, 3), (3, 2)] {
        let name = format!("resumed-w{world}");
        let out =
            run(t, &name, world, accumulation, &ds, &["--max_steps", "12", "--save_steps", "6", "--resume_from_checkpoint", &checkpoint]);
        let err = weights_rel_err(&out, &full);
        println!("resumed at 6 on {world} ranks -> 12: rel {err:.2e}");
        assert!(err < REL, "{name}: rel {err}");
        let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        assert!(!metrics.contains("\"step\":6,") && metrics.contains("\"step\":7,"), "the resumed run starts at step 7");
        // Its last checkpoint's history is the whole run's: the checkpoint's records, then its own.
        let history = log_history(&out.join("checkpoint-12"));
        let steps: Vec<u64> = history.iter().map(|r| r["step"].as_u64().unwrap()).collect();
        assert_eq!(steps, (1..=12).collect::<Vec<_>>(), "{name}: every step once in log_history");
        assert_eq!(history[..6], log_history(&full.join("checkpoint-6"))[..6], "{name}: the records before the resume are kept");
    }
}

/// The `log_history` of the checkpoint `dir`'s trainer_state.json.
fn log_history(dir: &Path) -> Vec<serde_json::Value> {
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("trainer_state.json")).unwrap()).unwrap();
    state["log_history"].as_array().unwrap().clone()
}

#[test]
fn a_killed_worker_stops_the_job_by_name_and_restarts_resume_from_latest() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let ds = ds_config(t, 2, true);
    let steps = ["--max_steps", "12", "--save_steps", "4"];
    let full = run(t, "uninterrupted", 2, 2, &ds, &steps);

    // Rank 1 SIGKILLs itself at the start of step 7, with no restarts allowed.
    let out = t.join("killed");
    let fault = format!("1:7:{}", s(&t.join("fault-1")));
    let result = coordinator(t, &out, 2, 2, &ds, &steps).env("ZEROTUNE_FAULT", &fault).output().unwrap();
    let err = stderr(&result);
    assert!(!result.status.success());
    assert!(err.contains("worker rank 1 (") && err.contains("SIGKILL"), "names the rank, host and cause: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(std::fs::read_to_string(out.join("latest")).unwrap().trim(), "checkpoint-4", "the checkpoint before the fault is kept");

    // The same fault with --max_restarts 1: resumed from checkpoint-4, the run ends with the
    // weights of the uninterrupted run.
    let out = t.join("restarted");
    let fault = format!("1:7:{}", s(&t.join("fault-2")));
    let mut child = coordinator(t, &out, 2, 2, &ds, &[&steps[..], &["--max_restarts", "1"]].concat())
        .env("ZEROTUNE_FAULT", &fault)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines: Vec<String> = BufReader::new(child.stderr.take().unwrap()).lines().map(Result::unwrap).collect();
    assert!(child.wait().unwrap().success(), "{}", lines.join("\n"));
    assert!(lines.iter().any(|l| l.contains("restart 1 of 1: resuming from checkpoint-4")), "{}", lines.join("\n"));
    let err = weights_rel_err(&out, &full);
    assert!(err < REL, "restarted run vs uninterrupted: rel {err}");
}

#[test]
fn workers_exit_when_the_coordinator_dies() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let ds = ds_config(t, 2, true);
    let mut coordinator =
        coordinator(t, &t.join("out"), 2, 1, &ds, &["--max_steps", "100000", "--save_steps", "0"]).stderr(Stdio::piped()).spawn().unwrap();
    // Wait until both ranks joined and training runs, collecting their pids.
    let mut pids = vec![];
    for line in BufReader::new(coordinator.stderr.take().unwrap()).lines().map(Result::unwrap) {
        if line.starts_with("rank ") {
            pids.extend(joined_pid(&line));
        }
        if line.starts_with("step 2/") {
            break;
        }
    }
    assert_eq!(pids.len(), 2);
    coordinator.kill().unwrap(); // SIGKILL: no chance to clean up
    coordinator.wait().unwrap();
    // The orphaned workers notice their command stream is gone and exit on their own.
    for pid in pids {
        wait_gone(pid, "the orphaned worker");
    }
}

/// A 2-rank run in which rank 1 meets `fault` (see ZEROTUNE_FAULT) at step 3, with `extra`
/// flags: the job fails and rank 1's process is gone; returns the coordinator's stderr.
fn fails_with_a_faulty_rank_1(fault: &str, extra: &[&str]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let fault = format!("1:3:{}:{fault}", s(&t.join("fault")));
    let extra = [extra, &["--max_steps", "50", "--save_steps", "0"]].concat();
    let result = coordinator(t, &t.join("out"), 2, 1, &ds_config(t, 2, true), &extra).env("ZEROTUNE_FAULT", &fault).output().unwrap();
    let err = stderr(&result);
    assert!(!result.status.success(), "{err}");
    let pid = err.lines().find(|l| l.starts_with("rank 1 joined:")).and_then(joined_pid).unwrap();
    wait_gone(pid, "the faulty worker");
    err
}

#[test]
fn a_frozen_worker_misses_its_heartbeats_and_is_named() {
    // SIGSTOP: frozen whole, heartbeat included, its connection open.
    let err = fails_with_a_faulty_rank_1("stop", &["--heartbeat_timeout", "3"]);
    assert!(err.contains("worker rank 1 (") && err.contains("no heartbeat for 3 s (--heartbeat_timeout) after step 2"), "{err}");
}

#[test]
fn a_hung_worker_trips_the_progress_timeout() {
    // Its work blocks forever while its heartbeat goes on: alive, connected, no progress.
    let err = fails_with_a_faulty_rank_1("hang", &["--ddp_timeout", "3"]);
    assert!(err.contains("no progress for 3 s (--ddp_timeout)") && err.contains("last finished step 2"), "{err}");
    assert!(!err.contains("no heartbeat"), "the hung rank still beats: {err}");
}

/// The number after `prefix` in the first line that has it.
fn step_after(lines: &[String], prefix: &str) -> u64 {
    let found = lines.iter().find_map(|l| l.split(prefix).nth(1)).unwrap_or_else(|| panic!("no {prefix:?} in\n{}", lines.join("\n")));
    found.split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
}

#[test]
fn signals_save_a_checkpoint_then_stop_and_the_run_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let ds = ds_config(t, 2, true);
    let steps = ["--max_steps", "40", "--save_steps", "0"];
    let full = run(t, "uninterrupted", 2, 1, &ds, &steps);

    // SIGUSR1 once training runs, SIGTERM once that checkpoint is saved.
    let out = t.join("signalled");
    let mut child = coordinator(t, &out, 2, 1, &ds, &steps).stderr(Stdio::piped()).spawn().unwrap();
    let mut lines = vec![];
    for line in BufReader::new(child.stderr.take().unwrap()).lines().map(Result::unwrap) {
        if line.starts_with("step 2/") {
            signal(child.id(), libc::SIGUSR1);
        }
        if line.starts_with("saved checkpoint-") && !lines.iter().any(|l: &String| l.starts_with("saved checkpoint-")) {
            signal(child.id(), libc::SIGTERM);
        }
        lines.push(line);
    }
    let log = lines.join("\n");
    assert_eq!(child.wait().unwrap().code(), Some(128 + libc::SIGTERM), "{log}");
    let (saved, stopped) = (step_after(&lines, "SIGUSR1: saving checkpoint-"), step_after(&lines, "SIGTERM: stopping after checkpoint-"));
    assert!(saved < stopped && stopped < 40, "{log}");
    assert!(log.contains(&format!("stopped on SIGTERM after checkpoint-{stopped}")), "{log}");
    assert!(out.join(format!("checkpoint-{saved}/optimizer/layout.json")).is_file(), "the SIGUSR1 checkpoint is complete");
    assert_eq!(std::fs::read_to_string(out.join("latest")).unwrap().trim(), format!("checkpoint-{stopped}"));
    assert!(!out.join("model.safetensors").exists(), "a stopped run writes no final model");
    for pid in lines.iter().filter(|l| l.starts_with("rank ")).filter_map(|l| joined_pid(l)) {
        wait_gone(pid, "a stopped worker");
    }

    // Resumed from `latest`, the run ends with the weights of the uninterrupted one.
    let resumed = run(t, "signalled", 2, 1, &ds, &[&steps[..], &["--resume_from_checkpoint", "latest"]].concat());
    let err = weights_rel_err(&resumed, &full);
    assert!(err < REL, "stopped and resumed vs uninterrupted: rel {err}");
}

#[test]
fn a_second_signal_aborts_and_ranks_started_by_hand_hear_it_in_their_heartbeat() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let ds = ds_config(t, 2, true);
    // Rank 1 blocks at step 3 (heartbeat alive), so the stop's checkpoint can never be taken.
    let fault = format!("1:3:{}:hang", s(&t.join("fault")));
    // A long heartbeat timeout: only the abort itself can end the ranks within the test's 30 s.
    let manual = ["--launcher", "manual", "--master_addr", "127.0.0.1", "--master_port", "0", "--heartbeat_timeout", "600"];
    let manual = [&manual[..], &["--max_steps", "50", "--save_steps", "0"]].concat();
    let mut child = coordinator(t, &t.join("out"), 2, 1, &ds, &manual).stderr(Stdio::piped()).spawn().unwrap();
    let mut lines = vec![];
    let mut workers = vec![];
    for line in BufReader::new(child.stderr.take().unwrap()).lines().map(Result::unwrap) {
        if let Some(command) = line.trim_start().strip_prefix("[localhost] ") {
            let worker = Command::new("sh").args(["-c", command]).env("ZEROTUNE_FAULT", &fault).stderr(Stdio::piped()).spawn();
            workers.push(worker.unwrap());
        }
        if line.starts_with("step 2/") {
            signal(child.id(), libc::SIGINT);
        }
        if line.starts_with("SIGINT: stopping after checkpoint-") {
            signal(child.id(), libc::SIGINT);
        }
        lines.push(line);
    }
    let log = lines.join("\n");
    assert_eq!(child.wait().unwrap().code(), Some(1), "{log}");
    assert!(log.contains("aborted on a second SIGINT; the last complete checkpoint (`latest`) is kept"), "{log}");
    // Not our launcher's children: they exit on the abort their heartbeat carries.
    for mut worker in workers {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while worker.try_wait().unwrap().is_none() {
            assert!(std::time::Instant::now() < deadline, "a worker still runs 30 s after the abort");
            std::thread::sleep(std::time::Duration::from_millis(20)); // polling a child that may never exit
        }
        let output = worker.wait_with_output().unwrap();
        assert!(!output.status.success());
        assert!(stderr(&output).contains("the coordinator aborted the job"), "{}", stderr(&output));
    }
}
