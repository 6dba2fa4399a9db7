//! `--config FILE` (or `CELERITY_CONFIG`): a TOML file with every worker, beat and client option,
//! and `celerity config check FILE`, which prints the configuration in effect (passwords redacted).
//!
//! The file's keys are the long flags in snake_case: `broker`, `backend`, `log_format`, `loglevel`
//! at the top; `[worker]` (`queues`, `concurrency`, `processes`, `threads`, `hostname`, `events`,
//! `without_heartbeat`, `grace`, `max_tasks_per_child`, `max_memory_per_child`, `rate_limit`,
//! `global_rate_limits`, `beat`, `beat_schedule`, `metrics_addr`) and `[beat]` (`schedule`, `lease`,
//! `state`, `metrics_addr`). A value applies only where neither the command line nor the
//! environment gave one (clap's [`ValueSource`]): flags > environment > file > defaults. An unknown
//! key or a bad value is an error naming the key.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use serde::Deserialize;

use celerity_broker::url::{redact, BrokerUrl};

use super::beat::BeatArgs;
use super::connection::ConnectionArgs;
use super::logs::LogArgs;
use super::worker::{parse_rate_limit, WorkerArgs, WorkerCommand};
use crate::logging::{LogFormat, LogLevel, LogSettings};

/// The environment variable that names the config file when `--config` does not.
pub const CONFIG_ENV: &str = "CELERITY_CONFIG";

/// `--config FILE`.
#[derive(Debug, Clone, Args)]
pub struct ConfigFileArg {
    /// TOML file with worker, beat and client options (flags and environment win over it)
    #[arg(long, global = true, env = CONFIG_ENV, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// `celerity config`.
#[derive(Debug, Clone, Args)]
pub struct ConfigArgs {
    #[command(subcommand)]
    pub what: ConfigWhat,
}

/// What `celerity config` does.
#[derive(Debug, Clone, Subcommand)]
pub enum ConfigWhat {
    /// Check a config file: print the configuration in effect (passwords redacted); exit 2 on an
    /// unknown key or a bad value
    Check {
        /// The TOML file
        file: PathBuf,
    },
}

/// Why a config file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Syntax { path: String, message: String },
    #[error("config file {path}: `{key}`: {message}")]
    Value {
        path: String,
        key: String,
        message: String,
    },
}

/// The file's contents. Every key is optional; absent ones leave the flag's own default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub broker: Option<String>,
    pub backend: Option<String>,
    pub log_format: Option<String>,
    pub loglevel: Option<String>,
    #[serde(default)]
    pub worker: WorkerSection,
    #[serde(default)]
    pub beat: BeatSection,
}

/// `[worker]`: `celerity worker`'s flags (also an application's own worker's).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSection {
    pub queues: Option<Vec<String>>,
    pub concurrency: Option<usize>,
    pub processes: Option<usize>,
    pub threads: Option<u16>,
    pub hostname: Option<String>,
    pub events: Option<bool>,
    pub without_heartbeat: Option<bool>,
    pub grace: Option<f64>,
    pub max_tasks_per_child: Option<u64>,
    pub max_memory_per_child: Option<u64>,
    pub rate_limit: Option<Vec<String>>,
    pub global_rate_limits: Option<bool>,
    pub beat: Option<bool>,
    pub beat_schedule: Option<PathBuf>,
    pub metrics_addr: Option<SocketAddr>,
}

/// `[beat]`: `celerity beat`'s flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BeatSection {
    pub schedule: Option<PathBuf>,
    pub lease: Option<f64>,
    pub state: Option<PathBuf>,
    pub metrics_addr: Option<SocketAddr>,
}

/// A loaded, checked config file.
#[derive(Debug, Default)]
pub struct Config {
    pub file: ConfigFile,
    log_format: Option<LogFormat>,
    loglevel: Option<LogLevel>,
}

