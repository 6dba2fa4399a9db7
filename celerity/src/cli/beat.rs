//! `celerity beat`: the flags ([`BeatArgs`]), the verb ([`run_beat_command`]: `--check`, or beat
//! until SIGINT/SIGTERM) and the entry point ([`run_beat`]), also used by the beat a worker embeds
//! (`celerity worker -B`). The beat itself is `celerity_beat`'s; this module turns the flags into a
//! [`BeatConfig`] and forwards SIGHUP to it as a schedule reload.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use tokio_util::sync::CancellationToken;

use celerity_beat::state::{AmqpPlaces, DEFAULT_LOCK_QUEUE, DEFAULT_STATE_FILE};
use celerity_beat::{BeatConfig, BeatError, DEFAULT_LEASE};

use super::beat_metrics::BeatMetrics;
use super::connection::ConnectionArgs;
use crate::signals;

/// `celerity beat`.
#[derive(Debug, Clone, Args)]
pub struct BeatArgs {
    /// Schedule file (TOML) to run
    #[arg(short = 's', long, env = "CELERITY_BEAT_SCHEDULE")]
    pub schedule: Option<PathBuf>,
    /// Check a schedule file and print each entry's next five fire times, then exit
    #[arg(long, value_name = "FILE")]
    pub check: Option<PathBuf>,
    /// Leader lock lease in seconds: a standby takes over at most this long after the leader dies
    #[arg(long, default_value_t = DEFAULT_LEASE.as_secs_f64())]
    pub lease: f64,
    /// Last-run state file, used where the broker is amqp:// (Redis keeps it in a hash)
    #[arg(long = "state", value_name = "FILE", default_value = DEFAULT_STATE_FILE)]
    pub state_file: PathBuf,
    /// RabbitMQ lock queue (for tests and for separate beat groups on one vhost)
    #[arg(long, hide = true, default_value = DEFAULT_LOCK_QUEUE)]
    pub lock_queue: String,
    /// Serve Prometheus metrics at /metrics, and /healthz and /readyz (ready: leading, or a
    /// standby that reaches the lock), on HOST:PORT (port 0: any free port, logged)
    #[arg(long, value_name = "HOST:PORT", env = "CELERITY_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
}

impl BeatArgs {
    /// The beat settings these flags describe.
    pub fn config(&self) -> Result<BeatConfig, BeatError> {
        let schedule = self.schedule.clone().ok_or_else(|| {
            BeatError::Schedule(
                "give --schedule FILE (or CELERITY_BEAT_SCHEDULE, or `schedule` under [beat] \
                     in the --config file)"
                    .into(),
            )
        })?;
        let lease = Duration::try_from_secs_f64(self.lease)
            .ok()
            .filter(|d| *d >= Duration::from_millis(300))
            .ok_or_else(|| {
                BeatError::Schedule(format!("--lease must be ≥ 0.3 seconds, got {}", self.lease))
            })?;
        Ok(BeatConfig {
            schedule,
            lease,
            amqp: AmqpPlaces {
                state_file: self.state_file.clone(),
                lock_queue: self.lock_queue.clone(),
            },
            observer: None,
        })
    }
}

/// Runs `celerity beat`: with `--check`, prints the schedule's next fire times; else runs beat until
/// the first SIGINT or SIGTERM.
pub async fn run_beat_command(
    args: &BeatArgs,
    conn: &ConnectionArgs,
) -> Result<ExitCode, BeatError> {
    if let Some(path) = &args.check {
        print!("{}", celerity_beat::check(path)?);
        return Ok(ExitCode::SUCCESS);
    }
    let stop = CancellationToken::new();
    tokio::spawn(signals::cancel_on_stop(stop.clone()));
    let mut config = args.config()?;
    if let Some(addr) = &args.metrics_addr {
        let metrics = Arc::new(BeatMetrics::default());
        super::worker::start_metrics(addr, metrics.clone(), stop.clone())
            .await
            .map_err(|e| BeatError::Unsupported(e.to_string()))?;
        config.observer = Some(metrics);
    }
    run_beat_config(&config, conn, stop).await?;
    Ok(ExitCode::SUCCESS)
}

/// Runs beat with the schedule in `args` until `shutdown` is cancelled; each SIGHUP re-reads the
/// schedule.
pub async fn run_beat(
    args: &BeatArgs,
    conn: &ConnectionArgs,
    shutdown: CancellationToken,
) -> Result<(), BeatError> {
    run_beat_config(&args.config()?, conn, shutdown).await
}

/// Runs beat with `config` until `shutdown` is cancelled; each SIGHUP re-reads the schedule.
pub(crate) async fn run_beat_config(
    config: &BeatConfig,
    conn: &ConnectionArgs,
    shutdown: CancellationToken,
) -> Result<(), BeatError> {
    // The forwarder stops with beat, whether beat was shut down or failed.
    let listening = shutdown.child_token();
    let reloads = signals::reload_on_hangup(listening.clone());
    let out = celerity_beat::run(config, &conn.broker, reloads, shutdown).await;
    listening.cancel();
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
}
