//! `celerity worker`: the flags ([`WorkerArgs`]; [`WorkerCommand`] adds `-B`, an embedded beat) and
//! the entry point ([`run_worker`]) shared with an application's own worker
//! ([`crate::worker_main`]): a supervisor with `--processes` children, or the worker itself.
//!
//! The flags become a [`WorkerConfig`]; the worker, the supervisor and the pool children are
//! `celerity_worker`'s. Signals are forwarded by `crate::signals`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use celerity_beat::BeatConfig;
use celerity_broker::connect_broker;
use celerity_broker::redis::RedisRateLimiter;
use celerity_broker::url::{BrokerUrl, Scheme};
use celerity_client::DEFAULT_QUEUE;
use celerity_worker::events::EventsConfig;
use celerity_worker::metrics::{self, Joined, MetricsSource, PoolMetrics, WorkerMetrics};
use celerity_worker::{
    node, run, supervisor, RateLimit, Registry, Reporter, Shutdown, Summary, WorkerConfig,
    WorkerError,
};

use super::beat::run_beat_config;
use super::beat_metrics::BeatMetrics;
use super::connection::{ConnectionArgs, BACKEND_ENV, BROKER_ENV};
use crate::logging::LogFormat;
use crate::signals;

type Result<T, E = WorkerError> = std::result::Result<T, E>;

/// `celerity worker`.
#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    /// Queues to consume from, comma-separated
    #[arg(short = 'Q', long, default_value = DEFAULT_QUEUE, value_delimiter = ',')]
    pub queues: Vec<String>,
    /// Jobs run at once
    #[arg(short = 'c', long, default_value_t = 16)]
    pub concurrency: usize,
    /// Node name, as in Celery: `%h` host name, `%n` its first label, `%d` the domain, `%i` the pool
    /// process index. With --processes N > 1 every child process is its own node; unless the name
    /// has `%i`, the index is appended to the name part (`celerity-0@host`, `celerity-1@host`, …)
    #[arg(short = 'n', long, default_value = "celerity@%h")]
    pub hostname: String,
    /// Send task events (task-received/started/succeeded/failed/retried/revoked) for Flower and
    /// `celery events`, as Celery's `-E`
    #[arg(short = 'E', long = "events")]
    pub events: bool,
    /// Send no worker-online/heartbeat/offline events (Celery's --without-heartbeat)
    #[arg(long)]
    pub without_heartbeat: bool,
    /// Seconds a warm shutdown waits for running jobs before giving them back
    #[arg(long, default_value_t = 30.0)]
    pub grace: f64,
    /// Threads per worker process that run the jobs' async code. 1 (the default) is a
    /// single-threaded runtime: the least overhead and latency for async jobs, with one process per
    /// core (`-P`). Raise it for jobs that block their thread without `spawn_blocking`
    #[arg(
        long,
        default_value_t = 1,
        env = "CELERITY_WORKER_THREADS",
        value_parser = clap::value_parser!(u16).range(1..)
    )]
    pub threads: u16,
    /// Worker processes under a supervisor (0: run in this process, unsupervised). Default: one per
    /// CPU, as Celery's default concurrency
    #[arg(short = 'P', long, default_value_t = default_processes())]
    pub processes: usize,
    /// Replace a worker process after it took this many jobs
    #[arg(long)]
    pub max_tasks_per_child: Option<u64>,
    /// Replace a worker process once its resident memory is above this many MiB
    #[arg(long)]
    pub max_memory_per_child: Option<u64>,
    /// Limit how often a task starts, e.g. `demo.add=100/s` (repeatable; per process unless
    /// --global-rate-limits)
    #[arg(long, value_name = "TASK=RATE")]
    pub rate_limit: Vec<String>,
    /// Share rate limits across every worker through Redis (the broker, else the result backend)
    #[arg(long)]
    pub global_rate_limits: bool,
    /// Queue that undecodable and oversized messages are copied to (bounded by the broker URL's
    /// max_dead_letters)
    #[arg(long, value_name = "QUEUE", default_value = celerity_worker::DEAD_LETTER_QUEUE)]
    pub dead_letter_queue: String,
    /// Serve Prometheus metrics at /metrics, and /healthz and /readyz, on HOST:PORT (port 0: any
    /// free port, logged). With --processes N the supervisor serves the whole pool
    #[arg(long, value_name = "HOST:PORT", env = "CELERITY_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
}

/// The default `-P`: the CPUs this process may use (`available_parallelism`, which honours
/// affinity masks and cgroup CPU quotas), as Celery's default concurrency is the CPU count; 1 if
/// that cannot be known.
pub fn default_processes() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

