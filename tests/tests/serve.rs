//! `worker serve` as editors and OpenAI clients use it: real server processes on 127.0.0.1:0,
//! real HTTP, the official openai SDK, and the exact request the FauxPilot extension sends.
//! Greedy completions equal HF `generate` (tests/fixtures), alone and from 8 clients at once.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::http::{self, Stream};
use common::server::{eight_clients_get_the_text_of, Server};
use common::{fixtures, model_with, signal};
use serde_json::{json, Value};
use zerotune_tests::meta;

/// A server of the tiny CodeGen.
fn start(extra: &[&str], env: &[(&str, &Path)]) -> Server {
    Server::start_model(&model(), extra, env)
}

/// The tiny CodeGen whose greedy completions vary with the prompt.
fn model() -> PathBuf {
    fixtures().join("tiny-decode")
}

/// HF's greedy completions of the server prompts (max_tokens 16).
fn cases() -> Vec<Value> {
    meta()["serve"].as_array().unwrap().clone()
}

fn greedy(prompt: &Value) -> Value {
    json!({"prompt": prompt, "max_tokens": 16, "temperature": 0})
}

#[test]
fn the_openai_sdk_gets_hf_greedy_text_plain_and_streamed_logprobs_and_seeded_choices() {
    let server = start(&[], &[]);
    let cases = cases();
    let prompts: Vec<&Value> = cases.iter().map(|c| &c["prompt"]).collect();
    let python = std::env::var("ZEROTUNE_PYTHON").expect("ZEROTUNE_PYTHON (the test venv's python) is set by scripts/test.sh");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/openai_completions.py");
    let out = Command::new(python).args([script, &format!("http://{}/v1", server.addr), &json!(prompts).to_string()]).output().unwrap();
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), server.log().join("\n"));
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    for (got, want) in result["cases"].as_array().unwrap().iter().zip(&cases) {
        let prompt = &want["prompt"];
        assert_eq!(got["text"], want["text"], "{prompt:?}");
        assert_eq!(got["finish_reason"], want["finish_reason"], "{prompt:?}");
        assert_eq!(got["streamed"], got["text"], "{prompt:?}: the stream joins to the plain text");
        assert_eq!(got["stream_finish_reason"], want["finish_reason"], "{prompt:?}");
        assert_eq!((got["object"].as_str(), got["model"].as_str()), (Some("text_completion"), Some("codegen")));
        assert!(got["id"].as_str().unwrap().starts_with("cmpl-"));
        let n = want["new_ids"].as_array().unwrap().len();
        assert_eq!(got["usage"]["completion_tokens"].as_u64(), Some(n as u64), "{prompt:?}: the tokens of the text (EOS not counted)");
        assert_eq!(got["usage"]["prompt_tokens"], want["prompt_tokens"]);
        // The model's log-softmax of each chosen token, against HF's scores.
        let ours: Vec<f64> = got["token_logprobs"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let theirs: Vec<f64> = want["logprobs"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(ours.len(), theirs.len(), "{prompt:?}");
        for (a, b) in ours.iter().zip(&theirs) {
            assert!((a - b).abs() < 1e-4, "{prompt:?}: logprob {a} vs HF {b}");
        }
        for top in got["top_logprobs"].as_array().unwrap() {
            let alternatives = top.as_object().unwrap();
            assert!(!alternatives.is_empty() && alternatives.len() <= 2, "{top}");
        }
    }
    let seeded = result["seeded"].as_array().unwrap();
    assert_eq!(seeded[0].as_array().unwrap().len(), 3, "n=3 gives 3 choices");
    assert_eq!(seeded[0], seeded[1], "the same seed gives the same choices");
    assert_ne!(seeded[0], seeded[2], "another seed gives other choices");
    let distinct: std::collections::BTreeSet<String> = seeded[0].as_array().unwrap().iter().map(Value::to_string).collect();
    assert!(distinct.len() > 1, "the choices of one request differ: {seeded:?}");
}

#[test]
fn greedy_text_equals_hf_one_by_one_and_from_8_concurrent_clients() {
    let tmp = tempfile::tempdir().unwrap();
    let hold = tmp.path().join("hold");
    let server = start(&["--max_batch", "8"], &[("ZEROTUNE_TEST_HOLD", &hold)]);
    let cases = cases();
    for case in &cases {
        let reply = server.post("/v1/completions", greedy(&case["prompt"]));
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(reply.json()["choices"][0]["text"], case["text"], "{}", case["prompt"]);
    }
    // Streamed with a stop string from the middle of the text: the text up to it, never a
    // piece of the stop string (held back until it is clear), finish_reason stop.
    for case in cases.iter().filter(|c| c["text"].as_str().unwrap().chars().count() >= 4) {
        let text = case["text"].as_str().unwrap();
        let stop: String = text.chars().skip(2).take(2).collect();
        let want = &text[..text.find(&stop).unwrap()];
        let body = json!({"prompt": case["prompt"], "max_tokens": 16, "temperature": 0, "stream": true, "stop": [stop, "never-seen"]});
        let events = Stream::open(&server.addr, "/v1/completions", &body.to_string()).rest();
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
        let streamed: String = chunks.iter().map(|c| c["choices"][0]["text"].as_str().unwrap()).collect();
        assert_eq!(streamed, want, "{}: stop {stop:?}", case["prompt"]);
        assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "stop");
    }
    // 8 clients at once, the first 8 requests held into one batch.
    eight_clients_get_the_text_of(&server, &hold, "/v1/engines/codegen/completions", &cases);
}

