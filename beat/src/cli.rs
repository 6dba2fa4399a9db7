//! `celerity beat`: the flags ([`BeatArgs`]), the daemon entry point ([`run_beat`]) and the text
//! `--check` prints ([`check`]).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use clap::Args;
use tokio_util::sync::CancellationToken;

use celerity_broker::connect_broker;
use celerity_client::cli::ConnectionArgs;
use celerity_client::Client;

use crate::error::{BeatError, Result};
use crate::reload;
use crate::schedule::{self, Entry, When};
use crate::state::{AmqpPlaces, Store, DEFAULT_LOCK_QUEUE, DEFAULT_STATE_FILE};
use crate::ticker::Ticker;

/// `celerity beat`.
#[derive(Debug, Clone, Args)]
pub struct BeatArgs {
    /// Schedule file (TOML) to run
    #[arg(
        short = 's',
        long,
        env = "CELERITY_BEAT_SCHEDULE",
        required_unless_present = "check"
    )]
    pub schedule: Option<PathBuf>,
    /// Check a schedule file and print each entry's next five fire times, then exit
    #[arg(long, value_name = "FILE")]
    pub check: Option<PathBuf>,
    /// Leader lock lease in seconds: a standby takes over at most this long after the leader dies
    #[arg(long, default_value_t = 30.0)]
    pub lease: f64,
    /// Last-run state file, used where the broker is amqp:// (Redis keeps it in a hash)
    #[arg(long = "state", value_name = "FILE", default_value = DEFAULT_STATE_FILE)]
    pub state_file: PathBuf,
    /// RabbitMQ lock queue (for tests and for separate beat groups on one vhost)
    #[arg(long, hide = true, default_value = DEFAULT_LOCK_QUEUE)]
    pub lock_queue: String,
}

/// Runs beat with the schedule in `args` until `shutdown` is cancelled.
pub async fn run_beat(
    args: &BeatArgs,
    conn: &ConnectionArgs,
    shutdown: CancellationToken,
) -> Result<(), BeatError> {
    let path = args
        .schedule
        .as_deref()
        .ok_or_else(|| BeatError::Schedule("give --schedule FILE".into()))?;
    let lease = Duration::try_from_secs_f64(args.lease)
        .ok()
        .filter(|d| *d >= Duration::from_millis(300))
        .ok_or_else(|| {
            BeatError::Schedule(format!("--lease must be ≥ 0.3 seconds, got {}", args.lease))
        })?;
    let entries = schedule::load(path)?;
    let places = AmqpPlaces {
        state_file: args.state_file.clone(),
        lock_queue: args.lock_queue.clone(),
    };
    let store = Store::connect_with(&conn.broker, &places).await?;
    let client = Client::new(connect_broker(&conn.broker).await?, None);
    tracing::info!(
        entries = entries.iter().filter(|e| e.enabled).count(),
        schedule = %path.display(),
        "beat: starting"
    );
    // The watcher stops with beat, whether beat was shut down or failed.
    let watching = shutdown.child_token();
    let entries = reload::watch(path.to_path_buf(), entries, watching.clone());
    let ticker = Ticker::new(entries, client.clone(), store, lease);
    let out = ticker.run(shutdown).await;
    watching.cancel();
    let _ = client.close().await;
    out
}

/// Checks a schedule file; the text lists each entry with its next five fire times.
pub fn check(path: &Path) -> Result<String, BeatError> {
    Ok(describe(&schedule::load(path)?, Utc::now()))
}

/// Each entry and its next five fire times after `now` (in the entry's timezone).
pub fn describe(entries: &[Entry], now: DateTime<Utc>) -> String {
    let mut out = String::new();
    for e in entries {
        let when = match &e.when {
            When::Cron(s) => format!("cron \"{}\"", s.source()),
            When::Every(d) => format!("every {}s", d.as_secs()),
        };
        let off = if e.enabled { "" } else { " (disabled)" };
        let _ = writeln!(out, "{}: {} — {when}, {}{off}", e.name, e.task, e.timezone);
        let times = e.upcoming(now, 5);
        if times.is_empty() {
            let _ = writeln!(out, "  never fires again");
        }
        for t in times {
            let local = t.with_timezone(&e.timezone);
            let _ = writeln!(
                out,
                "  {}",
                local.to_rfc3339_opts(SecondsFormat::Secs, true)
            );
        }
    }
    if entries.is_empty() {
        out.push_str("no entries\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            beat: BeatArgs,
        }
        let c = Cli::try_parse_from(["x", "--schedule", "s.toml", "--lease", "5"]).unwrap();
        assert_eq!(c.beat.schedule, Some(PathBuf::from("s.toml")));
        assert_eq!(c.beat.lease, 5.0);
        let c = Cli::try_parse_from(["x", "--check", "c.toml"]).unwrap();
        assert_eq!(c.beat.check, Some(PathBuf::from("c.toml")));
        assert_eq!(c.beat.lease, 30.0);
    }

    #[test]
    fn describe_lists_five_local_times() {
        let e = schedule::parse(
            "[[entry]]\nname = \"n\"\ntask = \"t.x\"\ncron = \"0 9 * * *\"\ntimezone = \"Europe/Berlin\"\n",
        )
        .unwrap();
        let now = DateTime::parse_from_rfc3339("2024-01-01T12:00:00Z")
            .unwrap()
            .to_utc();
        let text = describe(&e, now);
        assert!(
            text.starts_with("n: t.x — cron \"0 0 9 * * *\", Europe/Berlin\n"),
            "{text}"
        );
        assert!(text.contains("  2024-01-02T09:00:00+01:00\n"), "{text}");
        assert!(text.contains("  2024-01-06T09:00:00+01:00\n"), "{text}");
        assert_eq!(text.lines().count(), 6);
    }
}