impl WorkerArgs {
    /// The worker settings these flags describe.
    pub fn config(&self) -> Result<WorkerConfig> {
        let grace = Duration::try_from_secs_f64(self.grace).map_err(|_| {
            WorkerError::Config(format!("--grace {}: not a number of seconds", self.grace))
        })?;
        let rate_limits = self
            .rate_limit
            .iter()
            .map(|spec| {
                parse_rate_limit(spec)
                    .map_err(|e| WorkerError::Config(format!("--rate-limit {spec}: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let dead_letter_queue = self.dead_letter_queue.trim();
        if dead_letter_queue.is_empty() {
            return Err(WorkerError::Config(
                "--dead-letter-queue: the queue name is empty".into(),
            ));
        }
        let queues: Vec<String> = self
            .queues
            .iter()
            .map(|q| q.trim().to_owned())
            .filter(|q| !q.is_empty())
            .collect();
        Ok(WorkerConfig {
            queues,
            concurrency: self.concurrency,
            hostname: node::nodename(
                &self.hostname,
                std::env::var(supervisor::CHILD_ENV)
                    .ok()
                    .and_then(|s| s.parse().ok()),
                self.processes,
                celerity_broker::protocol::node::hostname(),
            ),
            events: EventsConfig {
                task_events: self.events,
                heartbeat: !self.without_heartbeat,
            },
            grace,
            max_tasks: self.max_tasks_per_child,
            max_memory_kib: self.max_memory_per_child.map(|mb| mb.saturating_mul(1024)),
            rate_limits,
            dead_letter_queue: dead_letter_queue.to_owned(),
            ..WorkerConfig::default()
        })
    }
}

/// Reads a `TASK=RATE` rate limit, e.g. `demo.add=100/s`.
pub fn parse_rate_limit(spec: &str) -> std::result::Result<(String, RateLimit), String> {
    let (task, rate) = spec
        .split_once('=')
        .ok_or_else(|| "expected TASK=RATE, e.g. demo.add=100/s".to_owned())?;
    let limit = rate.parse::<RateLimit>()?;
    Ok((task.trim().to_owned(), limit))
}

/// Runs a worker until SIGINT/SIGTERM (first: warm shutdown; second: cold): a supervisor with
/// `--processes` children, or (with `--processes 0`, and inside each child) the worker itself.
/// Returns what the worker did, or `None` for a supervisor (its children report for themselves).
pub async fn run_worker(
    registry: Registry,
    args: &WorkerArgs,
    conn: &ConnectionArgs,
) -> Result<Option<Summary>> {
    run_worker_with(registry, args, conn, None).await
}

/// [`run_worker`], with `beside` served on the same `--metrics-addr` (the embedded beat's metrics;
/// ignored in a pool child, which serves nothing).
pub async fn run_worker_with(
    registry: Registry,
    args: &WorkerArgs,
    conn: &ConnectionArgs,
    beside: Option<Arc<dyn MetricsSource>>,
) -> Result<Option<Summary>> {
    let mut config = args.config()?;
    let served = |own: Arc<dyn MetricsSource>| -> Arc<dyn MetricsSource> {
        match &beside {
            Some(b) => Arc::new(Joined(vec![own, b.clone()])),
            None => own,
        }
    };
    let shutdown = Shutdown::default();
    let forwarding = tokio::spawn(signals::warm_then_cold(shutdown.clone()));
    let is_child = std::env::var_os(supervisor::CHILD_ENV).is_some();
    let metrics_stop = tokio_util::sync::CancellationToken::new();
    let outcome = if args.processes > 0 && !is_child {
        let pool = match &args.metrics_addr {
            Some(addr) => {
                let pool = Arc::new(PoolMetrics::new(args.processes));
                start_metrics(addr, served(pool.clone()), metrics_stop.clone()).await?;
                Some(pool)
            }
            None => None,
        };
        let backend = conn.worker_backend().await?;
        // The URLs may hold passwords: the worker processes get them in their environment, not
        // on their command lines (which `ps` shows to every user).
        let secrets = supervisor::ChildSecrets::new()
            .flag("--broker", BROKER_ENV, Some(&conn.broker))
            .flag("--backend", BACKEND_ENV, conn.backend.as_deref());
        supervisor::supervise(args.processes, backend, secrets, shutdown, pool)
            .await
            .map(|()| None)
    } else {
        config.reporter = is_child.then_some(Reporter);
        if let Some(addr) = &args.metrics_addr {
            let metrics = Arc::new(WorkerMetrics::new(&config.hostname));
            // A pool child reports to its supervisor, which serves the pool.
            if !is_child {
                start_metrics(addr, served(metrics.clone()), metrics_stop.clone()).await?;
            }
            config.metrics = Some(metrics);
        }
        if args.global_rate_limits {
            config.global_rate_limits = Some(global_limiter(conn).await?);
        }
        let broker = connect_broker(&conn.broker).await?;
        if is_child {
            if let Some(lock) = supervisor::inherited_wait_lock() {
                broker.share_wait_lock(lock);
            }
        }
        let backend = conn.worker_backend().await?;
        let summary = run(registry, broker.clone(), backend, config, shutdown).await;
        let _ = broker.close().await;
        summary.map(Some)
    };
    forwarding.abort();
    metrics_stop.cancel();
    outcome
}

/// Binds `addr` and serves `source` there until `stop`; the address is logged (and printed on
/// stderr) once bound, with the port chosen when `addr` asks for port 0.
pub(crate) async fn start_metrics(
    addr: &str,
    source: Arc<dyn MetricsSource>,
    stop: tokio_util::sync::CancellationToken,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| WorkerError::Config(format!("--metrics-addr {addr}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| WorkerError::Config(format!("--metrics-addr {addr}: {e}")))?;
    tracing::info!(%bound, "serving /metrics, /healthz and /readyz");
    eprintln!("metrics listening on http://{bound}/metrics");
    tokio::spawn(metrics::serve(listener, source, stop));
    Ok(())
}

/// The Redis that holds cluster-wide rate limits: the broker if it is Redis, else the backend.
async fn global_limiter(conn: &ConnectionArgs) -> Result<RedisRateLimiter> {
    let is_redis = |u: &str| BrokerUrl::parse(u).is_ok_and(|u| u.scheme == Scheme::Redis);
    let url = [Some(conn.broker.as_str()), conn.backend.as_deref()]
        .into_iter()
        .flatten()
        .find(|u| is_redis(u))
        .ok_or_else(|| {
            WorkerError::Config(
                "--global-rate-limits needs a redis:// broker or result backend".into(),
            )
        })?;
    Ok(RedisRateLimiter::connect(url).await?)
}

/// `celerity worker`: the worker's flags, plus an embedded beat as Celery's `worker -B` has.
#[derive(Debug, Args)]
pub struct WorkerCommand {
    #[command(flatten)]
    pub worker: WorkerArgs,
    /// Also run beat in this worker (once, in the supervisor; it still takes the leader lock)
    #[arg(short = 'B', long)]
    pub beat: bool,
    /// The schedule file the embedded beat runs
    #[arg(
        long,
        value_name = "FILE",
        requires = "beat",
        env = "CELERITY_BEAT_SCHEDULE"
    )]
    pub beat_schedule: Option<PathBuf>,
}

/// Runs `celerity worker` on the built-in demo tasks, with beat beside it when asked (not in pool
/// children: beat runs once), and prints what the worker did when it stops.
pub async fn run_worker_command(
    cmd: &WorkerCommand,
    conn: &ConnectionArgs,
) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let mut registry = Registry::new();
    celerity_worker::demo::register(&mut registry);
    let is_child = std::env::var_os(supervisor::CHILD_ENV).is_some();
    let mut beat_metrics: Option<Arc<dyn MetricsSource>> = None;
    let beat = if cmd.beat && !is_child {
        let Some(schedule) = &cmd.beat_schedule else {
            return Err("--beat needs --beat-schedule FILE (or CELERITY_BEAT_SCHEDULE)".into());
        };
        let mut config = BeatConfig::new(schedule.clone());
        if cmd.worker.metrics_addr.is_some() {
            let m = Arc::new(BeatMetrics::default());
            config.observer = Some(m.clone());
            beat_metrics = Some(m);
        }
        let stop = tokio_util::sync::CancellationToken::new();
        let conn = conn.clone();
        let task_stop = stop.clone();
        Some((
            stop,
            tokio::spawn(async move { run_beat_config(&config, &conn, task_stop).await }),
        ))
    } else {
        None
    };
    let outcome = run_worker_with(registry, &cmd.worker, conn, beat_metrics).await;
    if let Some((stop, task)) = beat {
        stop.cancel();
        match task.await {
            Ok(Err(e)) => tracing::error!(error = %e, "embedded beat stopped with an error"),
            Err(e) => tracing::error!(error = %e, "embedded beat panicked"),
            Ok(Ok(())) => {}
        }
    }
    let summary = outcome?;
    if let Some(s) = summary
        .as_ref()
        .filter(|_| crate::logging::format() == LogFormat::Json)
    {
        tracing::info!(
            pid = std::process::id(),
            succeeded = s.succeeded,
            failed = s.failed,
            retried = s.retried,
            revoked = s.revoked,
            dead_lettered = s.rejected,
            "worker stopped"
        );
    } else if let Some(s) = &summary {
        eprintln!(
            "worker {} stopped: {} succeeded, {} failed, {} retried, {} revoked, {} dead-lettered",
            std::process::id(),
            s.succeeded,
            s.failed,
            s.retried,
            s.revoked,
            s.rejected
        );
    }
    Ok(exit_code(summary.as_ref()))
}

/// A pool child stopped by a remote `shutdown` says so in its exit status, so the supervisor stops
/// the whole pool (see [`supervisor::EXIT_STOP_POOL`]); any other stop is a success.
pub fn exit_code(summary: Option<&Summary>) -> ExitCode {
    let is_child = std::env::var_os(supervisor::CHILD_ENV).is_some();
    match summary {
        Some(s) if is_child && s.shutdown_requested => ExitCode::from(supervisor::EXIT_STOP_POOL),
        _ => ExitCode::SUCCESS,
    }
}
