//! `worker serve` for the Llama decoder family: the official openai SDK gets HF `generate`'s
//! greedy text and log-probabilities, plain and streamed, from a tied multi-query Qwen2 with a
//! sliding window and an untied grouped-query Llama (tests/fixtures: meta.json
//! "decoder_serve"); 8 concurrent clients, decoding in one batch, each get the text they get alone;
//! the FauxPilot extension's exact request is answered.

mod common;

use std::process::Command;

use common::server::{eight_clients_get_the_text_of, Server};
use common::{fixtures, http, model_with};
use serde_json::{json, Value};
use zerotune_tests::meta;

const FAMILY: [&str; 2] = ["qwen2", "llama"];

fn cases(name: &str) -> Vec<Value> {
    meta()["decoder_serve"][name].as_array().unwrap().clone()
}

#[test]
fn the_openai_sdk_gets_hf_greedy_text_and_logprobs_from_each_family() {
    let python = std::env::var("ZEROTUNE_PYTHON").expect("ZEROTUNE_PYTHON (the test venv's python) is set by scripts/test.sh");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/openai_completions.py");
    for name in FAMILY {
        let server = Server::start_model(&fixtures().join("decoders").join(name), &[], &[]);
        let cases = cases(name);
        let prompts: Vec<&Value> = cases.iter().map(|c| &c["prompt"]).collect();
        let out =
            Command::new(&python).args([script, &format!("http://{}/v1", server.addr), &json!(prompts).to_string()]).output().unwrap();
        assert!(out.status.success(), "{name}: {}\n{}", String::from_utf8_lossy(&out.stderr), server.log().join("\n"));
        let result: Value = serde_json::from_slice(&out.stdout).unwrap();
        for (got, want) in result["cases"].as_array().unwrap().iter().zip(&cases) {
            let prompt = &want["prompt"];
            assert_eq!((&got["text"], &got["finish_reason"]), (&want["text"], &want["finish_reason"]), "{name} {prompt:?}");
            assert_eq!(got["streamed"], got["text"], "{name} {prompt:?}: the stream joins to the plain text");
            assert_eq!(got["usage"]["prompt_tokens"], want["prompt_tokens"], "{name} {prompt:?}");
            let ours: Vec<f64> = got["token_logprobs"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            let theirs: Vec<f64> = want["logprobs"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            assert_eq!(ours.len(), theirs.len(), "{name} {prompt:?}");
            for (a, b) in ours.iter().zip(&theirs) {
                assert!((a - b).abs() < 1e-4, "{name} {prompt:?}: logprob {a} vs HF {b}");
            }
        }
    }
}

#[test]
fn eight_concurrent_clients_get_hf_greedy_text_from_each_family() {
    for name in FAMILY {
        let tmp = tempfile::tempdir().unwrap();
        let hold = tmp.path().join("hold");
        let env = [("ZEROTUNE_TEST_HOLD", hold.as_path())];
        let server = Server::start_model(&fixtures().join("decoders").join(name), &["--max_batch", "8"], &env);
        eight_clients_get_the_text_of(&server, &hold, "/v1/completions", &cases(name));
    }
}

/// The FauxPilot extension's exact request (Venthe/vscode-fauxpilot 1.2.0, 200 new tokens) to a
/// Qwen2 whose context holds them: a completion cut at the stop string, the model echoed back.
#[test]
fn the_fauxpilot_extensions_exact_request() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = model_with(&fixtures().join("decoders/qwen2"), &tmp.path().join("qwen2-256"), "max_position_embeddings", json!(256));
    let server = Server::start_model(&dir, &[], &[]);
    let body = r#"{"model":"fastertransformer","prompt":"def add(a, b):\n    return","max_tokens":200,"temperature":0.1,"stop":["\n"]}"#;
    let headers = [("Content-Type", "application/json"), ("Authorization", "Bearer dummy")];
    let reply = http::request(&server.addr, "POST", "/v1/engines/codegen/completions", &headers, body);
    assert_eq!(reply.status, 200, "{}", reply.body);
    let v = reply.json();
    assert!(!v["choices"][0]["text"].as_str().unwrap().contains('\n'), "the stop string is cut: {v}");
    assert!(["stop", "length"].contains(&v["choices"][0]["finish_reason"].as_str().unwrap()), "{v}");
    assert_eq!(v["model"], "fastertransformer", "model is echoed back");
}
