//! `worker eval` through the real binary: its predictions equal HF `generate` for every position
//! with the same prompts (CodeGen and the Llama decoder family), its files agree, its positions are seeded, and bad input is refused
//! with the file or flag named. (The metrics against rapidfuzz: worker/tests/eval_metrics.rs.)

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{binary, fixtures, s, stderr};
use serde_json::{json, Value};

/// Small code documents, each with a url, as JSON Lines.
fn documents(dir: &Path) -> std::path::PathBuf {
    let docs = [
        (
            "pkg/stack.py",
            "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n        self.items.append(x)\n",
        ),
        ("pkg/add.py", "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n"),
        ("src/main.rs", "fn main() {\n    println!(\"hello\");\n    let x = 1;\n}\n"),
        ("run.py", "import os\nimport sys\n\nprint(os.getcwd())\nfor i in range(10):\n    print(i * i)\n"),
    ];
    let path = dir.join("docs.jsonl");
    let lines: Vec<String> = docs.iter().map(|(url, text)| json!({"url": url, "text": text}).to_string()).collect();
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

fn eval(args: &[&str]) -> Output {
    let out = Command::new(binary("worker")).arg("eval").args(["--device", "cpu", "--max_new_tokens", "16"]).args(args).output().unwrap();
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
    out
}

fn read_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn predictions_equal_hf_generate_for_every_position_and_the_files_agree() {
    assert_predictions_equal_hf(&fixtures().join("tiny-decode"), &fixtures().join("tiny"));
}

/// The same, unchanged, for the Llama decoder family: a Qwen2 (tied, one KV head, a window)
/// against a Llama base (grouped KV heads, biases), sharing the fixtures' tokenizer.
#[test]
fn the_decoder_family_evaluates_as_hf_generates() {
    assert_predictions_equal_hf(&fixtures().join("decoders/qwen2"), &fixtures().join("decoders/llama"));
}

/// `worker eval` of `model` against `base` on `documents()`: every prediction is HF's greedy next
/// line, and the summary is the mean of the lines.
fn assert_predictions_equal_hf(model: &Path, base: &Path) {
    let tmp = tempfile::tempdir().unwrap();
    let docs = documents(tmp.path());
    let out = tmp.path().join("out");
    let (model, base) = (model.to_path_buf(), base.to_path_buf());
    let run = eval(&["--model", &s(&model), "--base", &s(&base), "--validation_file", &s(&docs), "--output_dir", &s(&out)]);
    assert!(run.status.success(), "{}", stderr(&run));
    let err = stderr(&run);
    assert!(err.contains("fewer than --num_positions 200: evaluating all of them"), "{err}");
    let table = String::from_utf8_lossy(&run.stdout);
    assert!(table.contains("| base | fine-tuned |") && table.contains("| exact match % |"), "{table}");

    let predictions = read_lines(&out.join("predictions.jsonl"));
    let summary: Value = serde_json::from_str(&std::fs::read_to_string(out.join("completion_eval.json")).unwrap()).unwrap();
    let positions = summary["positions"].as_u64().unwrap() as usize;
    assert_eq!(positions, 14, "every non-blank line after each document's first");
    assert_eq!(predictions.len(), 2 * positions);
    let python = std::env::var("ZEROTUNE_PYTHON").expect("ZEROTUNE_PYTHON is set by scripts/test.sh");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/hf_next_lines.py");
    for (name, dir) in [("fine_tuned", &model), ("base", &base)] {
        let mine: Vec<&Value> = predictions.iter().filter(|p| p["model"] == name).collect();
        // The context is 64: prompts keep their last 64 - 16 tokens.
        let hf = Command::new(&python)
            .args([script, &s(dir), &s(&docs), &s(&out.join("predictions.jsonl")), name, "48", "16"])
            .output()
            .unwrap();
        assert!(hf.status.success(), "{}", String::from_utf8_lossy(&hf.stderr));
        let theirs: Vec<String> = serde_json::from_slice(&hf.stdout).unwrap();
        assert_eq!(mine.len(), theirs.len());
        for (p, want) in mine.iter().zip(&theirs) {
            assert_eq!(p["prediction"].as_str().unwrap(), want, "{name} {}:{}", p["url"], p["line"]);
        }
        // The summary is the mean of the lines.
        let mean = |key: &str| mine.iter().map(|p| p[key].as_f64().unwrap()).sum::<f64>() / mine.len() as f64;
        let scores = &summary["models"][name];
        for key in ["exact_match", "edit_similarity"] {
            assert!((scores[key].as_f64().unwrap() - mean(key)).abs() < 1e-9, "{name} {key}");
        }
        assert!((scores["perplexity"].as_f64().unwrap() - scores["loss"].as_f64().unwrap().exp()).abs() < 1e-9);
    }
    let distinct: std::collections::BTreeSet<&str> = predictions.iter().map(|p| p["prediction"].as_str().unwrap()).collect();
    assert!(distinct.len() > 3, "the predictions differ between positions: {distinct:?}");
}

#[test]
fn positions_are_seeded_and_bad_input_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let docs = documents(tmp.path());
    let model = s(&fixtures().join("tiny-decode"));
    let positions = |seed: &str, name: &str| {
        let out = tmp.path().join(name);
        let run =
            eval(&["--model", &model, "--validation_file", &s(&docs), "--output_dir", &s(&out), "--num_positions", "6", "--seed", seed]);
        assert!(run.status.success(), "{}", stderr(&run));
        read_lines(&out.join("predictions.jsonl")).iter().map(|p| format!("{}:{}", p["url"], p["line"])).collect::<Vec<_>>()
    };
    let first = positions("0", "a");
    assert_eq!(first.len(), 6);
    assert_eq!(first, positions("0", "b"), "the same seed, the same positions");
    assert_ne!(first, positions("1", "c"), "another seed, other positions");
    let urls: std::collections::BTreeSet<&str> = first.iter().map(|p| p.split(':').next().unwrap()).collect();
    assert_eq!(urls.len(), 4, "spread over every document: {first:?}");

    let empty = tmp.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let run = eval(&["--model", &model, "--validation_file", &s(&empty), "--output_dir", &s(&tmp.path().join("e"))]);
    assert!(!run.status.success());
    assert!(stderr(&run).contains("empty.jsonl: holds no documents"), "{}", stderr(&run));
    let big = s(&fixtures().join("tokenizer-big"));
    let run = eval(&["--model", &model, "--base", &big, "--validation_file", &s(&docs), "--output_dir", &s(&tmp.path().join("t"))]);
    assert!(!run.status.success());
    let err = stderr(&run);
    assert!(err.contains(&format!("--base {big} and --model {model} have different tokenizers")), "{err}");
    assert!(!tmp.path().join("t").exists(), "nothing is written");
}
