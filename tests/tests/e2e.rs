//! End to end through real processes: `coordinator train` starts a gRPC server and a `worker`
//! process, trains a tiny CodeGen on real source files, and writes the final model, checkpoints
//! and metrics; `worker generate` then runs on the result.

mod common;

use std::process::Command;

use common::{binary, fixtures, s, source_dir, stderr, train};

#[test]
fn train_from_scratch_writes_model_checkpoints_and_metrics_then_generates() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, cache) = (tmp.path().join("run"), tmp.path().join("cache"));
    let args = [
        "--config_name",
        "tiny",
        "--train_tokenizer",
        "400",
        "--train_file",
        &s(&source_dir()),
        "--output_dir",
        &s(&out),
        "--do_train",
        "--do_eval",
        "--block_size",
        "64",
        "--per_device_train_batch_size",
        "4",
        "--gradient_accumulation_steps",
        "2",
        "--learning_rate",
        "1e-3",
        "--max_steps",
        "6",
        "--warmup_steps",
        "2",
        "--logging_steps",
        "1",
        "--eval_steps",
        "3",
        "--save_steps",
        "3",
        "--save_total_limit",
        "1",
    ];
    let run = train(&cache, &args);
    assert!(run.status.success(), "{}", stderr(&run));

    for file in ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "run.json"] {
        assert!(out.join(file).is_file(), "missing {file}");
    }
    assert_eq!(std::fs::read_to_string(out.join("latest")).unwrap(), "checkpoint-6\n");
    assert!(!out.join("checkpoint-3").exists(), "save_total_limit 1 prunes checkpoint-3");
    let ckpt = out.join("checkpoint-6");
    for file in [
        "model/model.safetensors",
        "model/config.json",
        "model/tokenizer.json",
        "optimizer/layout.json",
        "optimizer/rank-00000-of-00001.safetensors",
    ] {
        assert!(ckpt.join(file).is_file(), "checkpoint lacks {file}");
    }
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ckpt.join("trainer_state.json")).unwrap()).unwrap();
    assert_eq!(state["global_step"], 6);

    let metrics: Vec<serde_json::Value> =
        std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let steps: Vec<u64> = metrics.iter().filter(|m| m.get("loss").is_some()).map(|m| m["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [1, 2, 3, 4, 5, 6]);
    let evals: Vec<&serde_json::Value> = metrics.iter().filter(|m| m.get("eval_loss").is_some()).collect();
    assert_eq!(evals.len(), 2, "eval at step 3 and at the end");
    for e in &evals {
        let (loss, ppl) = (e["eval_loss"].as_f64().unwrap(), e["perplexity"].as_f64().unwrap());
        assert!((loss.exp() - ppl).abs() < 1e-6 * ppl && loss.is_finite());
    }
    let first_lr = metrics[0]["learning_rate"].as_f64().unwrap();
    assert_eq!(first_lr, 0.0, "linear warmup starts at 0 as in HF");

    // The saved model generates through the CLI.
    let gen = Command::new(binary("worker"))
        .args(["generate", "--model", &s(&out), "--prompt", "pub fn ", "--max_new_tokens", "5", "--json"])
        .output()
        .unwrap();
    assert!(gen.status.success(), "{}", stderr(&gen));
    let reply: serde_json::Value = serde_json::from_slice(&gen.stdout).unwrap();
    assert!((1..=5).contains(&reply["new_ids"].as_array().unwrap().len()));

    // A second run over the same data reuses the token cache.
    let again = train(&cache, &[&args[..], &["--overwrite_output_dir"]].concat());
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(stderr(&again).contains("token cache hit"), "{}", stderr(&again));
}

/// A Llama-family model from scratch: `--config_name tiny-llama` with a trained tokenizer trains,
/// saves a directory that HF's AutoModelForCausalLM and AutoTokenizer load, and `worker generate`
/// on it gives HF's greedy ids.
#[test]
fn a_tiny_llama_from_scratch_saves_what_hf_loads_and_generates_its_greedy_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, cache) = (tmp.path().join("run"), tmp.path().join("cache"));
    let args = ["--config_name", "tiny-llama", "--train_tokenizer", "400", "--train_file", &s(&source_dir()), "--output_dir", &s(&out)];
    let flags = ["--do_train", "--block_size", "32", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--max_steps", "6"];
    let run = train(&cache, &[&args[..], &flags].concat());
    assert!(run.status.success(), "{}", stderr(&run));
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!((config["model_type"].as_str(), config["vocab_size"].as_u64()), (Some("llama"), Some(448)), "resized to the tokenizer");

    let gen = Command::new(binary("worker"))
        .args(["generate", "--model", &s(&out), "--prompt", "pub fn ", "--max_new_tokens", "6", "--json"])
        .output()
        .unwrap();
    assert!(gen.status.success(), "{}", stderr(&gen));
    let ours: serde_json::Value = serde_json::from_slice(&gen.stdout).unwrap();
    let python = std::env::var("ZEROTUNE_PYTHON").expect("ZEROTUNE_PYTHON is set by scripts/test.sh");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/hf_greedy.py");
    let hf = Command::new(python).args([script, &s(&out), "pub fn ", "6"]).output().unwrap();
    assert!(hf.status.success(), "HF could not load the saved model: {}", stderr(&hf));
    let hf: serde_json::Value = serde_json::from_slice(&hf.stdout).unwrap();
    assert!(hf["min_margin"].as_f64().unwrap() > 1e-4, "a near tie in HF's greedy choice: {hf}");
    assert_eq!(ours["prompt_ids"], hf["prompt_ids"], "AutoTokenizer encodes as we do");
    let specials = (&hf["eos_token_id"], &hf["bos_token_id"]);
    assert_eq!(specials, (&config["eos_token_id"], &config["bos_token_id"]), "AutoTokenizer has the config's special tokens");
    let new_ids = ours["new_ids"].as_array().unwrap();
    assert_eq!(new_ids[..], hf["new_ids"].as_array().unwrap()[..new_ids.len()], "greedy ids (ours stop at eos)");
}