impl Config {
    /// Reads and checks `path`: TOML syntax, known keys, value types, then the values themselves.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        Config::parse(&text, &shown)
    }

    /// Checks `text`, the contents of the file `path` (named in errors).
    pub fn parse(text: &str, path: &str) -> Result<Config, ConfigError> {
        let file: ConfigFile = toml::from_str(text).map_err(|e| {
            let message = e.message().trim_end().to_owned();
            match e.span().and_then(|s| key_at(text, s.start)) {
                Some(key) => ConfigError::Value {
                    path: path.to_owned(),
                    key,
                    message,
                },
                None => ConfigError::Syntax {
                    path: path.to_owned(),
                    message: match e.span() {
                        Some(s) => format!("line {}: {message}", line_of(text, s.start)),
                        None => message,
                    },
                },
            }
        })?;
        let bad = |key: &str, message: String| ConfigError::Value {
            path: path.to_owned(),
            key: key.to_owned(),
            message,
        };
        let log_format = parse_opt(&file.log_format).map_err(|m| bad("log_format", m))?;
        let loglevel = parse_opt(&file.loglevel).map_err(|m| bad("loglevel", m))?;
        check_values(&file).map_err(|(key, m)| bad(key, m))?;
        Ok(Config {
            file,
            log_format,
            loglevel,
        })
    }

    /// The file's log settings, under what `flags` and the environment chose.
    pub fn log_settings(&self, format: Option<LogFormat>, level: Option<LogLevel>) -> LogSettings {
        LogSettings {
            format: format.or(self.log_format).unwrap_or_default(),
            flag_level: level,
            file_level: self.loglevel,
        }
    }

    /// Fills `--broker` / `--backend` from the file where `matches` (the top level) has neither a
    /// flag nor a variable.
    pub fn apply_connection(&self, matches: &ArgMatches, conn: &mut ConnectionArgs) {
        fill(matches, "broker", &self.file.broker, &mut conn.broker);
        fill_opt(matches, "backend", &self.file.backend, &mut conn.backend);
    }

    /// Fills the worker's flags from `[worker]` where `matches` has neither a flag nor a variable.
    pub fn apply_worker(&self, matches: &ArgMatches, w: &mut WorkerArgs) {
        let f = &self.file.worker;
        fill(matches, "queues", &f.queues, &mut w.queues);
        fill(matches, "concurrency", &f.concurrency, &mut w.concurrency);
        fill(matches, "processes", &f.processes, &mut w.processes);
        fill(matches, "threads", &f.threads, &mut w.threads);
        fill(matches, "hostname", &f.hostname, &mut w.hostname);
        fill(matches, "events", &f.events, &mut w.events);
        fill(
            matches,
            "without_heartbeat",
            &f.without_heartbeat,
            &mut w.without_heartbeat,
        );
        fill(matches, "grace", &f.grace, &mut w.grace);
        fill_opt(
            matches,
            "max_tasks_per_child",
            &f.max_tasks_per_child,
            &mut w.max_tasks_per_child,
        );
        fill_opt(
            matches,
            "max_memory_per_child",
            &f.max_memory_per_child,
            &mut w.max_memory_per_child,
        );
        fill(matches, "rate_limit", &f.rate_limit, &mut w.rate_limit);
        fill(
            matches,
            "global_rate_limits",
            &f.global_rate_limits,
            &mut w.global_rate_limits,
        );
        let addr = f.metrics_addr.map(|a| a.to_string());
        fill_opt(matches, "metrics_addr", &addr, &mut w.metrics_addr);
    }

    /// [`Config::apply_worker`], and `-B` / `--beat-schedule`.
    pub fn apply_worker_command(&self, matches: &ArgMatches, cmd: &mut WorkerCommand) {
        self.apply_worker(matches, &mut cmd.worker);
        let f = &self.file.worker;
        fill(matches, "beat", &f.beat, &mut cmd.beat);
        fill_opt(
            matches,
            "beat_schedule",
            &f.beat_schedule,
            &mut cmd.beat_schedule,
        );
    }

    /// Fills beat's flags from `[beat]` where `matches` has neither a flag nor a variable.
    pub fn apply_beat(&self, matches: &ArgMatches, b: &mut BeatArgs) {
        let f = &self.file.beat;
        fill_opt(matches, "schedule", &f.schedule, &mut b.schedule);
        fill(matches, "lease", &f.lease, &mut b.lease);
        fill(matches, "state_file", &f.state, &mut b.state_file);
        let addr = f.metrics_addr.map(|a| a.to_string());
        fill_opt(matches, "metrics_addr", &addr, &mut b.metrics_addr);
    }
}

/// True where the user gave no value on the command line or in the environment.
fn unset(matches: &ArgMatches, id: &str) -> bool {
    !matches!(
        matches.value_source(id),
        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
    )
}

