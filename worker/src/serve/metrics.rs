//! The server's counters, gauges and latency histogram, shared by the HTTP handlers and the
//! engine thread, rendered in Prometheus' text format for `GET /metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Upper bounds (seconds) of the request latency buckets.
const BUCKETS: [f64; 12] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0];

#[derive(Default)]
pub struct Metrics {
    /// Finished requests by HTTP status.
    requests: Mutex<BTreeMap<u16, u64>>,
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens whose keys and values came from the prefix cache (not computed again).
    pub prompt_tokens_reused: AtomicU64,
    pub completion_tokens: AtomicU64,
    /// Requests whose client went away before the end.
    pub cancelled: AtomicU64,
    /// Sequences in the engine's batch now.
    pub active_sequences: AtomicU64,
    /// Requests with sequences waiting for a row: in the queue, or taken and not yet wholly
    /// admitted. The front end refuses new ones (429) while --max_queue wait.
    pub queued: AtomicU64,
    buckets: [AtomicU64; BUCKETS.len()],
    latency_sum_micros: AtomicU64,
    latency_count: AtomicU64,
}

impl Metrics {
    /// Records a finished request.
    pub fn request(&self, status: u16, seconds: f64) {
        *self.requests.lock().expect("metrics lock").entry(status).or_default() += 1;
        for (bucket, &bound) in self.buckets.iter().zip(&BUCKETS) {
            if seconds <= bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_sum_micros.fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
        self.latency_count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let _ = writeln!(out, "# HELP zerotune_requests_total HTTP requests served, by status.\n# TYPE zerotune_requests_total counter");
        for (status, count) in self.requests.lock().expect("metrics lock").iter() {
            let _ = writeln!(out, "zerotune_requests_total{{status=\"{status}\"}} {count}");
        }
        let scalars = [
            ("zerotune_prompt_tokens_total", "counter", "Prompt tokens of admitted requests.", get(&self.prompt_tokens)),
            (
                "zerotune_prompt_tokens_reused_total",
                "counter",
                "Prompt tokens taken from the prefix cache instead of computed.",
                get(&self.prompt_tokens_reused),
            ),
            ("zerotune_completion_tokens_total", "counter", "Tokens generated.", get(&self.completion_tokens)),
            ("zerotune_cancelled_requests_total", "counter", "Requests whose client disconnected first.", get(&self.cancelled)),
            ("zerotune_queue_depth", "gauge", "Requests waiting for a place in the batch.", get(&self.queued)),
            ("zerotune_active_sequences", "gauge", "Sequences generating now.", get(&self.active_sequences)),
        ];
        for (name, kind, help, value) in scalars {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        }
        let name = "zerotune_request_duration_seconds";
        let _ = writeln!(out, "# HELP {name} Time from request to the end of its response.\n# TYPE {name} histogram");
        for (bucket, bound) in self.buckets.iter().zip(BUCKETS) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {}", get(bucket));
        }
        let count = get(&self.latency_count);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", get(&self.latency_sum_micros) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {count}");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text_with_cumulative_buckets() {
        let m = Metrics::default();
        m.request(200, 0.07);
        m.request(200, 3.0);
        m.request(429, 0.001);
        m.completion_tokens.fetch_add(5, Ordering::Relaxed);
        let text = m.render();
        assert!(text.contains("zerotune_requests_total{status=\"200\"} 2\n"));
        assert!(text.contains("zerotune_requests_total{status=\"429\"} 1\n"));
        assert!(text.contains("zerotune_completion_tokens_total 5\n"));
        assert!(text.contains("zerotune_request_duration_seconds_bucket{le=\"0.05\"} 1\n"));
        assert!(text.contains("zerotune_request_duration_seconds_bucket{le=\"0.1\"} 2\n"));
        assert!(text.contains("zerotune_request_duration_seconds_bucket{le=\"5\"} 3\n"));
        assert!(text.contains("zerotune_request_duration_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("zerotune_request_duration_seconds_count 3\n"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }
}
