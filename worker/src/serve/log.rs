//! The server's log lines (through `zerotune_log`: `RUST_LOG` filters them, `--log_format`
//! says how they read): the targets scripts wait for, and the one line per finished request.

pub use zerotune_log::LogFormat;

/// The target of the lines that say where the server listens, that a signal came and that it
/// stopped: shown whatever `RUST_LOG` says, as scripts wait for the first.
pub const LIFECYCLE: &str = "zerotune_worker::serve::lifecycle";

/// The target of the per-request lines (`RUST_LOG=zerotune_worker::serve::request=off` drops them).
pub const REQUEST: &str = "zerotune_worker::serve::request";

/// Makes the server's log of `format` on stderr this process's, the lifecycle lines always on.
pub fn init(format: LogFormat) {
    zerotune_log::init(format, &[LIFECYCLE]);
}

/// One finished request (its body's end, for a stream): the route, the status, the prompt and
/// completion tokens when it had any, the seconds it took. Never a prompt's text.
pub fn request(method: &str, path: &str, status: u16, prompt_tokens: u64, completion_tokens: u64, seconds: f64) {
    let tokens = if prompt_tokens + completion_tokens > 0 { format!(" {prompt_tokens}+{completion_tokens} tokens") } else { String::new() };
    tracing::info!(target: REQUEST, method, path, status, prompt_tokens, completion_tokens, seconds, "{method} {path} {status}{tokens} {seconds:.3} s");
}

#[cfg(test)]
mod tests {
    use serde_json::Value;
    use zerotune_log::written_by as written;

    use super::*;

    fn two_requests() {
        request("POST", "/v1/completions", 200, 3, 16, 0.1234);
        request("GET", "/health", 200, 0, 0, 0.0004);
    }

    #[test]
    fn text_lines_read_as_the_server_always_printed_them() {
        let text = written(LogFormat::Text, "info", two_requests);
        assert_eq!(text, "POST /v1/completions 200 3+16 tokens 0.123 s\nGET /health 200 0.000 s\n");
        let other = written(LogFormat::Text, "info", || tracing::warn!(target: "hyper::proto", peer = 7, "closed"));
        assert_eq!(other, "WARN hyper::proto: closed peer=7\n");
    }

    #[test]
    fn json_gives_one_object_per_request_line_with_its_fields() {
        let text = written(LogFormat::Json, "info", two_requests);
        let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
        assert_eq!(lines.len(), 2, "{text}");
        let post = &lines[0];
        assert_eq!(post["message"], "POST /v1/completions 200 3+16 tokens 0.123 s");
        assert_eq!(
            (post["level"].as_str(), post["method"].as_str(), post["path"].as_str()),
            (Some("INFO"), Some("POST"), Some("/v1/completions"))
        );
        assert_eq!(
            (post["status"].as_u64(), post["prompt_tokens"].as_u64(), post["completion_tokens"].as_u64()),
            (Some(200), Some(3), Some(16))
        );
        assert_eq!(post["seconds"].as_f64(), Some(0.1234));
        assert!(post["timestamp"].is_string());
        assert_eq!(post["target"], REQUEST);
        assert_eq!((lines[1]["path"].as_str(), lines[1]["prompt_tokens"].as_u64()), (Some("/health"), Some(0)));
    }

    #[test]
    fn the_filter_drops_request_lines_but_not_the_lifecycle() {
        let text = written(LogFormat::Text, &format!("warn,{LIFECYCLE}=info"), || {
            two_requests();
            tracing::info!(target: LIFECYCLE, "worker: stopped");
        });
        assert_eq!(text, "worker: stopped\n");
    }
}
