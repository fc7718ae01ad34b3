//! The server's log on stderr, through `tracing`: `RUST_LOG` filters it (default `info`), and
//! `--log_format` says how each line reads. `text`: our lines exactly as the server has always
//! printed them (people and scripts read them: the `serving ... at http://ADDR/v1` line, one
//! `METHOD PATH STATUS [P+C tokens] SECONDS s` line per request), other crates' events with their
//! level, target and fields. `json`: one object per line with the event's fields beside its
//! `message`, `level`, `target` and `timestamp` (tracing-subscriber's JSON format).

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// The target of the lines that say where the server listens, that a signal came and that it
/// stopped: shown whatever `RUST_LOG` says, as scripts wait for the first.
pub const LIFECYCLE: &str = "zerotune_worker::serve::lifecycle";

/// The target of the per-request lines (`RUST_LOG=zerotune_worker::serve::request=off` drops them).
pub const REQUEST: &str = "zerotune_worker::serve::request";

/// `--log_format` of `worker serve`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Each line as a person reads it (our lines as the server always printed them).
    #[default]
    Text,
    /// One JSON object per line, the event's fields at its top level.
    Json,
}

/// Makes the log of `format` on stderr this process's, filtered by `RUST_LOG` (default `info`).
/// A second call (a test, say) leaves the first's in place.
pub fn init(format: LogFormat) {
    let _ = tracing::subscriber::set_global_default(subscriber(format, env_filter(), std::io::stderr));
}

/// `RUST_LOG`'s directives (`info` when unset or unreadable), with the lifecycle lines always on.
fn env_filter() -> EnvFilter {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    filter.add_directive(format!("{LIFECYCLE}=info").parse().expect("a valid directive"))
}

/// The subscriber writing `format` lines to `writer`, those `filter` lets through.
pub fn subscriber<W>(format: LogFormat, filter: EnvFilter, writer: W) -> impl Subscriber + Send + Sync
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let layer: Box<dyn Layer<Registry> + Send + Sync> = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer().event_format(TextLines).with_writer(writer).boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(writer)
            .boxed(),
    };
    Registry::default().with(layer.with_filter(filter))
}

/// One finished request (its body's end, for a stream): the route, the status, the prompt and
/// completion tokens when it had any, the seconds it took. Never a prompt's text.
pub fn request(method: &str, path: &str, status: u16, prompt_tokens: u64, completion_tokens: u64, seconds: f64) {
    let tokens = if prompt_tokens + completion_tokens > 0 { format!(" {prompt_tokens}+{completion_tokens} tokens") } else { String::new() };
    tracing::info!(target: REQUEST, method, path, status, prompt_tokens, completion_tokens, seconds, "{method} {path} {status}{tokens} {seconds:.3} s");
}

/// `--log_format text`: the worker's events as their message alone (the message holds their
/// data, as the server's lines always did), any other crate's as `LEVEL target: message k=v`.
struct TextLines;

impl<S, N> FormatEvent<S, N> for TextLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, _: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let meta = event.metadata();
        if meta.target().starts_with("zerotune") {
            writeln!(writer, "{}", fields.message)
        } else {
            writeln!(writer, "{} {}: {}{}", meta.level(), meta.target(), fields.message, fields.rest)
        }
    }
}

/// An event's message, and its other fields as ` name=value`.
#[derive(Default)]
struct Fields {
    message: String,
    rest: String,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.rest, " {}={value:?}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.rest, " {}={value:?}", field.name());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use serde_json::Value;

    use super::*;

    /// A writer into memory, shared with the test.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What `log` writes in `format` (with `filter`'s directives).
    fn written(format: LogFormat, filter: &str, log: impl FnOnce()) -> String {
        let buffer = Buffer::default();
        let sink = buffer.clone();
        tracing::subscriber::with_default(subscriber(format, EnvFilter::new(filter), move || sink.clone()), log);
        let bytes = buffer.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

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
