//! `worker serve --log_format json` on the tiny fixture model: every line on stderr is one JSON
//! object, the startup line names the address, and each request gets one line whose fields are
//! its route, status and tokens. (The text format's lines are the ones tests/tests/serve.rs reads.)

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};

use serde_json::Value;
use zerotune_tests::fixtures;

/// Sends one HTTP/1.1 request and returns the status and body.
fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body.as_bytes()).unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    let status = reply.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status in {reply:?}"));
    (status, reply.split_once("\r\n\r\n").map_or(String::new(), |(_, b)| b.to_string()))
}

#[test]
fn json_log_format_gives_one_object_per_line_and_per_request() {
    let model = fixtures().join("tiny-decode");
    let mut child = Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(["serve", "--model", model.to_str().unwrap(), "--port", "0", "--device", "cpu", "--threads", "1"])
        .args(["--log_format", "json"])
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines().map(Result::unwrap);
    let first = lines.next().expect("the server exited before listening");
    let startup: Value = serde_json::from_str(&first).unwrap_or_else(|e| panic!("{e}: {first}"));
    let addr = startup["addr"].as_str().unwrap_or_else(|| panic!("no addr in {first}")).to_string();
    assert!(startup["message"].as_str().unwrap().contains(&format!(" at http://{addr}/v1 ")), "{first}");

    assert_eq!(http(&addr, "GET", "/health", "").0, 200);
    let (status, body) = http(&addr, "POST", "/v1/completions", r#"{"prompt": "def f(", "max_tokens": 3, "temperature": 0}"#);
    assert_eq!(status, 200, "{body}");
    // SAFETY: a signal to the child this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let rest: Vec<String> = lines.collect();
    assert_eq!(child.wait().unwrap().code(), Some(0), "{rest:?}");

    let objects: Vec<Value> =
        rest.iter().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not one JSON object ({e}): {l}"))).collect();
    let requests: Vec<&Value> = objects.iter().filter(|o| o["path"].is_string()).collect();
    assert_eq!(requests.len(), 2, "one line per request: {rest:#?}");
    let by_path = |path: &str| *requests.iter().find(|o| o["path"] == path).unwrap_or_else(|| panic!("no {path} line: {rest:#?}"));
    let (health, completion) = (by_path("/health"), by_path("/v1/completions"));
    assert_eq!((health["method"].as_str(), health["path"].as_str(), health["status"].as_u64()), (Some("GET"), Some("/health"), Some(200)));
    assert_eq!((completion["path"].as_str(), completion["status"].as_u64()), (Some("/v1/completions"), Some(200)));
    assert_eq!(completion["completion_tokens"].as_u64(), Some(3));
    assert!(completion["prompt_tokens"].as_u64().is_some_and(|n| n > 0), "{completion}");
    assert!(completion["message"].as_str().unwrap().starts_with("POST /v1/completions 200 "), "{completion}");
    assert!(!rest.iter().any(|l| l.contains("def f(")), "prompts are never logged");
    assert!(objects.iter().any(|o| o["message"] == "worker: stopped"), "{rest:#?}");
}