#[test]
fn worker_generate_cli_matches_hf_greedy() {
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("meta.json")).unwrap()).unwrap();
    let reference = zerotune_hf::WeightFiles::open_file(&fixtures().join("reference.safetensors")).unwrap();
    let ids = |name: &str| -> Vec<i64> {
        reference.bytes(name).unwrap().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect()
    };
    let gen = Command::new(binary("worker"))
        .args(["generate", "--model", &s(&fixtures().join("tiny")), "--prompt", meta["prompt"].as_str().unwrap()])
        .args(["--max_new_tokens", "20", "--json"])
        .output()
        .unwrap();
    assert!(gen.status.success(), "{}", stderr(&gen));
    let reply: serde_json::Value = serde_json::from_slice(&gen.stdout).unwrap();
    let got = |key: &str| -> Vec<i64> { reply[key].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect() };
    assert_eq!(got("prompt_ids"), ids("prompt_ids"));
    assert_eq!(got("new_ids"), ids("greedy_new_ids"));
}

#[test]
fn fine_tunes_a_pretrained_fp16_bin_checkpoint_with_a_deepspeed_config() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, cache) = (tmp.path().join("run"), tmp.path().join("cache"));
    let ds = tmp.path().join("ds_config.json");
    std::fs::write(
        &ds,
        r#"{"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto", "gradient_clipping": "auto",
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}},
        "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": true}}}"#,
    )
    .unwrap();
    let run = train(
        &cache,
        &[
            "--model_name_or_path",
            &s(&fixtures().join("tiny-bin")),
            "--train_file",
            &s(&source_dir()),
            "--output_dir",
            &s(&out),
            "--do_train",
            "--block_size",
            "32",
            "--per_device_train_batch_size",
            "2",
            "--max_steps",
            "2",
            "--save_steps",
            "0",
            "--deepspeed",
            &s(&ds),
        ],
    );
    assert!(run.status.success(), "{}", stderr(&run));
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["vocab_size"], 1003, "the embedding keeps its rows (never resized to the tokenizer)");
    let plan: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(plan["zero_optimization"], serde_json::json!({"stage": 2, "offload_optimizer": true, "reduce_bucket_size": 500_000_000}));
    assert!(out.join("tokenizer.json").is_file());
}

