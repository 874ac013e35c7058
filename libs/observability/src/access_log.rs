//! The access line: the one log line every request writes, in the same bunyan record as
//! every other line, written without the general formatter's intermediate maps.
//!
//! `tracing-bunyan-formatter` collects an event's fields into a `HashMap` of
//! `serde_json::Value`s, hashes every key against its skip list, and builds the message and
//! timestamp as new strings before serialising. For the one line written per request that
//! was most of the cost of observability (about 3 us of a service's CPU per request). This
//! layer writes the same record (keys, values, levels and message form; checked against
//! the formatter by the tests) straight into a reused buffer. It reads the request span's
//! fields from the formatter's own `JsonStorage`, so spans are stored once, the usual way.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::io::Write;

use time::format_description::well_known::Rfc3339;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_bunyan_formatter::JsonStorage;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

/// Target of the one access-log line written per request; it follows `RUST_LOG`.
pub const ACCESS_LOG_TARGET: &str = "access_log";

/// Writes [`ACCESS_LOG_TARGET`] events as bunyan lines (the telemetry subscriber hands it
/// those; every other event goes to the general formatter).
pub struct AccessLog<W> {
    writer: W,
    /// `{"v":0,"name":"<service>","msg":`: the same for every line.
    head: Vec<u8>,
    /// `,"hostname":"...","pid":N,"time":`
    host_and_pid: Vec<u8>,
    /// `,"target":"access_log"` and the default fields (service, version, environment).
    target_and_defaults: Vec<u8>,
}

impl<W> AccessLog<W> {
    /// `defaults` are the fields stamped on every line, as given to the bunyan formatter.
    pub fn new(name: &str, defaults: &HashMap<String, serde_json::Value>, writer: W) -> Self {
        let mut head = b"{\"v\":0,\"name\":".to_vec();
        json_string(&mut head, name);
        head.extend_from_slice(b",\"msg\":");
        let mut host_and_pid = b",\"hostname\":".to_vec();
        json_string(&mut host_and_pid, &gethostname::gethostname().to_string_lossy());
        let _ = write!(host_and_pid, ",\"pid\":{},\"time\":", std::process::id());
        let mut target_and_defaults = b",\"target\":".to_vec();
        json_string(&mut target_and_defaults, ACCESS_LOG_TARGET);
        for (key, value) in defaults.iter().filter(|(key, _)| key.as_str() != "message" && !is_core(key)) {
            json_entry(&mut target_and_defaults, key, value);
        }
        Self { writer, head, host_and_pid, target_and_defaults }
    }
}

/// Reused for every line a thread writes, so that a line allocates nothing.
#[derive(Default)]
struct Buffers {
    line: Vec<u8>,
    fields: Vec<u8>,
    message: String,
    scratch: String,
    /// The last span name seen and its message prefix, `[HTTP_REQUEST - EVENT] `.
    span_prefix: (&'static str, String),
}

thread_local! {
    static BUFFERS: RefCell<Buffers> = RefCell::new(Buffers::default());
}

impl<W: for<'a> MakeWriter<'a>> AccessLog<W> {
    /// Writes `event`, an [`ACCESS_LOG_TARGET`] event, as one line.
    pub fn write<S>(&self, event: &Event<'_>, ctx: &Context<'_, S>)
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        BUFFERS.with(|buffers| match buffers.try_borrow_mut() {
            Ok(mut buffers) => self.write_line(&mut buffers, event, ctx),
            // Only if writing a line logged another one: give it buffers of its own.
            Err(_) => self.write_line(&mut Buffers::default(), event, ctx),
        });
    }

    fn write_line<S>(&self, buffers: &mut Buffers, event: &Event<'_>, ctx: &Context<'_, S>)
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        let Buffers { line, fields, message, scratch, span_prefix } = buffers;
        line.clear();
        fields.clear();
        message.clear();
        let mut visitor = EventFields { fields, message, scratch, has_message: false };
        event.record(&mut visitor);
        let has_message = visitor.has_message;
        let span = ctx.lookup_current();