/// Two editors' requests, interleaved, each repeating the file above its cursor: the server
/// prefills only what the prompt adds to the longest start a kept prompt shares with it (counted
/// by zerotune_prompt_tokens_reused_total), and the text is still HF's. A budget too small for
/// both editors' prompts keeps the most recent only; `--prefix_cache_tokens 0` keeps none.
#[test]
fn editors_next_requests_prefill_only_what_they_add_and_get_hf_text() {
    let cases = cases();
    let [a1, a2, b1, b2] = &cases[cases.len() - 4..] else { unreachable!() };
    let ids = |case: &Value| -> Vec<u64> { case["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect() };
    // What a prompt can take from a kept one: their common start, short of its own last token.
    let shared = |kept: &Value, prompt: &Value| {
        let (kept, prompt) = (ids(kept), ids(prompt));
        kept.iter().zip(&prompt).take_while(|(a, b)| a == b).count().min(prompt.len() - 1) as f64
    };
    assert!(shared(a1, a2) > 10.0 && shared(b1, b2) > 10.0 && shared(a1, b1) == 0.0, "the fixture's two editors");
    let (a2_len, b1_len) = (ids(a2).len(), ids(b1).len());
    let order = [a1, b1, a2, b2, a2];
    for (budget, want) in [
        // Both editors' prompts fit: each takes from its own, and a repeat from itself.
        ("4096", [0.0, 0.0, shared(a1, a2), shared(b1, b2), ids(a2).len() as f64 - 1.0]),
        // Room for a2 but not a2 and b1 together: a2 pushes b1 out, and b2 then starts afresh;
        // b2 in turn pushes a2 out.
        (&*format!("{}", a2_len + b1_len - 1), [0.0, 0.0, shared(a1, a2), 0.0, 0.0]),
        ("0", [0.0; 5]),
    ] {
        let server = start(&["--prefix_cache_tokens", budget], &[]);
        let mut reused = vec![];
        let mut total = 0.0;
        for case in order {
            let reply = server.post("/v1/engines/codegen/completions", greedy(&case["prompt"]));
            assert_eq!(reply.status, 200, "{}", reply.body);
            assert_eq!(reply.json()["choices"][0]["text"], case["text"], "{} (budget {budget})", case["prompt"]);
            let now = server.metric("zerotune_prompt_tokens_reused_total");
            reused.push(now - total);
            total = now;
        }
        assert_eq!(reused, want, "budget {budget}");
    }
}

#[test]
fn the_fauxpilot_extensions_exact_request_and_the_other_routes() {
    // Venthe/vscode-fauxpilot 1.2.0: the OpenAI Node SDK with baseURL .../v1/engines/codegen.
    let body = r#"{"model":"fastertransformer","prompt":"def add(a, b):\n    return","max_tokens":200,"temperature":0.1,"stop":["\n"]}"#;
    let headers = [("Content-Type", "application/json"), ("Authorization", "Bearer dummy")];
    // 200 new tokens do not fit the tiny model's 64: a 400 that says both numbers.
    let server = start(&[], &[]);
    let reply = http::request(&server.addr, "POST", "/v1/engines/codegen/completions", &headers, body);
    assert_eq!(reply.status, 400, "{}", reply.body);
    let message = reply.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(message.contains("maximum context length is 64 tokens") && message.contains("200 for the completion"), "{message}");
    // The same weights with a context of 256 (CodeGen has no position embeddings: n_positions
    // only bounds the context) answer the exact request.
    let tmp = tempfile::tempdir().unwrap();
    let long_context = model_with(&model(), &tmp.path().join("tiny-decode-256"), "n_positions", json!(256));
    let long = Server::start_model(&long_context, &[], &[]);
    let reply = http::request(&long.addr, "POST", "/v1/engines/codegen/completions", &headers, body);
    assert_eq!(reply.status, 200, "{}", reply.body);
    let v = reply.json();
    let choice = &v["choices"][0];
    assert!(!choice["text"].as_str().unwrap().contains('\n'), "the stop string is cut: {v}");
    assert!(["stop", "length"].contains(&choice["finish_reason"].as_str().unwrap()), "{v}");
    assert_eq!(v["model"], "fastertransformer", "model is echoed back");

    // copilot.vim asks for a token first; models, health, metrics.
    assert_eq!(http::get(&server.addr, "/copilot_internal/v2/token").json()["token"], "1");
    let models = http::get(&server.addr, "/v1/models").json();
    assert_eq!((models["object"].as_str(), models["data"][0]["id"].as_str()), (Some("list"), Some("tiny-decode")));
    assert_eq!(http::get(&server.addr, "/health").json()["status"], "ok");
    let metrics = http::get(&server.addr, "/metrics");
    assert_eq!(metrics.header("content-type"), Some("text/plain; version=0.0.4"));
    for name in ["zerotune_requests_total{status=\"200\"}", "zerotune_completion_tokens_total", "zerotune_queue_depth"] {
        assert!(metrics.body.contains(name), "{name} in {}", metrics.body);
    }
    assert!(server.metric("zerotune_request_duration_seconds_count") >= 2.0);
    let missing = http::get(&server.addr, "/v2/nothing");
    assert_eq!((missing.status, missing.json()["error"]["code"].as_str()), (404, Some("not_found")));
    let wrong_method = http::get(&server.addr, "/v1/completions");
    assert_eq!((wrong_method.status, wrong_method.json()["error"]["code"].as_str()), (405, Some("method_not_allowed")));
    // One log line per request, with no prompt text in it.
    server.wait_for_log("GET /v1/models 200");
    long.wait_for_log("POST /v1/engines/codegen/completions 200 ");
    assert!(long.log().iter().any(|l| l.starts_with("POST /v1/engines/codegen/completions 200 ") && l.contains(" tokens ")));
    assert!(!server.log().iter().chain(&long.log()).any(|l| l.contains("def add")), "prompts are never logged");
}

#[test]
fn client_mistakes_get_4xx_in_openais_error_shape_and_the_server_goes_on() {
    let server = start(&["--api_key", "sekret"], &[]);
    let auth = [("Content-Type", "application/json"), ("Authorization", "Bearer sekret")];
    let post = |body: &str| http::request(&server.addr, "POST", "/v1/completions", &auth, body);
    let long = "x ".repeat(200);
    let cases: [(String, u16, Option<&str>); 8] = [
        (json!({"prompt": long, "max_tokens": 16}).to_string(), 400, Some("max_tokens")),
        (json!({"prompt": "a", "n": 9}).to_string(), 400, Some("n")),
        (json!({"prompt": ["a", "b", "c"], "n": 3}).to_string(), 400, Some("prompt")),
        (json!({"prompt": [5, 1003]}).to_string(), 400, Some("prompt")),
        ("{\"prompt\": ".into(), 400, None),
        (json!({"prompt": "a", "temperature": "warm"}).to_string(), 400, Some("temperature")),
        (json!({"prompt": "a", "n": 0}).to_string(), 400, Some("n")),
        (json!({"prompt": 7}).to_string(), 400, Some("prompt")),
    ];
    for (body, status, param) in &cases {
        let reply = post(body);
        assert_eq!(reply.status, *status, "{body}: {}", reply.body);
        let error = &reply.json()["error"];
        assert_eq!((error["type"].as_str(), error["param"].as_str()), (Some("invalid_request_error"), *param), "{}", reply.body);
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let message = post(&cases[0].0).json()["error"]["message"].as_str().unwrap().to_string();
    assert!(message.contains("maximum context length is 64 tokens") && message.contains("16 for the completion"), "{message}");
    // One request holds at most the batch (8 here), counting prompts x n: issue 23's request.
    let many = post(&json!({"prompt": vec!["def f("; 100], "n": 8}).to_string());
    assert_eq!(many.status, 400, "{}", many.body);
    let message = many.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(message.contains("800 sequences (100 prompts x n 8)") && message.contains("batch of 8 (--max_batch)"), "{message}");
    // Exactly the batch is served: 2 prompts x n 4, the choices prompt by prompt in index order.
    let reply = post(&json!({"prompt": ["def f(", "import"], "n": 4, "max_tokens": 2}).to_string());
    assert_eq!(reply.status, 200, "{}", reply.body);
    let indices: Vec<u64> = reply.json()["choices"].as_array().unwrap().iter().map(|c| c["index"].as_u64().unwrap()).collect();
    assert_eq!(indices, (0..8).collect::<Vec<u64>>());
    // Authorization: missing or wrong key is 401 (not retried by the SDKs), the right one works.
    for headers in [vec![], vec![("Authorization", "Bearer guess")]] {
        let reply = http::request(&server.addr, "POST", "/v1/completions", &headers, r#"{"prompt":"a"}"#);
        assert_eq!((reply.status, reply.json()["error"]["code"].as_str()), (401, Some("invalid_api_key")), "{}", reply.body);
    }
    assert_eq!(http::get(&server.addr, "/v1/models").status, 401);
    let reply = post(r#"{"prompt":"def f(","max_tokens":4}"#);
    assert_eq!(reply.status, 200, "after every mistake the server still serves: {}", reply.body);
    assert_eq!(server.metric("zerotune_requests_total{status=\"400\"}"), 10.0);
    // A whole context of prompt, scored with echo and logprobs: 200, one logprob per token after the first.
    let full: Vec<u32> = (1..=64).collect();
    let reply = post(&json!({"prompt": full, "max_tokens": 0, "echo": true, "logprobs": 1}).to_string());
    assert_eq!(reply.status, 200, "{}", reply.body);
    let lp = &reply.json()["choices"][0]["logprobs"];
    assert_eq!((lp["tokens"].as_array().unwrap().len(), lp["token_logprobs"][0].is_null()), (64, true));
    assert_eq!(reply.json()["choices"][0]["finish_reason"], "length");
}

/// With one batch row and one queue place, a request held in the batch (the test hold) and one
/// waiting fill the server: the next gets 429. A client that leaves mid-stream frees its row.
#[test]
fn a_full_queue_answers_429_and_a_departed_client_frees_its_slot() {
    let tmp = tempfile::tempdir().unwrap();
    let hold = tmp.path().join("hold");
    std::fs::write(&hold, "").unwrap();
    let server = start(&["--max_batch", "1", "--max_queue", "1"], &[("ZEROTUNE_TEST_HOLD", &hold)]);
    let long = json!({"prompt": "def add(a, b):\n", "max_tokens": 40, "temperature": 0, "stream": true}).to_string();
    let first = Stream::open(&server.addr, "/v1/completions", &long);
    assert_eq!(first.status, 200);
    server.wait_for_metric("zerotune_active_sequences", 1.0);
    let queued = {
        let addr = server.addr.clone();
        std::thread::spawn(move || http::post(&addr, "/v1/completions", r#"{"prompt":"x","max_tokens":3,"temperature":0}"#))
    };
    server.wait_for_metric("zerotune_queue_depth", 1.0);
    let refused = server.post("/v1/completions", json!({"prompt": "y"}));
    assert_eq!(refused.status, 429, "{}", refused.body);
    assert_eq!(refused.json()["error"]["code"], "queue_full");

    // The first client walks away mid-stream: its row goes to the queued request, still held.
    drop(first);
    server.wait_for_metric("zerotune_cancelled_requests_total", 1.0);
    server.wait_for_metric("zerotune_queue_depth", 0.0);
    server.wait_for_metric("zerotune_active_sequences", 1.0); // the queued request took the freed row
    std::fs::remove_file(&hold).unwrap();
    let reply = queued.join().unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["usage"]["completion_tokens"], 3);
    assert!(server.metric("zerotune_completion_tokens_total") < 40.0, "the departed client's generation stopped");
    server.wait_for_metric("zerotune_active_sequences", 0.0); // set just after the answer goes out
    assert_eq!(server.post("/v1/completions", json!({"prompt": "z", "max_tokens": 2})).status, 200);
}

/// Issue 23: the rows a big request waits for are shared with the requests behind it. With 4
/// rows, 2 held by a stream and 2 by the first prompt of a 2-prompt x n 2 request, the rows the
/// stream frees go one to a 1-sequence request that came later, one to the big request; the big
/// request's last choice waits for the next. Under the test hold no step is taken, so this order
/// is the engine's, not timing's: the short request (max_tokens 1, done at its prefill) is
/// answered while the big one has not generated past its first tokens. Then the big one's choices
/// arrive with the right indices and HF's greedy text, though prompt 1's joined in two parts.
#[test]
fn a_short_request_behind_a_big_one_gets_the_next_free_row() {
    let tmp = tempfile::tempdir().unwrap();
    let hold = tmp.path().join("hold");
    std::fs::write(&hold, "").unwrap();
    let server = start(&["--max_batch", "4"], &[("ZEROTUNE_TEST_HOLD", &hold)]);
    let cases = cases();
    let long: Vec<&Value> = cases.iter().filter(|c| c["new_ids"].as_array().unwrap().len() >= 2 && c["text"] != "").collect();
    let [a, b, held, short, ..] = &long[..] else { panic!("the fixture has 4 prompts with 2 tokens or more of text") };
    assert_ne!(a["text"], b["text"], "the fixture's first two prompts complete differently");
    let stream = |prompts: Vec<&Value>| {
        let body = json!({"prompt": prompts, "n": 2, "max_tokens": 16, "temperature": 0, "stream": true});
        Stream::open(&server.addr, "/v1/completions", &body.to_string())
    };
    let first = stream(vec![&held["prompt"]]);
    server.wait_for_metric("zerotune_active_sequences", 2.0);
    let big = stream(vec![&a["prompt"], &b["prompt"]]);
    server.wait_for_metric("zerotune_active_sequences", 4.0);
    server.wait_for_metric("zerotune_queue_depth", 1.0); // prompt 1's choices wait for rows
    let (answered, reply) = std::sync::mpsc::channel();
    let (addr, body) = (server.addr.clone(), json!({"prompt": short["prompt"], "max_tokens": 1, "temperature": 0}).to_string());
    std::thread::spawn(move || answered.send(http::post(&addr, "/v1/completions", &body)));
    server.wait_for_metric("zerotune_queue_depth", 2.0);

    drop(first); // frees 2 rows: one for the short request, one for the big one
    let reply = reply.recv_timeout(Duration::from_secs(30)).expect("the short request is answered while the big one still waits");
    assert_eq!((reply.status, &reply.json()["usage"]["completion_tokens"]), (200, &json!(1)), "{}", reply.body);
    assert!(short["text"].as_str().unwrap().starts_with(reply.json()["choices"][0]["text"].as_str().unwrap()));
    // The row the short request left goes to the big one's last choice; nothing has stepped:
    // the first tokens only, 2 for the departed stream, 4 for the big request, 1 for the short.
    server.wait_for_metric("zerotune_queue_depth", 0.0);
    server.wait_for_metric("zerotune_active_sequences", 4.0);
    server.wait_for_metric("zerotune_completion_tokens_total", 7.0);
    std::fs::remove_file(&hold).unwrap();
    let events = big.rest();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{events:?}");
    let mut texts = vec![String::new(); 4];
    let mut finishes = vec![Value::Null; 4];
    for event in &events[..events.len() - 1] {
        let choice = &serde_json::from_str::<Value>(event).unwrap()["choices"][0];
        let index = choice["index"].as_u64().unwrap() as usize;
        texts[index].push_str(choice["text"].as_str().unwrap());
        if !choice["finish_reason"].is_null() {
            finishes[index] = choice["finish_reason"].clone();
        }
    }
    for (index, case) in [a, a, b, b].into_iter().enumerate() {
        assert_eq!((&json!(texts[index]), &finishes[index]), (&case["text"], &case["finish_reason"]), "choice {index}");
    }
}

#[test]
fn sigterm_finishes_the_request_in_flight_then_exits_0() {
    let tmp = tempfile::tempdir().unwrap();
    let hold = tmp.path().join("hold");
    std::fs::write(&hold, "").unwrap();
    let mut server = start(&[], &[("ZEROTUNE_TEST_HOLD", &hold)]);
    let body = json!({"prompt": "import", "max_tokens": 16, "temperature": 0, "stream": true}).to_string();
    let stream = Stream::open(&server.addr, "/v1/completions", &body);
    server.wait_for_metric("zerotune_active_sequences", 1.0);
    signal(server.child.id(), libc::SIGTERM);
    server.wait_for_log("SIGTERM: no new requests; finishing the ones in flight");
    std::fs::remove_file(&hold).unwrap();
    let events = stream.rest();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{events:?}");
    let text: String = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap()["choices"][0]["text"].as_str().unwrap().to_string())
        .collect();
    let want = cases().into_iter().find(|c| c["prompt"] == "import").unwrap();
    assert_eq!(text, want["text"].as_str().unwrap(), "the request in flight completes");
    let status = server.child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{}", server.log().join("\n"));
}
