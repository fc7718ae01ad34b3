//! Every zerotune binary's log on stderr, through `tracing`. `RUST_LOG` filters it (default
//! `info`); `LogFormat` says how a line reads. `text`: our events as people and scripts have
//! always read them (the message alone, `warning: ` or `error: ` before it at those levels),
//! other crates' as `LEVEL target: message k=v`. `json`: one object per line, the event's fields
//! beside its `message`, `level`, `target` and `timestamp` (tracing-subscriber's JSON format).
//! Progress bars and the end-of-run summaries are not log lines: they stay on the terminal.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
pub use tracing_subscriber::EnvFilter;
use tracing_subscriber::{Layer, Registry};

/// How each log line reads (`--log_format` of `worker serve`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Each line as a person reads it (our lines as zerotune always printed them).
    #[default]
    Text,
    /// One JSON object per line, the event's fields at its top level.
    Json,
}

/// Makes the log of `format` on stderr this process's, filtered by `RUST_LOG` (default `info`),
/// with the `always` targets shown at info whatever it says (lines scripts wait for). A second
/// call (a test, say) leaves the first's in place.
pub fn init(format: LogFormat, always: &[&str]) {
    let _ = tracing::subscriber::set_global_default(subscriber(format, env_filter(always), std::io::stderr));
}

/// `RUST_LOG`'s directives (`info` when unset or unreadable), with the `always` targets at info.
pub fn env_filter(always: &[&str]) -> EnvFilter {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    always.iter().fold(filter, |filter, target| filter.add_directive(format!("{target}=info").parse().expect("a valid directive")))
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

/// `text` lines: a zerotune event as its message (which holds its data), after `warning: ` or
/// `error: ` at those levels; any other crate's as `LEVEL target: message k=v`.
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
        if !meta.target().starts_with("zerotune") {
            return writeln!(writer, "{} {}: {}{}", meta.level(), meta.target(), fields.message, fields.rest);
        }
        let prefix = match *meta.level() {
            Level::ERROR => "error: ",
            Level::WARN => "warning: ",
            _ => "",
        };
        writeln!(writer, "{prefix}{}", fields.message)
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

/// What `log` writes through the subscriber of `format` and `filter`'s directives, for tests of
/// what a crate's events read like.
pub fn written_by(format: LogFormat, filter: &str, log: impl FnOnce()) -> String {
    let buffer = Buffer::default();
    let sink = buffer.clone();
    tracing::subscriber::with_default(subscriber(format, EnvFilter::new(filter), move || sink.clone()), log);
    let bytes = buffer.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// A writer into memory, shared with the caller.
#[derive(Clone, Default)]
struct Buffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Buffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    #[test]
    fn text_is_our_message_after_its_level_word_and_others_with_their_target() {
        let text = written_by(LogFormat::Text, "info", || {
            tracing::info!(target: "zerotune_coordinator::job", step = 4, "resuming from checkpoint-4 at step 4");
            tracing::warn!(target: "zerotune_coordinator::lock", "could not clear out/.lock");
            tracing::error!(target: "zerotune_worker::serve", "the engine failed");
            tracing::debug!(target: "zerotune_worker::serve", "not shown at info");
            tracing::warn!(target: "hyper::proto", peer = 7, "closed");
        });
        let expected = "resuming from checkpoint-4 at step 4\nwarning: could not clear out/.lock\nerror: the engine failed\nWARN hyper::proto: closed peer=7\n";
        assert_eq!(text, expected);
    }

    #[test]
    fn json_keeps_the_level_apart_from_the_message() {
        let text =
            written_by(LogFormat::Json, "info", || tracing::warn!(target: "zerotune_coordinator::lock", held = 2, "could not clear"));
        let line: Value = serde_json::from_str(text.trim_end()).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!((line["message"].as_str(), line["level"].as_str()), (Some("could not clear"), Some("WARN")));
        assert_eq!((line["held"].as_u64(), line["target"].as_str()), (Some(2), Some("zerotune_coordinator::lock")));
        assert!(line["timestamp"].is_string());
    }

    #[test]
    fn a_filter_of_warn_drops_info_lines() {
        let text = written_by(LogFormat::Text, "warn", || {
            tracing::info!(target: "zerotune_coordinator::prepare", "token cache hit");
            tracing::warn!(target: "zerotune_coordinator::prepare", "no complete block");
        });
        assert_eq!(text, "warning: no complete block\n");
    }
}