fn fill<T: Clone>(matches: &ArgMatches, id: &str, file: &Option<T>, dst: &mut T) {
    if let Some(v) = file.as_ref().filter(|_| unset(matches, id)) {
        *dst = v.clone();
    }
}

fn fill_opt<T: Clone>(matches: &ArgMatches, id: &str, file: &Option<T>, dst: &mut Option<T>) {
    if file.is_some() && unset(matches, id) {
        dst.clone_from(file);
    }
}

fn parse_opt<T: std::str::FromStr<Err = String>>(v: &Option<String>) -> Result<Option<T>, String> {
    v.as_deref().map(str::parse).transpose()
}

/// The checks a value's type does not make; an error names the key.
fn check_values(f: &ConfigFile) -> Result<(), (&'static str, String)> {
    for (key, url) in [("broker", &f.broker), ("backend", &f.backend)] {
        if let Some(u) = url.as_deref().filter(|u| *u != "none" || key == "broker") {
            BrokerUrl::parse(u).map_err(|e| (key, e.to_string()))?;
        }
    }
    let w = &f.worker;
    if w.threads == Some(0) {
        return Err(("worker.threads", "must be at least 1".into()));
    }
    if let Some(g) = w.grace.filter(|g| !(g.is_finite() && *g >= 0.0)) {
        return Err((
            "worker.grace",
            format!("{g} is not a number of seconds ≥ 0"),
        ));
    }
    for spec in w.rate_limit.iter().flatten() {
        parse_rate_limit(spec).map_err(|e| ("worker.rate_limit", format!("`{spec}`: {e}")))?;
    }
    if w.queues
        .as_ref()
        .is_some_and(|q| q.iter().all(|q| q.trim().is_empty()))
    {
        return Err(("worker.queues", "names no queue".into()));
    }
    if let Some(l) = f.beat.lease.filter(|l| !(l.is_finite() && *l >= 0.3)) {
        return Err(("beat.lease", format!("must be ≥ 0.3 seconds, got {l}")));
    }
    Ok(())
}

/// The key (`section.key`) whose name or value starts at byte `at` of `text`: the name before
/// `=` on that line (or, inside a value spread over lines, the nearest such line above), under the
/// last `[section]` header above it. `None` on a header line.
fn key_at(text: &str, at: usize) -> Option<String> {
    let before = text.get(..at)?;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let here = text.get(line_start..)?.lines().next().unwrap_or_default();
    let above = before.get(..line_start)?.lines().rev();
    let mut lines = std::iter::once(here).chain(above).map(str::trim);
    let line = lines.find(|l| l.contains('=') || l.starts_with('['))?;
    if line.starts_with('[') {
        return None;
    }
    let key = line.split('=').next()?.trim().trim_matches('"');
    let section = lines
        .find(|l| l.starts_with('[') && !l.starts_with("[["))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim());
    Some(match section {
        Some(s) => format!("{s}.{key}"),
        None => key.to_owned(),
    })
}

/// The 1-based line of byte `at` in `text`.
fn line_of(text: &str, at: usize) -> usize {
    text.get(..at).map_or(0, |b| b.matches('\n').count()) + 1
}

/// `celerity worker`'s flags alone, to read their defaults and environment.
#[derive(Debug, Parser)]
struct WorkerOnly {
    #[command(flatten)]
    cmd: WorkerCommand,
}

/// `celerity beat`'s flags alone, to read their defaults and environment.
#[derive(Debug, Parser)]
struct BeatOnly {
    #[command(flatten)]
    beat: BeatArgs,
}

/// Runs `celerity config check FILE`: loads and checks the file, prints what a worker and a beat
/// started with it (and no flags of their own) would use, and checks those settings as they would.
/// `top`, `conn` and `log` are the top level's matches, connection and log flags.
pub fn run_check(
    file: &Path,
    top: &ArgMatches,
    conn: &ConnectionArgs,
    log: &LogArgs,
) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let config = Config::load(file)?;
    let mut conn = conn.clone();
    config.apply_connection(top, &mut conn);
    let log = config.log_settings(log.log_format, log.loglevel);
    let m = WorkerOnly::command().try_get_matches_from(["celerity"])?;
    let mut worker = WorkerOnly::from_arg_matches(&m)?.cmd;
    config.apply_worker_command(&m, &mut worker);
    let m = BeatOnly::command().try_get_matches_from(["celerity"])?;
    let mut beat = BeatOnly::from_arg_matches(&m)?.beat;
    config.apply_beat(&m, &mut beat);
    worker.worker.config()?;
    if beat.schedule.is_some() {
        beat.config()?;
    }
    print!("{}", check(&conn, &log, &worker, &beat));
    Ok(ExitCode::SUCCESS)
}

