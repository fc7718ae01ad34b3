//! Data hygiene with the real binaries over tests/fixtures/hygiene.py's trees: planted secrets of
//! every rule are redacted everywhere (JSONL, output dir, decoded token cache) or stop the job
//! naming `file:line rule` with nothing written; ordinary code gives no finding; near duplicates
//! follow the Jaccard similarity computed in Python, the same on any thread count; a validation
//! file copied into training is removed from validation; a huge document is cut with a count;
//! a tokenizer without `<|endoftext|>` is refused naming its file. No test prints a canary value.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{binary, fixtures, s, stderr, train};

/// tests/fixtures/hygiene.py's trees, written into a fresh directory.
fn hygiene_fixtures(dir: &Path) -> PathBuf {
    let python = std::env::var("ZEROTUNE_PYTHON").expect("ZEROTUNE_PYTHON (the test venv's python) is set by scripts/test.sh");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/hygiene.py");
    let out = dir.join("hygiene");
    let run = Command::new(python).arg(script).arg(&out).output().unwrap();
    assert!(run.status.success(), "hygiene.py failed: {}", stderr(&run));
    out
}

/// (rule, file, line, value) of each planted canary.
fn canaries(fx: &Path) -> Vec<(String, String, u64, String)> {
    let list: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fx.join("canaries.json")).unwrap()).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["rule"].as_str().unwrap().into(),
                c["file"].as_str().unwrap().into(),
                c["line"].as_u64().unwrap(),
                c["value"].as_str().unwrap().into(),
            )
        })
        .collect()
}

fn coordinator(args: &[&str]) -> Output {
    let out = Command::new(binary("coordinator")).args(args).output().unwrap();
    assert!(!stderr(&out).contains("panicked"), "a panic reached the user:\n{}", stderr(&out));
    out
}

/// Fails naming the rule and the place where a canary value shows up, never the value.
fn assert_no_canary(bytes: &[u8], canaries: &[(String, String, u64, String)], place: &str) {
    for (rule, file, line, value) in canaries {
        let found = bytes.windows(value.len()).any(|w| w == value.as_bytes());
        assert!(!found, "the {rule} canary of {file}:{line} appears in {place}");
    }
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// The text of every block in a token cache (header: magic, block, width, train, validation).
fn decode_cache(path: &Path, tokenizer_dir: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    let width = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    let ids: Vec<u32> = bytes[32..]
        .chunks_exact(width)
        .map(|b| if width == 2 { u16::from_le_bytes([b[0], b[1]]) as u32 } else { u32::from_le_bytes(b.try_into().unwrap()) })
        .collect();
    zerotune_hf::tokenizer::load(tokenizer_dir).unwrap().decode(&ids, false).unwrap()
}

#[test]
fn secrets_fail_names_every_canary_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = hygiene_fixtures(tmp.path());
    let canaries = canaries(&fx);
    let jsonl = tmp.path().join("out.jsonl");
    let run = coordinator(&["files2jsonl", &s(&fx.join("canary")), &s(&jsonl), "--secrets", "fail"]);
    let err = stderr(&run);
    assert!(!run.status.success());
    assert!(!jsonl.exists(), "--secrets fail must write nothing");
    for (rule, file, line, _) in &canaries {
        assert!(err.contains(&format!("{file}:{line} {rule}")), "files2jsonl does not name {file}:{line} {rule}:\n{err}");
    }
    assert_no_canary(err.as_bytes(), &canaries, "files2jsonl's error");

    let (out, cache) = (tmp.path().join("run"), tmp.path().join("cache"));
    let tiny = fixtures().join("tiny");
    let args = ["--model_name_or_path", &s(&tiny), "--train_file", &s(&fx.join("canary")), "--output_dir", &s(&out)];
    let run = train(&cache, &[&args[..], &["--do_train", "--block_size", "16", "--max_steps", "1", "--secrets", "fail"]].concat());
    let err = stderr(&run);
    assert!(!run.status.success());
    for (rule, file, line, _) in &canaries {
        assert!(err.contains(&format!("{file}:{line} {rule}")), "train does not name {file}:{line} {rule}:\n{err}");
    }
    assert_no_canary(err.as_bytes(), &canaries, "train's error");
    assert!(!out.exists(), "--secrets fail must not create the output dir");
    assert!(!cache.exists() || files_under(&cache).is_empty(), "--secrets fail must not write a token cache");
}

