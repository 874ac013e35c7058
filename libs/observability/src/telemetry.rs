//! JSON logging: one bunyan object per line, carrying the service, version and environment,
//! the level, the message and the fields of every enclosing span.

use std::collections::HashMap;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Event, Metadata, Subscriber};
use tracing_bunyan_formatter::{BunyanFormattingLayer, JsonStorageLayer};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::ServiceInfo;
use crate::access_log::{ACCESS_LOG_TARGET, AccessLog};
use crate::batched_writer::{BatchedWriter, BatchedWriterGuard};

/// Target of the per-request root span. It is always enabled, whatever `RUST_LOG` says, so
/// that its fields (`request_id` first of all) reach every line logged while serving a
/// request, even a WARN line when the level is WARN.
pub const REQUEST_SPAN_TARGET: &str = "http_request";

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// Filter used when `RUST_LOG` is unset, in `EnvFilter` syntax (`info`, `warn,sqlx=error`).
    pub level: String,
}

#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    #[error("invalid log filter {filter:?} (from {source_name}): {reason}")]
    InvalidFilter { filter: String, source_name: &'static str, reason: String },
    #[error("cannot start the log writer thread: {0}")]
    WriterThread(io::Error),
}

/// Keeps the background log writer alive; dropping it flushes what is still queued.
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard {
    _writer: Option<BatchedWriterGuard>,
}

/// Logs to stdout through a background writer thread, so a slow terminal or pipe never
/// blocks a request. Lines are never dropped: when too much is queued, callers wait. Lines
/// reach stdout in batches, at most a few milliseconds after they were logged.
pub fn init_stdout(service: &ServiceInfo, settings: &LogSettings) -> Result<LogGuard, LoggingError> {
    let (writer, guard) = BatchedWriter::spawn(io::stdout()).map_err(LoggingError::WriterThread)?;
    let installed = init(service, settings, writer)?;
    // If logging was already set up, this writer is unused: let its thread go.
    Ok(LogGuard { _writer: installed.then_some(guard) })
}

/// Installs the global subscriber writing to `writer`. Returns `false` (and changes nothing)
/// when a subscriber is already installed, so repeated calls, as in tests, are harmless.
pub fn init<W>(service: &ServiceInfo, settings: &LogSettings, writer: W) -> Result<bool, LoggingError>
where
    W: for<'a> MakeWriter<'a> + Clone + Send + Sync + 'static,
{
    let filter = build_filter(std::env::var("RUST_LOG").ok(), &settings.level)?;
    Ok(subscriber(service, filter, writer).try_init().is_ok())
}

fn subscriber<W>(service: &ServiceInfo, filter: LogFilter, writer: W) -> impl Subscriber + Send + Sync + 'static
where
    W: for<'a> MakeWriter<'a> + Clone + Send + Sync + 'static,
{
    let default_fields = default_fields(service);
    let access_log = AccessLog::new(service.name, &default_fields, writer.clone());
    let formatter = bunyan_formatter(service, default_fields, writer);
    Registry::default().with(filter).with(SpanFieldsOnly(JsonStorageLayer)).with(EventLines { formatter, access_log })
}

/// Stamped on every line.
fn default_fields(service: &ServiceInfo) -> HashMap<String, serde_json::Value> {
    HashMap::from([
        ("service".to_owned(), serde_json::Value::from(service.name)),
        ("version".to_owned(), serde_json::Value::from(service.version)),
        ("environment".to_owned(), serde_json::Value::from(service.environment.as_str())),
    ])
}

fn bunyan_formatter<W>(
    service: &ServiceInfo,
    default_fields: HashMap<String, serde_json::Value>,
    writer: W,
) -> BunyanFormattingLayer<W>
where
    W: for<'a> MakeWriter<'a> + 'static,
{
    // Source file and line of every line are noise that costs bytes; the access line (see
    // `access_log`) has none either. Lines bridged from the `log` crate name theirs
    // `log.file` and `log.line`: an absolute path on the machine that built a dependency.
    BunyanFormattingLayer::with_default_fields(service.name.to_owned(), writer, default_fields)
        .skip_fields(["file", "line", "log.file", "log.line"].into_iter())
        .expect("none of these is a core bunyan field")
}