/// `celerity config check FILE`: the configuration in effect for a worker and a beat started with
/// this file and no flags (the environment still wins over the file), as TOML with every URL's
/// password replaced by `****`.
pub fn check(
    conn: &ConnectionArgs,
    log: &LogSettings,
    worker: &WorkerCommand,
    beat: &BeatArgs,
) -> String {
    let w = &worker.worker;
    let mut out = String::new();
    let q = |s: &str| toml_string(s);
    let _ = writeln!(out, "broker = {}", q(&redact(&conn.broker)));
    if let Some(b) = &conn.backend {
        let _ = writeln!(out, "backend = {}", q(&redact(b)));
    }
    let _ = writeln!(out, "log_format = {}", q(log.format.as_str()));
    if let Some(l) = log.flag_level.or(log.file_level) {
        let _ = writeln!(out, "loglevel = {}", q(l.as_str()));
    }
    let list = |v: &[String]| {
        let items: Vec<String> = v.iter().map(|s| toml_string(s)).collect();
        format!("[{}]", items.join(", "))
    };
    let _ = writeln!(out, "\n[worker]");
    let _ = writeln!(out, "queues = {}", list(&w.queues));
    let _ = writeln!(out, "concurrency = {}", w.concurrency);
    let _ = writeln!(out, "processes = {}", w.processes);
    let _ = writeln!(out, "threads = {}", w.threads);
    let _ = writeln!(out, "hostname = {}", q(&w.hostname));
    let _ = writeln!(out, "events = {}", w.events);
    let _ = writeln!(out, "without_heartbeat = {}", w.without_heartbeat);
    let _ = writeln!(out, "grace = {:?}", w.grace);
    if let Some(n) = w.max_tasks_per_child {
        let _ = writeln!(out, "max_tasks_per_child = {n}");
    }
    if let Some(n) = w.max_memory_per_child {
        let _ = writeln!(out, "max_memory_per_child = {n}");
    }
    let _ = writeln!(out, "rate_limit = {}", list(&w.rate_limit));
    let _ = writeln!(out, "global_rate_limits = {}", w.global_rate_limits);
    let _ = writeln!(out, "beat = {}", worker.beat);
    if let Some(s) = &worker.beat_schedule {
        let _ = writeln!(out, "beat_schedule = {}", q(&s.display().to_string()));
    }
    if let Some(a) = &w.metrics_addr {
        let _ = writeln!(out, "metrics_addr = {}", q(a));
    }
    let _ = writeln!(out, "\n[beat]");
    if let Some(s) = &beat.schedule {
        let _ = writeln!(out, "schedule = {}", q(&s.display().to_string()));
    }
    let _ = writeln!(out, "lease = {:?}", beat.lease);
    let _ = writeln!(out, "state = {}", q(&beat.state_file.display().to_string()));
    if let Some(a) = &beat.metrics_addr {
        let _ = writeln!(out, "metrics_addr = {}", q(a));
    }
    out
}