#[test]
fn redacted_canaries_reach_neither_the_jsonl_nor_the_output_dir_nor_the_token_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = hygiene_fixtures(tmp.path());
    let canaries = canaries(&fx);
    let jsonl = tmp.path().join("out.jsonl");
    let run = coordinator(&["files2jsonl", &s(&fx.join("canary")), &s(&jsonl)]);
    assert!(run.status.success(), "{}", stderr(&run));
    let text = std::fs::read(&jsonl).unwrap();
    assert_no_canary(&text, &canaries, "the JSONL");
    let summary = String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(summary.contains(&format!("secrets: {} in", canaries.len())), "{summary}");
    assert_no_canary(&run.stdout, &canaries, "files2jsonl's summary");
    for (rule, ..) in &canaries {
        assert!(String::from_utf8_lossy(&text).contains(&format!("<SECRET:{rule}>")), "no <SECRET:{rule}> placeholder in the JSONL");
    }

    let (out, cache) = (tmp.path().join("run"), tmp.path().join("cache"));
    let tiny = fixtures().join("tiny");
    let args = ["--model_name_or_path", &s(&tiny), "--train_file", &s(&fx.join("canary")), "--output_dir", &s(&out)];
    let flags = ["--do_train", "--block_size", "16", "--max_steps", "1", "--per_device_train_batch_size", "2"];
    let run = train(&cache, &[&args[..], &flags].concat());
    assert!(run.status.success(), "{}", stderr(&run));
    assert_no_canary(&run.stderr, &canaries, "train's log");
    assert_no_canary(&run.stdout, &canaries, "train's output");
    for file in files_under(&out) {
        assert_no_canary(&std::fs::read(&file).unwrap(), &canaries, &s(&file));
    }
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("data_report.json")).unwrap()).unwrap();
    assert_eq!(report["secrets"]["findings"].as_array().unwrap().len(), canaries.len(), "{report}");
    assert_eq!(report["secrets"]["values_redacted"].as_u64().unwrap() as usize, canaries.len());
    let tokens: Vec<PathBuf> = files_under(&cache).into_iter().filter(|p| p.extension().is_some_and(|e| e == "tokens")).collect();
    assert_eq!(tokens.len(), 1, "one token cache");
    assert_no_canary(&std::fs::read(&tokens[0]).unwrap(), &canaries, "the token cache's bytes");
    let decoded = decode_cache(&tokens[0], &tiny);
    assert_no_canary(decoded.as_bytes(), &canaries, "the decoded token cache");
    assert!(decoded.contains("<SECRET:"), "the redacted documents are in the token cache");
}

#[test]
fn no_false_positive_on_this_repository_or_realistic_non_secrets() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = hygiene_fixtures(tmp.path());
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut documents = 0;
    for (name, dir) in [("this repository", repo), ("realistic non-secrets", fx.join("fp"))] {
        let run = coordinator(&["files2jsonl", &s(&dir), &s(&tmp.path().join("fp.jsonl")), "--secrets", "fail"]);
        assert!(run.status.success(), "false positives in {name}:\n{}", stderr(&run));
        let out = String::from_utf8_lossy(&run.stdout).into_owned();
        assert!(out.contains("secrets: none found"), "{out}");
        documents += out.lines().find_map(|l| l.strip_prefix("kept ")?.split(' ').next()?.parse::<usize>().ok()).unwrap();
    }
    eprintln!("false positives: 0 in {documents} documents");
    assert!(documents > 100);
}

