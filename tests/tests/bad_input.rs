//! Bad input gets a clear error naming the file, line or flag, exits non-zero without a panic
//! backtrace, and leaves nothing half-written.

mod common;

use std::path::Path;

use common::{fixtures, s, source_dir, stderr, train};

/// Runs a from-scratch training with `extra` flags over `data`, expecting failure mentioning `want`.
fn refuses(data: &Path, extra: &[&str], want: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let mut args =
        vec!["--train_file".to_string(), s(data), "--output_dir".into(), s(&out), "--do_train".into(), "--max_steps".into(), "2".into()];
    if !extra.contains(&"--model_name_or_path") {
        args.extend(["--config_name", "tiny", "--train_tokenizer", "300"].map(String::from));
    }
    if !extra.contains(&"--block_size") {
        args.extend(["--block_size", "16"].map(String::from));
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = train(&tmp.path().join("cache"), &argv);
    let err = stderr(&run);
    assert!(!run.status.success(), "expected a failure for {extra:?}");
    assert!(err.contains(want), "expected {want:?} in:\n{err}");
    assert!(!out.exists(), "a failed start must not create the output dir");
}

fn jsonl(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("data.jsonl");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn malformed_json_line_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let data = jsonl(tmp.path(), "{\"text\": \"fn a() {}\"}\n{\"text\": \"fn b() {}\"\n");
    refuses(&data, &[], "data.jsonl:2: malformed JSON");
}

#[test]
fn missing_text_column_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let data = jsonl(tmp.path(), "{\"code\": \"fn a() {}\"}\n");
    refuses(&data, &[], "data.jsonl:1: no \"text\" column (set --text_column_name)");
}

#[test]
fn empty_dataset_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = jsonl(tmp.path(), "");
    refuses(&data, &[], "has no documents");
}

#[test]
fn block_size_above_context_is_refused() {
    refuses(&source_dir(), &["--block_size", "4096"], "--block_size 4096 is above the model's context of 512 tokens");
}

#[test]
fn model_dir_without_weights_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    std::fs::create_dir(&model).unwrap();
    std::fs::copy(fixtures().join("tiny/config.json"), model.join("config.json")).unwrap();
    std::fs::copy(fixtures().join("tiny/tokenizer.json"), model.join("tokenizer.json")).unwrap();
    refuses(&source_dir(), &["--model_name_or_path", &s(&model)], "no model weights found");
}

#[test]
fn tokenizer_larger_than_the_embedding_is_refused() {
    let args = ["--model_name_or_path", &s(&fixtures().join("tiny")), "--tokenizer_name", &s(&fixtures().join("tokenizer-big"))];
    refuses(&source_dir(), &args, "the tokenizer has 1100 ids but");
}

#[test]
fn non_empty_output_dir_needs_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "precious").unwrap();
    let run = train(
        &tmp.path().join("cache"),
        &["--config_name", "tiny", "--train_tokenizer", "300", "--train_file", &s(&source_dir()), "--output_dir", &s(&out), "--do_train"],
    );
    assert!(!run.status.success());
    assert!(stderr(&run).contains("--output_dir") && stderr(&run).contains("--overwrite_output_dir"), "{}", stderr(&run));
    assert_eq!(std::fs::read_to_string(out.join("keep.txt")).unwrap(), "precious");
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
}

#[test]
fn a_loss_that_turns_nan_stops_and_keeps_the_last_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let run = train(
        &tmp.path().join("cache"),
        &[
            "--config_name",
            "tiny",
            "--train_tokenizer",
            "300",
            "--train_file",
            &s(&source_dir()),
            "--output_dir",
            &s(&out),
            "--do_train",
            "--block_size",
            "16",
            "--per_device_train_batch_size",
            "2",
            "--max_steps",
            "5",
            "--learning_rate",
            "1e30",
            "--lr_scheduler_type",
            "constant",
            "--max_grad_norm",
            "0",
            "--save_steps",
            "1",
        ],
    );
    let err = stderr(&run);
    assert!(!run.status.success(), "{err}");
    assert!(err.contains("worker rank 0") && err.contains("the loss became"), "{err}");
    assert_eq!(std::fs::read_to_string(out.join("latest")).unwrap(), "checkpoint-1\n");
    assert!(out.join("checkpoint-1/model/model.safetensors").is_file());
    assert!(!out.join("model.safetensors").exists(), "no final model after a failed run");
}

#[test]
fn numbers_out_of_range_are_refused_before_anything_is_written() {
    // Negative values parse as values (not as unknown flags) and are then refused, with the reason.
    refuses(&source_dir(), &["--learning_rate", "-1"], "--learning_rate -1: must be above 0");
    refuses(&source_dir(), &["--learning_rate", "NaN"], "--learning_rate NaN: must be above 0");
    refuses(&source_dir(), &["--max_grad_norm", "NaN"], "--max_grad_norm NaN");
    refuses(&source_dir(), &["--adam_beta2", "1"], "--adam_beta2 1: must be in [0, 1)");
}

#[test]
fn sampling_flags_out_of_range_are_refused_without_a_panic() {
    for (flag, value, want) in [
        ("--temperature", "NaN", "--temperature NaN: must be a finite number"),
        ("--temperature", "inf", "--temperature inf"),
        ("--temperature", "-1", "--temperature -1"),
        ("--top_p", "2", "--top_p 2: must be in (0, 1]"),
        ("--top_p", "0", "--top_p 0"),
        ("--top_p", "-1", "--top_p -1"),
    ] {
        let run = std::process::Command::new(common::binary("worker"))
            .args(["generate", "--model", &s(&fixtures().join("tiny")), "--prompt", "def", "--max_new_tokens", "2", flag, value])
            .output()
            .unwrap();
        let err = stderr(&run);
        assert_eq!(run.status.code(), Some(1), "{flag} {value}: {err}");
        assert!(err.contains(want) && !err.contains("panicked"), "{flag} {value}: {err}");
    }
}
