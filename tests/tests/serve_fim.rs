//! `worker serve` infilling through `/v1/completions`: a model whose tokenizer holds Qwen2.5-Coder's
//! FIM tokens answers a `suffix` (the openai SDK) and a prompt that a client rendered in
//! StarCoder's format with HF `generate`'s greedy text on the Qwen rendering made by hand; a model
//! without FIM tokens says so at startup and completes the prefix alone.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::fixtures;
use common::server::Server;
use serde_json::{json, Value};

const QWEN_FIM: [&str; 7] =
    ["<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<|endoftext|>"];

fn python() -> String {
    std::env::var("ZEROTUNE_PYTHON").expect("ZEROTUNE_PYTHON (the test venv's python) is set by scripts/test.sh")
}

/// The fixture Qwen2 with Qwen2.5-Coder's FIM tokens added to its tokenizer (special, in rows
/// the embedding already has) and the files AutoTokenizer reads.
fn fim_model(to: &Path) -> PathBuf {
    let from = fixtures().join("decoders").join("qwen2");
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(&from).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
    }
    let file = to.join("tokenizer.json");
    let mut tokenizer: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let vocab = tokenizer["model"]["vocab"].as_object().unwrap();
    let mut next = vocab.values().map(|v| v.as_u64().unwrap()).max().unwrap() + 1;
    let added = tokenizer["added_tokens"].as_array_mut().unwrap();
    for token in QWEN_FIM {
        if added.iter().all(|t| t["content"] != token) {
            added.push(json!({"id": next, "content": token, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}));
            next += 1;
        }
    }
    let config: Value = serde_json::from_str(&std::fs::read_to_string(to.join("config.json")).unwrap()).unwrap();
    assert!(next <= config["vocab_size"].as_u64().unwrap(), "the embedding has rows for the added tokens");
    std::fs::write(&file, tokenizer.to_string()).unwrap();
    let tokenizer_config = json!({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "add_bos_token": false});
    std::fs::write(to.join("tokenizer_config.json"), tokenizer_config.to_string()).unwrap();
    to.to_path_buf()
}

/// HF's greedy texts (8 new tokens, stopping at `<|endoftext|>` or `<|fim_pad|>`) after `prompts`.
fn hf_texts(model: &Path, prompts: &[String]) -> Vec<Value> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/hf_fim.py");
    let ends = json!(["<|endoftext|>", "<|fim_pad|>"]).to_string();
    let out = Command::new(python()).args([script, &model.to_string_lossy(), &json!(prompts).to_string(), "8", &ends]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let results: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    for r in &results {
        assert!(r["min_margin"].as_f64().unwrap() > 1e-4, "a near tie in HF's greedy choice: {r}");
    }
    results
}

/// The openai SDK's completions of `cases` ({prompt, suffix}), plain and streamed.
fn sdk(server: &Server, cases: &Value) -> Vec<Value> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/openai_fim.py");
    let out = Command::new(python()).args([script, &format!("http://{}/v1", server.addr), &cases.to_string()]).output().unwrap();
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), server.log().join("\n"));
    serde_json::from_slice(&out.stdout).unwrap()
}

const SIDES: [(&str, &str); 3] = [("def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"), ("x = ", ""), ("", "return y\n")];

#[test]
fn a_suffix_or_another_familys_rendering_gets_hf_greedy_infilling() {
    let dir = tempfile::tempdir().unwrap();
    let model = fim_model(&dir.path().join("qwen-fim"));
    let server = Server::start_model(&model, &[], &[]);
    server.wait_for_log("infilling");
    assert!(server.log().iter().any(|l| l.contains("rendered in the qwen format")), "{:?}", server.log());
    let models: Value = serde_json::from_str(&common::http::get(&server.addr, "/v1/models").body).unwrap();
    assert_eq!((&models["data"][0]["infill"], &models["data"][0]["fim_format"]), (&json!(true), &json!("qwen")));
    // By hand, as Qwen2.5-Coder's README writes it.
    let rendered: Vec<String> = SIDES.iter().map(|(p, s)| format!("<|fim_prefix|>{p}<|fim_suffix|>{s}<|fim_middle|>")).collect();
    let want = hf_texts(&model, &rendered);
    let mut cases: Vec<Value> = SIDES.iter().map(|(p, s)| json!({"prompt": p, "suffix": s})).collect();
    // Continue's default template for an unknown model name: StarCoder's sentinels, no suffix field.
    cases.extend(SIDES.iter().map(|(p, s)| json!({"prompt": format!("<fim_prefix>{p}<fim_suffix>{s}<fim_middle>"), "suffix": null})));
    let got = sdk(&server, &json!(cases));
    for (i, (got, case)) in got.iter().zip(&cases).enumerate() {
        let want = &want[i % SIDES.len()];
        assert_eq!(got["text"], want["text"], "{case}: {got} vs HF {want}");
        assert_eq!(got["streamed"], want["text"], "{case}: streamed");
        assert_eq!(got["prompt_tokens"], json!(want["prompt_ids"].as_array().unwrap().len()), "{case}");
    }
}