#[test]
fn near_duplicates_follow_the_python_jaccard_on_any_thread_count() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = hygiene_fixtures(tmp.path());
    let pairs: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fx.join("neardup/pairs.json")).unwrap()).unwrap();
    let mut outputs = vec![];
    for threads in ["1", "2", "4"] {
        let jsonl = tmp.path().join(format!("nd{threads}.jsonl"));
        let run = Command::new(binary("coordinator"))
            .args(["files2jsonl", &s(&fx.join("neardup")), &s(&jsonl), "--extensions", "py"])
            .env("RAYON_NUM_THREADS", threads)
            .output()
            .unwrap();
        assert!(run.status.success(), "{}", stderr(&run));
        outputs.push(std::fs::read_to_string(&jsonl).unwrap());
    }
    assert!(outputs.iter().all(|o| *o == outputs[0]), "the kept documents differ between thread counts");
    let urls: Vec<String> =
        outputs[0].lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["url"].as_str().unwrap().to_string()).collect();
    for pair in pairs.as_array().unwrap() {
        let (a, b, j) = (pair["a"].as_str().unwrap(), pair["b"].as_str().unwrap(), pair["jaccard"].as_f64().unwrap());
        assert!(urls.iter().any(|u| u == a), "{a} (the shorter name) must be kept; Jaccard {j:.3}");
        let b_kept = urls.iter().any(|u| u == b);
        if j >= 0.85 {
            assert!(!b_kept, "{b} has Jaccard {j:.3} >= 0.85 with {a} and was not removed");
        } else {
            assert!(j < 0.75, "the fixture pairs are well above or well below the threshold: {j:.3}");
            assert!(b_kept, "{b} has Jaccard {j:.3} < 0.85 with {a} and was removed");
        }
    }
    // --dedup exact keeps them all (no two are byte-equal after line endings).
    let jsonl = tmp.path().join("exact.jsonl");
    let run = coordinator(&["files2jsonl", &s(&fx.join("neardup")), &s(&jsonl), "--extensions", "py", "--dedup", "exact"]);
    assert!(run.status.success());
    assert_eq!(std::fs::read_to_string(&jsonl).unwrap().lines().count(), 2 * pairs.as_array().unwrap().len());
}

/// `coordinator tokenize` with the tiny tokenizer; returns (its output, its data report).
fn tokenize(cache: &Path, args: &[&str]) -> (Output, Option<serde_json::Value>) {
    let tiny = fixtures().join("tiny");
    let base = ["tokenize", "--tokenizer_name", &s(&tiny), "--cache_dir", &s(cache)];
    let block: &[&str] = if args.contains(&"--block_size") { &[] } else { &["--block_size", "16"] };
    let run = coordinator(&[&base[..], block, args].concat());
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    let report = stdout.split("(report ").nth(1).map(|r| r.trim_end().trim_end_matches(')').to_string());
    let report = report.map(|p| serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap());
    (run, report)
}

#[test]
fn a_validation_file_copied_into_training_with_one_line_changed_is_removed_from_validation() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = hygiene_fixtures(tmp.path());
    let cache = tmp.path().join("cache");
    let data = ["--train_file", &s(&fx.join("leak/train")), "--validation_file", &s(&fx.join("leak/val"))];
    let (run, report) = tokenize(&cache, &data);
    assert!(run.status.success(), "{}", stderr(&run));
    let report = report.unwrap();
    assert_eq!(report["leakage"]["near"], 1, "{report}");
    assert_eq!(report["leakage"]["removed"][0]["name"], "holdout.py");
    assert_eq!(report["leakage"]["removed"][0]["kept"], "pkg/holdout_copy.py");
    assert_eq!(report["validation_documents"], 1);
    assert_eq!(report["skipped"]["validation_leak"], 1);
    assert!(stderr(&run).contains("1 validation leaks removed (0 exact, 1 near)"), "{}", stderr(&run));
    // The hygiene settings are part of the token cache key: another setting, another cache.
    let (run, report) = tokenize(&cache, &[&data[..], &["--dedup", "exact"]].concat());
    assert!(run.status.success(), "{}", stderr(&run));
    assert_eq!(report.unwrap()["validation_documents"], 2, "--dedup exact does not see the near copy");
    let (run, _) = tokenize(&cache, &[&data[..], &["--dedup_threshold", "0.9"]].concat());
    assert!(run.status.success());
    let caches = files_under(&cache).into_iter().filter(|p| p.extension().is_some_and(|e| e == "tokens")).count();
    assert_eq!(caches, 3, "each hygiene setting has its own token cache");
}