/// The SVG curves of a report.html as {data-key: points in its path}, read by Python's parser.
fn report_curves(report: &std::path::Path) -> serde_json::Value {
    let script = r#"
import json, sys
from html.parser import HTMLParser
class Curves(HTMLParser):
    curves, svgs = {}, 0
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.svgs += tag == "svg"
        if tag == "path" and "data-key" in a:
            assert a["data-key"] not in self.curves, "one path per curve"
            self.curves[a["data-key"]] = sum(1 for t in a["d"].split() if t[0] in "ML")
p = Curves()
p.feed(open(sys.argv[1], encoding="utf-8").read())
p.close()
assert p.svgs == 4, p.svgs
print(json.dumps(p.curves))
"#;
    let python = std::env::var("ZEROTUNE_PYTHON").expect("ZEROTUNE_PYTHON is set by scripts/test.sh");
    let out = Command::new(python).args(["-c", script, &s(report)]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn do_eval_compares_the_start_with_the_result_and_writes_the_report() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, cache) = (tmp.path().join("run"), tmp.path().join("cache"));
    let base = fixtures().join("tiny-decode");
    let flags = ["--do_train", "--do_eval", "--validation_split_percentage", "20", "--block_size", "32", "--max_steps", "4"];
    let run = train(
        &cache,
        &[
            &["--model_name_or_path", &s(&base), "--train_file", &s(&source_dir()), "--output_dir", &s(&out)],
            &flags[..],
            &["--per_device_train_batch_size", "2", "--logging_steps", "1", "--eval_steps", "2", "--completion_eval_positions", "12"],
        ]
        .concat(),
    );
    let err = stderr(&run);
    assert!(run.status.success(), "{err}");
    let table = String::from_utf8_lossy(&run.stdout);
    assert!(table.contains("| 12 positions | base | fine-tuned |"), "the table is printed: {table}");
    assert!(err.contains(&format!("report: {}", out.canonicalize().unwrap().join("report.html").display())), "{err}");

    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("completion_eval.json")).unwrap()).unwrap();
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(out.join("predictions.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(summary["positions"], 12);
    assert_eq!(lines.len(), 24, "one line per position and model");
    for model in ["base", "fine_tuned"] {
        let mine: Vec<&serde_json::Value> = lines.iter().filter(|l| l["model"] == model).collect();
        for key in ["exact_match", "edit_similarity"] {
            let mean = mine.iter().map(|l| l[key].as_f64().unwrap()).sum::<f64>() / mine.len() as f64;
            assert!((summary["models"][model][key].as_f64().unwrap() - mean).abs() < 1e-9, "{model} {key} is the mean of the lines");
        }
        assert!(mine.iter().all(|l| l["url"].as_str().is_some_and(|u| u.ends_with(".rs"))), "urls are the source paths");
    }

    // One path per curve, with one point per metrics.jsonl row that has the value.
    let records: Vec<serde_json::Value> =
        std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let curves = report_curves(&out.join("report.html"));
    for key in ["loss", "eval_loss", "learning_rate", "tokens_per_second"] {
        let rows = records.iter().filter(|r| r.get(key).is_some()).count();
        assert!(rows > 0, "{key}");
        assert_eq!(curves[key].as_u64(), Some(rows as u64), "{key}: {curves}");
    }
    // `coordinator report` rewrites it for any run dir.
    std::fs::remove_file(out.join("report.html")).unwrap();
    let again = Command::new(binary("coordinator")).args(["report", &s(&out)]).output().unwrap();
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(report_curves(&out.join("report.html")), curves);
}