/// `RUST_LOG` when set and not blank, else the configured level; the request root span is
/// enabled in both cases.
fn build_filter(rust_log: Option<String>, default_level: &str) -> Result<LogFilter, LoggingError> {
    let (filter, source_name) = match rust_log {
        Some(value) if !value.trim().is_empty() => (value, "RUST_LOG"),
        _ => (default_level.to_owned(), "log.level"),
    };
    let invalid = |reason: String| LoggingError::InvalidFilter { filter: filter.clone(), source_name, reason };
    let root_span = format!("{REQUEST_SPAN_TARGET}=info").parse().map_err(|e| invalid(format!("{e}")))?;
    let env_filter = EnvFilter::builder().parse(&filter).map_err(|e| invalid(e.to_string()))?;
    // Span-scoped directives are the only ones written with brackets: `target[span{field}]=level`.
    Ok(LogFilter { filter: env_filter.add_directive(root_span), span_scoped: filter.contains('[') })
}

/// The log filter: [`EnvFilter`], minus its span bookkeeping when no directive needs it.
///
/// To apply span-scoped directives, `EnvFilter` looks every span up in a process-wide map
/// under a read lock when the span is created, entered, exited, recorded and closed. With no
/// such directive the map stays empty, but the lock is still taken several times per request
/// by every worker thread, and the workers contend for it.
#[derive(Debug)]
struct LogFilter {
    filter: EnvFilter,
    span_scoped: bool,
}

impl<S: Subscriber> Layer<S> for LogFilter {
    fn register_callsite(&self, metadata: &'static Metadata<'static>) -> Interest {
        Layer::<S>::register_callsite(&self.filter, metadata)
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Layer::<S>::max_level_hint(&self.filter)
    }

    fn enabled(&self, metadata: &Metadata<'_>, ctx: Context<'_, S>) -> bool {
        Layer::<S>::enabled(&self.filter, metadata, ctx)
    }

    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if self.span_scoped {
            Layer::<S>::on_new_span(&self.filter, attrs, id, ctx);
        }
    }

    fn on_record(&self, span: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if self.span_scoped {
            Layer::<S>::on_record(&self.filter, span, values, ctx);
        }
    }

    fn on_enter(&self, id: &Id, ctx: Context<'_, S>) {
        if self.span_scoped {
            Layer::<S>::on_enter(&self.filter, id, ctx);
        }
    }

    fn on_exit(&self, id: &Id, ctx: Context<'_, S>) {
        if self.span_scoped {
            Layer::<S>::on_exit(&self.filter, id, ctx);
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        if self.span_scoped {
            Layer::<S>::on_close(&self.filter, id, ctx);
        }
    }
}

/// One line per event: access lines by [`AccessLog`], every other event by the bunyan
/// formatter. Only events: the bunyan layer also writes a line when a span opens and one when
/// it closes; per request that would triple the log volume for no extra information (the
/// access line carries the outcome and duration).
struct EventLines<F, W> {
    formatter: F,
    access_log: AccessLog<W>,
}

impl<S, F, W> Layer<S> for EventLines<F, W>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    F: Layer<S>,
    W: for<'a> MakeWriter<'a> + 'static,
{
    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        if event.metadata().target() == ACCESS_LOG_TARGET {
            self.access_log.write(event, &ctx);
        } else {
            self.formatter.on_event(event, ctx);
        }
    }
}

/// Forwards span creation and recorded fields only. The storage layer also times every span
/// (an `Instant` stored on first entry, `elapsed_milliseconds` added on close), which only
/// span lines would show, and [`EventLines`] writes none.
struct SpanFieldsOnly<L>(L);

impl<S, L> Layer<S> for SpanFieldsOnly<L>
where
    S: Subscriber,
    L: Layer<S>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        self.0.on_new_span(attrs, id, ctx);
    }

    fn on_record(&self, span: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        self.0.on_record(span, values, ctx);
    }
}

/// An in-memory log sink for tests: install it with [`init`] and read the lines back.
#[derive(Clone, Default)]
pub struct CapturedLogs(Arc<Mutex<Vec<u8>>>);

impl CapturedLogs {
    /// Every line written so far, parsed as JSON.
    ///
    /// # Panics
    /// When a line is not a JSON object: that is the very defect tests look for.
    pub fn lines(&self) -> Vec<serde_json::Value> {
        let bytes = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        String::from_utf8_lossy(&bytes)
            .lines()
            .map(|line| {
                let value: serde_json::Value =
                    serde_json::from_str(line).unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
                assert!(value.is_object(), "log line is not a JSON object: {line}");
                value
            })
            .collect()
    }

    /// The raw text written so far, to search for strings that must never be logged.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }
}

impl<'a> MakeWriter<'a> for CapturedLogs {
    type Writer = CapturedLogsWriter;

    fn make_writer(&'a self) -> Self::Writer {
        CapturedLogsWriter(self.0.clone())
    }
}