#[test]
fn a_huge_document_is_cut_with_a_count_and_a_tiny_training_split_is_refused_before_tokenizing() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let doc: String = (0..60_000).map(|i| format!("    total_{i} = compute(total, {i}) + offset  # line {i}\n")).collect();
    assert!(doc.len() > 3_000_000 && doc.len() < 4_000_000);
    let jsonl = tmp.path().join("huge.jsonl");
    let small = "{\"text\": \"def f():\\n    return 1\\n\"}\n";
    std::fs::write(&jsonl, format!("{}\n{small}", serde_json::json!({ "text": doc }))).unwrap();
    let (run, report) =
        tokenize(&cache, &["--train_file", &s(&jsonl), "--max_document_bytes", "1000000", "--validation_split_percentage", "0"]);
    assert!(run.status.success(), "{}", stderr(&run));
    let report = report.unwrap();
    assert_eq!(report["cut"]["documents_cut"], 1, "{report}");
    assert_eq!(report["cut"]["pieces"], 4);
    assert_eq!(report["train_documents"], 5);
    assert!(stderr(&run).contains("cut: 1 documents above --max_document_bytes 1000000 into 4 pieces"), "{}", stderr(&run));

    std::fs::write(&jsonl, small).unwrap();
    let started = std::time::Instant::now();
    let (run, _) = tokenize(&cache, &["--train_file", &s(&jsonl), "--block_size", "1024"]);
    let err = stderr(&run);
    assert!(!run.status.success());
    assert!(err.contains("cannot make one block of 1024 tokens"), "{err}");
    assert!(!err.contains("tokenized"), "refused before tokenizing:\n{err}");
    assert!(started.elapsed().as_secs() < 30);
}

#[test]
fn a_tokenizer_without_endoftext_is_refused_naming_its_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("wordpiece");
    std::fs::create_dir(&dir).unwrap();
    let added = |id: u32, content: &str| serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true});
    let vocab: serde_json::Map<String, serde_json::Value> =
        ["[UNK]", "[SEP]", "def", "return", "f", "(", ")", ":", "1"].iter().enumerate().map(|(i, t)| (t.to_string(), i.into())).collect();
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [added(0, "[UNK]"), added(1, "[SEP]")],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##", "max_input_chars_per_word": 100, "vocab": vocab}
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let jsonl = tmp.path().join("d.jsonl");
    std::fs::write(&jsonl, "{\"text\": \"def f(): return 1\"}\n".repeat(20)).unwrap();
    let file = s(&dir.join("tokenizer.json"));
    let run = coordinator(&[
        "tokenize",
        "--tokenizer_name",
        &s(&dir),
        "--block_size",
        "4",
        "--train_file",
        &s(&jsonl),
        "--dedup",
        "none",
        "--cache_dir",
        &s(&tmp.path().join("c")),
    ]);
    assert!(!run.status.success());
    assert!(stderr(&run).contains(&format!("{file}: the tokenizer has no <|endoftext|> token")), "{}", stderr(&run));
    let out = tmp.path().join("run");
    let args = ["--model_name_or_path", &s(&fixtures().join("tiny")), "--tokenizer_name", &s(&dir), "--train_file", &s(&jsonl)];
    let run = train(
        &tmp.path().join("c"),
        &[&args[..], &["--output_dir", &s(&out), "--do_train", "--block_size", "4", "--dedup", "none"]].concat(),
    );
    assert!(!run.status.success());
    assert!(stderr(&run).contains(&format!("{file}: the tokenizer has no <|endoftext|> token")), "{}", stderr(&run));
    assert!(!out.exists());
}
