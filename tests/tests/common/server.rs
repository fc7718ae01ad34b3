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

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