pub struct CapturedLogsWriter(Arc<Mutex<Vec<u8>>>);

impl Write for CapturedLogsWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(buf);
        if std::env::var_os("TEST_LOG").is_some() {
            io::stdout().write_all(buf)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service() -> ServiceInfo {
        ServiceInfo { name: "unit", version: "1.2.3", environment: "test".to_owned() }
    }

    fn capture(filter: &str, body: impl FnOnce()) -> Vec<serde_json::Value> {
        let logs = CapturedLogs::default();
        let filter = build_filter(None, filter).unwrap();
        tracing::subscriber::with_default(subscriber(&service(), filter, logs.clone()), body);
        logs.lines()
    }

    /// The event lines `tracing-bunyan-formatter` alone writes for `body`: the records the
    /// access lines must match.
    fn capture_with_the_bunyan_formatter_alone(body: impl FnOnce()) -> Vec<serde_json::Value> {
        let logs = CapturedLogs::default();
        let reference = Registry::default().with(LevelFilter::TRACE).with(JsonStorageLayer).with(bunyan_formatter(
            &service(),
            default_fields(&service()),
            logs.clone(),
        ));
        tracing::subscriber::with_default(reference, body);
        let is_span_line = |line: &serde_json::Value| {
            line["msg"].as_str().is_some_and(|msg| msg.ends_with(" - START]") || msg.ends_with(" - END]"))
        };
        logs.lines().into_iter().filter(|line| !is_span_line(line)).collect()
    }

    /// The line without its timestamp, after checking that the timestamp is RFC 3339.
    fn untimed(mut line: serde_json::Value) -> serde_json::Value {
        let time = line.as_object_mut().and_then(|fields| fields.remove("time"));
        let time = time.as_ref().and_then(|t| t.as_str()).unwrap_or_else(|| panic!("no time in {line}"));
        time::OffsetDateTime::parse(time, &time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|e| panic!("time {time:?} is not RFC 3339: {e}"));
        line
    }

    fn access_lines() {
        let root = tracing::info_span!(
            target: REQUEST_SPAN_TARGET,
            "http_request",
            request_id = "r-9",
            method = "GET",
            path = "/a \"quoted\"\tpath/ü\u{1}",
            client = tracing::field::Empty,
            pid = "a span field named like a core field",
        );
        let _root = root.enter();
        root.record("client", "key-id");
        let cause = "upstream said \"no\"\nand hung up";
        tracing::info!(target: ACCESS_LOG_TARGET, status = 200, latency_ms = 1.25, "request completed");
        tracing::error!(target: ACCESS_LOG_TARGET, status = 503u16, error = %cause, "request completed");
        tracing::info!(
            target: ACCESS_LOG_TARGET,
            ratio = f64::NAN,
            delta = -3i64,
            cached = true,
            r#type = "raw identifier",
            name = "an event field named like a core field",
            "with {} arguments",
            2
        );
        tracing::warn!(target: ACCESS_LOG_TARGET, status = 499);
        let inner = tracing::info_span!("inner", table = "items");
        inner.in_scope(|| tracing::info!(target: ACCESS_LOG_TARGET, "in a nested span"));
        drop(_root);
        tracing::info!(target: ACCESS_LOG_TARGET, status = 404, "outside any span");
    }

    #[test]
    fn access_lines_are_the_records_the_bunyan_formatter_writes() {
        let ours: Vec<_> = capture("trace", access_lines).into_iter().map(untimed).collect();
        let reference: Vec<_> =
            capture_with_the_bunyan_formatter_alone(access_lines).into_iter().map(untimed).collect();
        assert_eq!(ours.len(), 6, "one line per event: {ours:#?}");
        assert_eq!(ours, reference);
        // What the comparison covers, so that it cannot pass on two empty records.
        assert_eq!(ours[0]["msg"], "[HTTP_REQUEST - EVENT] request completed");
        assert_eq!(ours[0]["path"], "/a \"quoted\"\tpath/ü\u{1}");
        assert_eq!(ours[0]["client"], "key-id");
        assert_eq!(ours[1]["level"], 50);
        assert_eq!(ours[1]["error"], "upstream said \"no\"\nand hung up");
        assert_eq!(ours[2]["ratio"], serde_json::Value::Null);
        assert_eq!(ours[2]["type"], "raw identifier");
        assert_eq!(ours[2]["name"], "unit");
        assert_eq!(ours[3]["msg"], "[HTTP_REQUEST - EVENT] access_log");
        assert_eq!(ours[4]["table"], "items");
        assert_eq!(ours[4]["request_id"], "r-9");
        assert_eq!(ours[5]["msg"], "outside any span");
        assert!(ours[5].get("request_id").is_none());
    }

    #[test]
    fn access_lines_follow_the_filter() {
        let lines = capture("info,access_log=warn", || {
            tracing::info!(target: ACCESS_LOG_TARGET, status = 200, "request completed");
            tracing::error!(target: ACCESS_LOG_TARGET, status = 500, "request completed");
        });
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0]["status"], 500);
    }

    #[test]
    fn lines_carry_service_version_environment_level_and_message() {
        let lines = capture("info", || tracing::info!(answer = 42, "hello"));
        assert_eq!(lines.len(), 1);
        let line = &lines[0];
        assert_eq!(line["service"], "unit");
        assert_eq!(line["name"], "unit");
        assert_eq!(line["version"], "1.2.3");
        assert_eq!(line["environment"], "test");
        assert_eq!(line["level"], 30);
        assert_eq!(line["msg"], "hello");
        assert_eq!(line["answer"], 42);
        assert!(line["time"].is_string());
    }

    #[test]
    fn lines_bridged_from_the_log_crate_carry_no_source_location() {
        // The fields `tracing-log` gives an event it bridges from a `log` record.
        let lines = capture("info", || {
            tracing::warn!(
                log.target = "h2::codec",
                log.module_path = "h2::codec",
                log.file = "/root/.cargo/registry/src/index/h2-0.4.0/src/codec/mod.rs",
                log.line = 42u32,
                "bridged"
            );
        });
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0]["msg"], "bridged");
        assert_eq!(lines[0]["log.target"], "h2::codec");
        assert!(lines[0].get("log.file").is_none(), "{}", lines[0]);
        assert!(lines[0].get("log.line").is_none(), "{}", lines[0]);
    }

    #[test]
    fn span_fields_reach_nested_events_and_no_span_lines_are_written() {
        let lines = capture("info", || {
            let root = tracing::info_span!(target: REQUEST_SPAN_TARGET, "http_request", request_id = "r-1");
            let _root = root.enter();
            let inner = tracing::info_span!("query", table = "items");
            let _inner = inner.enter();
            tracing::info!("inside");
        });
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0]["request_id"], "r-1");
        assert_eq!(lines[0]["table"], "items");
    }

    #[test]
    fn fields_recorded_on_a_span_after_it_opened_reach_later_events() {
        let lines = capture("info", || {
            let root = tracing::info_span!(
                target: REQUEST_SPAN_TARGET,
                "http_request",
                request_id = "r-3",
                client = tracing::field::Empty
            );
            let _root = root.enter();
            tracing::info!("before");
            root.record("client", "key-id");
            tracing::info!("after");
        });
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].get("client").is_none());
        assert_eq!(lines[1]["client"], "key-id");
        assert_eq!(lines[1]["request_id"], "r-3");
    }

    #[test]
    fn span_scoped_directives_still_apply() {
        let lines = capture("warn,[http_request{client=dev}]=debug", || {
            tracing::debug!("outside: filtered out");
            for (request_id, client) in [("r-4", "dev"), ("r-5", "other")] {
                let root = tracing::info_span!(
                    target: REQUEST_SPAN_TARGET,
                    "http_request",
                    request_id,
                    client = tracing::field::Empty
                );
                root.record("client", client);
                let _root = root.enter();
                tracing::debug!("kept for client dev only");
            }
        });
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0]["request_id"], "r-4");
        assert_eq!(lines[0]["level"], 20);
    }

    #[test]
    fn request_id_survives_a_level_above_info() {
        let lines = capture("warn", || {
            let root = tracing::info_span!(target: REQUEST_SPAN_TARGET, "http_request", request_id = "r-2");
            let _root = root.enter();
            tracing::info!("filtered out");
            tracing::warn!("kept");
        });
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0]["msg"].as_str().map(|m| m.ends_with("kept")), Some(true));
        assert_eq!(lines[0]["request_id"], "r-2");
        assert_eq!(lines[0]["level"], 40);
    }

    #[test]
    fn rust_log_wins_over_the_configured_level_and_bad_filters_are_named() {
        let lines = capture("off", || tracing::error!("never"));
        assert!(lines.is_empty());
        assert!(build_filter(Some("debug".to_owned()), "off").is_ok());
        let error = build_filter(Some("info,=[".to_owned()), "info").unwrap_err().to_string();
        assert!(error.contains("RUST_LOG"), "{error}");
        let error = build_filter(None, "app=loud").unwrap_err().to_string();
        assert!(error.contains("log.level"), "{error}");
    }
}
