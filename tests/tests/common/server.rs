//! A `worker serve` process started on 127.0.0.1:0 for a test, its log read as it runs.

#![allow(dead_code)] // not every test binary serves

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::http;
use super::{binary, s};

/// A `worker serve` process and its log.
pub struct Server {
    pub child: Child,
    pub addr: String,
    log: Arc<(Mutex<Vec<String>>, Condvar)>,
}

impl Server {
    pub fn start_model(model: &Path, extra: &[&str], env: &[(&str, &Path)]) -> Self {
        let mut child = Command::new(binary("worker"))
            .args(["serve", "--model", &s(model), "--port", "0", "--device", "cpu", "--threads", "1"])
            .args(extra)
            .envs(env.iter().map(|(k, v)| (k, v.as_os_str())))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines().map(Result::unwrap);
        let mut seen = vec![];
        let addr = loop {
            let line = lines.next().unwrap_or_else(|| panic!("the server exited before listening:\n{}", seen.join("\n")));
            if let Some(rest) = line.split(" at http://").nth(1) {
                break rest.split('/').next().unwrap().to_string();
            }
            seen.push(line);
        };
        let log = Arc::new((Mutex::new(seen), Condvar::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in lines {
                sink.0.lock().unwrap().push(line);
                sink.1.notify_all();
            }
        });
        Self { child, addr, log }
    }

    pub fn post(&self, path: &str, body: Value) -> http::Reply {
        http::post(&self.addr, path, &body.to_string())
    }

    /// Waits (30 s at most) for a log line containing `text`.
    pub fn wait_for_log(&self, text: &str) {
        let (lines, changed) = &*self.log;
        let mut lines = lines.lock().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !lines.iter().any(|l| l.contains(text)) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no log line {text:?} in:\n{}", lines.join("\n"));
            lines = changed.wait_timeout(lines, left).unwrap().0;
        }
    }

    pub fn log(&self) -> Vec<String> {
        self.log.0.lock().unwrap().clone()
    }

    /// A value from GET /metrics.
    pub fn metric(&self, name: &str) -> f64 {
        let text = http::get(&self.addr, "/metrics").body;
        let line = text.lines().find(|l| l.split(' ').next() == Some(name)).unwrap_or_else(|| panic!("no {name} in\n{text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }

    /// Polls GET /metrics (30 s at most) until `name` equals `value`: the engine's own account.
    pub fn wait_for_metric(&self, name: &str, value: f64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.metric(name) != value {
            assert!(Instant::now() < deadline, "{name} is {} after 30 s, not {value}", self.metric(name));
            std::thread::sleep(Duration::from_millis(5)); // polling the server's state
        }
    }
}

/// 8 clients, each sending every case's prompt (greedy, 16 tokens) to `path` in its own order, all
/// at once, each asserting it gets the case's text and finish reason. `hold` is the file the
/// server was started with as ZEROTUNE_TEST_HOLD: the first 8 requests wait until all are in one
/// batch, so 8 rows of different lengths step together.
pub fn eight_clients_get_the_text_of(server: &Server, hold: &Path, path: &'static str, cases: &[Value]) {
    std::fs::write(hold, "").unwrap();
    let clients: Vec<_> = (0..8)
        .map(|client| {
            let (addr, cases) = (server.addr.clone(), cases.to_vec());
            std::thread::spawn(move || {
                for k in 0..cases.len() {
                    let case = &cases[(k + client) % cases.len()];
                    let body = serde_json::json!({"prompt": case["prompt"], "max_tokens": 16, "temperature": 0});
                    let reply = http::post(&addr, path, &body.to_string());
                    assert_eq!(reply.status, 200, "{}", reply.body);
                    let choice = &reply.json()["choices"][0];
                    let got = (&choice["text"], &choice["finish_reason"]);
                    assert_eq!(got, (&case["text"], &case["finish_reason"]), "{}", case["prompt"]);
                }
            })
        })
        .collect();
    server.wait_for_metric("zerotune_active_sequences", 8.0);
    std::fs::remove_file(hold).unwrap();
    for client in clients {
        client.join().unwrap();
    }
    assert!(server.metric("zerotune_requests_total{status=\"200\"}") >= 8.0 * cases.len() as f64);
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