/// `s` as a TOML basic string.
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Config::parse(text, "c.toml").unwrap_err().to_string()
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let e = err("[worker]\nconcurency = 4\n");
        assert!(
            e.contains("`worker.concurency`") && e.contains("unknown field"),
            "{e}"
        );
        let e = err("brokr = \"redis://x\"\n");
        assert!(e.contains("`brokr`"), "{e}");
        let e = err("[worker]\nqueues = [\"a\"]\nconcurrency = \"lots\"\n");
        assert!(
            e.contains("`worker.concurrency`") && e.contains("invalid type"),
            "{e}"
        );
        let e = err("[beat]\nlease = 0.1\n");
        assert!(e.contains("`beat.lease`"), "{e}");
        let e = err("[worker]\nrate_limit = [\"demo.add\"]\n");
        assert!(e.contains("`worker.rate_limit`"), "{e}");
        let e = err("loglevel = \"loud\"\n");
        assert!(e.contains("`loglevel`"), "{e}");
        let e = err("broker = \"nope://x\"\n");
        assert!(e.contains("`broker`"), "{e}");
        let e = err("[worker]\nmetrics_addr = \"here\"\n");
        assert!(e.contains("`worker.metrics_addr`"), "{e}");
        let e = err("[worker\n");
        assert!(e.starts_with("config file c.toml: line 1: "), "{e}");
        assert_eq!(e.lines().count(), 1, "{e}");
        let e = err("[beat]\nlease = 1\n[worker]\nqueues = [\n  \"a\",\n  7,\n]\n");
        assert!(
            e.contains("`worker.queues`") && e.contains("invalid type"),
            "{e}"
        );
        let e = err("[workers]\nconcurrency = 1\n");
        assert!(
            e.contains("line 1") && e.contains("unknown field `workers`"),
            "{e}"
        );
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let c = Config::parse(
            "[worker]\nconcurrency = 3\nqueues = [\"f\"]\nevents = true\nbeat = true\n\
             [beat]\nlease = 9\nstate = \"st.json\"\n",
            "c.toml",
        )
        .unwrap();
        let worker = |argv: &[&str]| {
            let m = WorkerOnly::command().try_get_matches_from(argv).unwrap();
            let mut w = WorkerOnly::from_arg_matches(&m).unwrap().cmd;
            c.apply_worker_command(&m, &mut w);
            w
        };
        let w = worker(&["x", "-c", "5", "-Q", "a,b"]);
        assert_eq!(
            (w.worker.concurrency, w.worker.queues.clone()),
            (5, vec!["a".into(), "b".into()])
        );
        let w = worker(&["x"]);
        assert_eq!(
            (w.worker.concurrency, w.worker.queues.clone()),
            (3, vec!["f".to_owned()])
        );
        assert!(w.worker.events && w.beat);
        assert_eq!(w.worker.grace, 30.0);
        let m = BeatOnly::command()
            .try_get_matches_from(["x", "--lease", "2", "-s", "s.toml"])
            .unwrap();
        let mut b = BeatOnly::from_arg_matches(&m).unwrap().beat;
        c.apply_beat(&m, &mut b);
        assert_eq!((b.lease, b.state_file), (2.0, PathBuf::from("st.json")));
    }

    /// `metrics_addr` from the file reaches `--metrics-addr` of worker and beat, and the flag wins.
    #[test]
    fn metrics_addr_comes_from_the_file_unless_a_flag_gives_one() {
        let c = Config::parse(
            "[worker]\nmetrics_addr = \"127.0.0.1:9100\"\n[beat]\nmetrics_addr = \"127.0.0.1:9101\"\n",
            "c.toml",
        )
        .unwrap();
        let worker = |argv: &[&str]| {
            let m = WorkerOnly::command().try_get_matches_from(argv).unwrap();
            let mut w = WorkerOnly::from_arg_matches(&m).unwrap().cmd;
            c.apply_worker_command(&m, &mut w);
            w.worker.metrics_addr
        };
        assert_eq!(worker(&["x"]).as_deref(), Some("127.0.0.1:9100"));
        assert_eq!(
            worker(&["x", "--metrics-addr", "0.0.0.0:1"]).as_deref(),
            Some("0.0.0.0:1")
        );
        let m = BeatOnly::command()
            .try_get_matches_from(["x", "-s", "s.toml"])
            .unwrap();
        let mut b = BeatOnly::from_arg_matches(&m).unwrap().beat;
        c.apply_beat(&m, &mut b);
        assert_eq!(b.metrics_addr.as_deref(), Some("127.0.0.1:9101"));
    }

    #[test]
    fn a_full_file_loads() {
        let c = Config::parse(
            "broker = \"redis://127.0.0.1:6379/0\"\nlog_format = \"json\"\nloglevel = \"WARNING\"\n\
             [worker]\nqueues = [\"a\", \"b\"]\nconcurrency = 8\nprocesses = 0\nthreads = 2\n\
             rate_limit = [\"demo.add=10/s\"]\nmetrics_addr = \"127.0.0.1:9100\"\n\
             [beat]\nschedule = \"s.toml\"\nlease = 5\nstate = \"st.json\"\n",
            "c.toml",
        )
        .unwrap();
        assert_eq!(c.file.worker.concurrency, Some(8));
        assert_eq!(c.log_format, Some(LogFormat::Json));
        assert_eq!(c.loglevel, Some(LogLevel::Warning));
        assert_eq!(c.file.beat.lease, Some(5.0));
    }
}