        line.extend_from_slice(&self.head);
        // The formatter's message form: "[SPAN_NAME - EVENT] message", or the target when
        // the event has no message.
        scratch.clear();
        if let Some(span) = &span {
            let name = span.metadata().name();
            if span_prefix.0 != name {
                span_prefix.1.clear();
                let _ = write!(span_prefix.1, "[{} - EVENT] ", name.to_uppercase());
                span_prefix.0 = name;
            }
            scratch.push_str(&span_prefix.1);
        }
        scratch.push_str(if has_message { message.as_str() } else { event.metadata().target() });
        json_string(line, scratch);
        let _ = write!(line, ",\"level\":{}", bunyan_level(*event.metadata().level()));
        line.extend_from_slice(&self.host_and_pid);
        line.push(b'"');
        let _ = time::OffsetDateTime::now_utc().format_into(line, &Rfc3339);
        line.push(b'"');
        line.extend_from_slice(&self.target_and_defaults);
        line.extend_from_slice(fields);
        if let Some(span) = &span
            && let Some(stored) = span.extensions().get::<JsonStorage>()
        {
            for (key, value) in stored.values().iter().filter(|(key, _)| !is_core(key)) {
                json_entry(line, key, value);
            }
        }
        line.extend_from_slice(b"}\n");
        let _ = self.writer.make_writer_for(event.metadata()).write_all(line);
    }
}

/// An event's fields as `,"key":value` text, the way the formatter's visitor records them;
/// the message is kept apart.
struct EventFields<'a> {
    fields: &'a mut Vec<u8>,
    message: &'a mut String,
    scratch: &'a mut String,
    has_message: bool,
}

impl EventFields<'_> {
    /// The key, or `None` for fields the line leaves out.
    fn key<'f>(&self, field: &'f Field) -> Option<&'f str> {
        let name = field.name();
        (!is_core(name) && name != "message").then_some(name)
    }

    fn number(&mut self, field: &Field, value: impl serde::Serialize) {
        if let Some(key) = self.key(field) {
            json_key(self.fields, key);
            let _ = serde_json::to_writer(&mut *self.fields, &value);
        }
    }
}

impl Visit for EventFields<'_> {
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.number(field, value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.number(field, value);
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // Not finite: null, as `serde_json::Value::from` makes it.
        self.number(field, value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.number(field, value);
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.clear();
            self.message.push_str(value);
            self.has_message = true;
        } else if let Some(key) = self.key(field) {
            json_key(self.fields, key);
            json_string(self.fields, value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let name = field.name();
        if name.starts_with("log.") {
            return;
        }
        let name = name.strip_prefix("r#").unwrap_or(name);
        if name == "message" {
            self.message.clear();
            let _ = write!(self.message, "{value:?}");
            self.has_message = true;
        } else if !is_core(name) {
            self.scratch.clear();
            let _ = write!(self.scratch, "{value:?}");
            json_key(self.fields, name);
            json_string(self.fields, self.scratch);
        }
    }
}

fn is_core(key: &str) -> bool {
    matches!(key, "v" | "level" | "name" | "hostname" | "pid" | "time" | "msg")
}

fn bunyan_level(level: Level) -> u8 {
    match level {
        Level::ERROR => 50,
        Level::WARN => 40,
        Level::INFO => 30,
        Level::DEBUG => 20,
        Level::TRACE => 10,
    }
}

fn json_key(out: &mut Vec<u8>, key: &str) {
    out.push(b',');
    json_string(out, key);
    out.push(b':');
}

fn json_entry(out: &mut Vec<u8>, key: &str, value: &serde_json::Value) {
    json_key(out, key);
    match value {
        serde_json::Value::String(text) => json_string(out, text),
        other => {
            let _ = serde_json::to_writer(&mut *out, other);
        }
    }
}

/// A JSON string. Almost every value (ids, paths, routes) needs no escaping and is copied
/// as it is; the rest goes through serde_json.
fn json_string(out: &mut Vec<u8>, text: &str) {
    // Without an early exit, so the scan is vectorised.
    let needs_escaping = text.bytes().fold(false, |found, b| found | (b < 0x20) | (b == b'"') | (b == b'\\'));
    if !needs_escaping {
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
    } else {
        let _ = serde_json::to_writer(&mut *out, text);
    }
}