#[test]
fn a_model_without_fim_tokens_is_served_prefix_only() {
    let model = fixtures().join("decoders").join("qwen2");
    let server = Server::start_model(&model, &[], &[]);
    server.wait_for_log("prefix-only");
    let models: Value = serde_json::from_str(&common::http::get(&server.addr, "/v1/models").body).unwrap();
    assert_eq!((&models["data"][0]["infill"], &models["data"][0]["fim_format"]), (&json!(false), &Value::Null));
    let prefix = SIDES[0].0;
    let cases = json!([
        {"prompt": prefix, "suffix": null},
        {"prompt": prefix, "suffix": SIDES[0].1},
        {"prompt": format!("<fim_prefix>{prefix}<fim_suffix>{}<fim_middle>", SIDES[0].1), "suffix": null},
    ]);
    let got = sdk(&server, &cases);
    assert!(!got[0]["text"].as_str().unwrap().is_empty());
    for case in &got[1..] {
        assert_eq!((&case["text"], &case["prompt_tokens"]), (&got[0]["text"], &got[0]["prompt_tokens"]), "{case}");
    }
    // A format forced on it is refused by name, before listening.
    let out = Command::new(common::binary("worker"))
        .args(["serve", "--model", &model.to_string_lossy(), "--port", "0", "--device", "cpu", "--fim_format", "starcoder"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("no token \"<fim_prefix>\" for the starcoder FIM format"), "{stderr}");
    let out = Command::new(common::binary("worker"))
        .args(["serve", "--model", &model.to_string_lossy(), "--fim_format", "fim"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("qwen, starcoder, deepseek, codellama, codegen2"), "{stderr}");
}

/// Tabby's `openai/completion` backend's exact body (reference: `http-api-bindings`): a 200
/// `text/event-stream` whose every event parses as `{"choices":[{"text", "finish_reason"}]}`,
/// the first non-null `finish_reason` in the last event before `[DONE]` (Tabby stops there, and
/// panics on a `[DONE]` before it).
#[test]
fn tabbys_openai_completion_body_gets_the_stream_it_reads() {
    let dir = tempfile::tempdir().unwrap();
    let fim = fim_model(&dir.path().join("qwen-fim"));
    // Room for Tabby's 64 new tokens after the prompt (the fixture's context is 64; rope has no
    // learned positions to run out of).
    let model = common::model_with(&fim, &dir.path().join("qwen-fim-512"), "max_position_embeddings", json!(512));
    let server = Server::start_model(&model, &[], &[]);
    let (prefix, suffix) = SIDES[0];
    let body = json!({"model": "qwen-fim", "prompt": prefix, "suffix": suffix, "max_tokens": 64, "temperature": 0.1, "stream": true, "presence_penalty": 0.0});
    let reply = server.post("/v1/completions", body);
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(reply.header("content-type").is_some_and(|v| v.starts_with("text/event-stream")), "{:?}", reply.headers);
    let events: Vec<&str> = reply.body.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{}", reply.body);
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert!(chunks.iter().all(|c| c["choices"][0]["text"].is_string()), "{chunks:?}");
    let finished: Vec<usize> = (0..chunks.len()).filter(|&i| !chunks[i]["choices"][0]["finish_reason"].is_null()).collect();
    assert_eq!(finished, [chunks.len() - 1], "{chunks:?}");
}
