//! Where the `celerity` processes' logs go and how they look: `tracing` events on stderr, either as
//! plain text (colour only on a terminal, never with `NO_COLOR` set) or as one JSON object per line
//! (`--log-format json`), filtered by `-l/--loglevel` (Celery's level names), else `CELERITY_LOG`
//! (an `EnvFilter` directive), else the config file's `loglevel`, else the verb's default.

use std::fmt;
use std::io::IsTerminal;
use std::str::FromStr;
use std::sync::OnceLock;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// The environment variable with a filter directive (`info`, `celerity_worker=debug,warn`, …).
pub const LOG_ENV: &str = "CELERITY_LOG";
/// The environment variable that gives `--log-format`.
pub const LOG_FORMAT_ENV: &str = "CELERITY_LOG_FORMAT";

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines; coloured only when stderr is a terminal and `NO_COLOR` is unset.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `message`, `task_id` and
    /// `task_name` where the event names a job, then the event's other fields.
    Json,
}

impl LogFormat {
    /// The name used on the command line and in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "text" | "plain" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("`{other}` is not a log format (text or json)")),
        }
    }
}

/// A log level, spelled as Celery's `-l/--loglevel` spells it (any case): `debug`, `info`,
/// `warning` (or `warn`), `error`, `critical` (or `fatal`, the same as `error` here), and `trace`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warning,
    Error,
}

impl LogLevel {
    /// The name printed by `config check`.
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Trace => "trace",
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warning => "warning",
            LogLevel::Error => "error",
        }
    }

    fn directive(self) -> &'static str {
        match self {
            LogLevel::Warning => "warn",
            other => other.as_str(),
        }
    }
}

impl FromStr for LogLevel {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "trace" => Ok(LogLevel::Trace),
            "debug" => Ok(LogLevel::Debug),
            "info" => Ok(LogLevel::Info),
            "warning" | "warn" => Ok(LogLevel::Warning),
            "error" | "critical" | "fatal" => Ok(LogLevel::Error),
            other => Err(format!(
                "`{other}` is not a log level (debug, info, warning, error, critical)"
            )),
        }
    }
}

/// What the command line, the environment and the config file chose.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogSettings {
    pub format: LogFormat,
    /// From `-l` (wins over `CELERITY_LOG`).
    pub flag_level: Option<LogLevel>,
    /// From the config file (loses to `CELERITY_LOG`).
    pub file_level: Option<LogLevel>,
}

static FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// The format this process logs in (text until [`init`] chose).
pub fn format() -> LogFormat {
    FORMAT.get().copied().unwrap_or_default()
}

/// Installs the stderr logger. The level: `-l`, else `CELERITY_LOG`, else the file's, else
/// `default`. A line that cannot be written (stderr closed, its reader gone) is dropped: the
/// subscriber's default is to report that with `eprintln!`, which panics on the same closed stderr.
pub fn init(settings: &LogSettings, default: &str) {
    let filter = match (settings.flag_level, EnvFilter::try_from_env(LOG_ENV)) {
        (Some(level), _) => EnvFilter::new(level.directive()),
        (None, Ok(env)) => env,
        (None, Err(_)) => EnvFilter::new(settings.file_level.map_or(default, |l| l.directive())),
    };
    let _ = FORMAT.set(settings.format);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    let _ = match settings.format {
        LogFormat::Text => builder.with_ansi(colour()).try_init(),
        LogFormat::Json => builder.event_format(JsonLines).try_init(),
    };
}

/// Colour escapes only for a person at a terminal: never into files, pipes or journald, and never
/// when `NO_COLOR` is set to anything but the empty string (<https://no-color.org>).
fn colour() -> bool {
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    !no_color && std::io::stderr().is_terminal()
}

/// Writes each event as one JSON object on one line. The worker's own field names for a job, `id`
/// and `task`, come out as `task_id` and `task_name`.
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut fields = Fields::default();
        event.record(&mut fields);
        let mut line = Map::new();
        line.insert(
            "timestamp".into(),
            Value::String(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
        );
        line.insert("level".into(), Value::String(meta.level().as_str().into()));
        line.insert("target".into(), Value::String(meta.target().into()));
        line.insert(
            "message".into(),
            fields.message.unwrap_or(Value::String(String::new())),
        );
        for (first, named) in [("task_id", "id"), ("task_name", "task")] {
            if let Some(v) = fields
                .rest
                .remove(first)
                .or_else(|| fields.rest.remove(named))
            {
                line.insert(first.into(), v);
            }
        }
        line.extend(fields.rest);
        let text = serde_json::to_string(&Value::Object(line)).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

/// An event's fields as JSON values.
#[derive(Default)]
struct Fields {
    message: Option<Value>,
    rest: Map<String, Value>,
}

impl Fields {
    fn put(&mut self, field: &Field, value: Value) {
        if field.name() == "message" {
            self.message = Some(value);
        } else {
            self.rest.insert(field.name().to_owned(), value);
        }
    }
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, Value::String(format!("{value:?}")));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::String(value.to_owned()));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::from(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::from(value));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, Value::from(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::Bool(value));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, Value::String(value.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn celery_level_names_parse_in_any_case() {
        assert_eq!("INFO".parse(), Ok(LogLevel::Info));
        assert_eq!("Warning".parse(), Ok(LogLevel::Warning));
        assert_eq!("warn".parse(), Ok(LogLevel::Warning));
        assert_eq!("CRITICAL".parse(), Ok(LogLevel::Error));
        assert!("loud".parse::<LogLevel>().is_err());
        assert_eq!("JSON".parse(), Ok(LogFormat::Json));
        assert!("xml".parse::<LogFormat>().is_err());
    }
}
