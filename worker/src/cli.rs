//! The worker-side verbs of the `celerity` command: `worker` (run a worker on a registry) and `demo`
//! (producer + worker + result lookups in one process, with a summary).
//!
//! An application's own worker binary is a few lines: build a [`Registry`], then call
//! [`run_worker`] with parsed [`WorkerArgs`] (see `examples/` in the repository).

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Map};

use celerity_broker::protocol::TaskMessage;
use celerity_broker::{connect_backend, connect_broker, ResultBackend, State};
use celerity_client::cli::ConnectionArgs;
use celerity_client::{default_backend_url, Client, SendOptions};

use crate::error::{Result, WorkerError};
use crate::registry::Registry;
use crate::report::Reporter;
use crate::supervisor;
use crate::{run, Shutdown, Summary, WorkerConfig};

/// `celerity worker`.
#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    /// Queues to consume from, comma-separated
    #[arg(short = 'Q', long, default_value = celerity_client::DEFAULT_QUEUE, value_delimiter = ',')]
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
    /// Worker processes under a supervisor (0: run in this process, unsupervised)
    #[arg(short = 'P', long, default_value_t = 1)]
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
                let (task, rate) = spec.split_once('=').ok_or_else(|| {
                    WorkerError::Config(format!(
                        "--rate-limit {spec}: expected TASK=RATE, e.g. demo.add=100/s"
                    ))
                })?;
                let limit = rate
                    .parse()
                    .map_err(|e| WorkerError::Config(format!("--rate-limit {spec}: {e}")))?;
                Ok((task.trim().to_owned(), limit))
            })
            .collect::<Result<Vec<_>>>()?;
        let queues: Vec<String> = self
            .queues
            .iter()
            .map(|q| q.trim().to_owned())
            .filter(|q| !q.is_empty())
            .collect();
        Ok(WorkerConfig {
            queues,
            concurrency: self.concurrency,
            hostname: crate::node::nodename(
                &self.hostname,
                std::env::var(supervisor::CHILD_ENV)
                    .ok()
                    .and_then(|s| s.parse().ok()),
                self.processes,
                celerity_broker::protocol::node::hostname(),
            ),
            events: crate::events::EventsConfig {
                task_events: self.events,
                heartbeat: !self.without_heartbeat,
            },
            grace,
            max_tasks: self.max_tasks_per_child,
            max_memory_kib: self.max_memory_per_child.map(|mb| mb.saturating_mul(1024)),
            rate_limits,
            ..WorkerConfig::default()
        })
    }
}

/// Runs a worker until SIGINT/SIGTERM (first: warm shutdown; second: cold): a supervisor with
/// `--processes` children, or (with `--processes 0`, and inside each child) the worker itself.
/// Returns what the worker did, or `None` for a supervisor (its children report for themselves).
pub async fn run_worker(
    registry: Registry,
    args: &WorkerArgs,
    conn: &ConnectionArgs,
) -> Result<Option<Summary>> {
    let mut config = args.config()?;
    let shutdown = Shutdown::default();
    let signals = tokio::spawn(forward_signals(shutdown.clone()));
    let is_child = std::env::var_os(supervisor::CHILD_ENV).is_some();
    let outcome = if args.processes > 0 && !is_child {
        let backend = backend_for(conn).await?;
        supervisor::supervise(args.processes, backend, shutdown)
            .await
            .map(|()| None)
    } else {
        config.reporter = is_child.then_some(Reporter);
        if args.global_rate_limits {
            config.global_rate_limits = Some(global_limiter(conn).await?);
        }
        let broker = connect_broker(&conn.broker).await?;
        if is_child {
            if let Some(lock) = supervisor::inherited_wait_lock() {
                broker.share_wait_lock(lock);
            }
        }
        let backend = backend_for(conn).await?;
        let summary = run(registry, broker.clone(), backend, config, shutdown).await;
        let _ = broker.close().await;
        summary.map(Some)
    };
    signals.abort();
    outcome
}

/// The Redis that holds cluster-wide rate limits: the broker if it is Redis, else the backend.
async fn global_limiter(conn: &ConnectionArgs) -> Result<celerity_broker::redis::RedisRateLimiter> {
    let is_redis = |u: &str| {
        celerity_broker::BrokerUrl::parse(u)
            .is_ok_and(|u| u.scheme == celerity_broker::url::Scheme::Redis)
    };
    let url = [Some(conn.broker.as_str()), conn.backend.as_deref()]
        .into_iter()
        .flatten()
        .find(|u| is_redis(u))
        .ok_or_else(|| {
            WorkerError::Config(
                "--global-rate-limits needs a redis:// broker or result backend".into(),
            )
        })?;
    Ok(celerity_broker::redis::RedisRateLimiter::connect(url).await?)
}

/// The result backend: `--backend`, else what the broker implies (the client's rule);
/// `--backend none` stores no results.
async fn backend_for(conn: &ConnectionArgs) -> Result<Option<Arc<dyn ResultBackend>>> {
    match conn
        .backend
        .clone()
        .or_else(|| default_backend_url(&conn.broker))
    {
        Some(url) if url == "none" => Ok(None),
        Some(url) => Ok(Some(connect_backend(&url).await?)),
        None => Ok(None),
    }
}

/// First SIGINT/SIGTERM: warm shutdown. Second: cold.
async fn forward_signals(shutdown: Shutdown) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot listen for signals; stop the worker with SIGKILL");
        return;
    };
    for phase in 0..2 {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        if phase == 0 {
            tracing::warn!("warm shutdown: finishing running jobs (signal again to stop at once)");
            shutdown.warm.cancel();
        } else {
            tracing::warn!("cold shutdown: giving running jobs back");
            shutdown.cold.cancel();
        }
    }
}

/// The queue `celerity demo` uses.
pub const DEMO_QUEUE: &str = "celerity.demo";

/// `celerity demo`.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// How many `demo.add` jobs to run
    #[arg(long, default_value_t = 10_000)]
    pub jobs: u64,
    /// Jobs run at once by the in-process worker
    #[arg(short = 'c', long, default_value_t = 64)]
    pub concurrency: usize,
}

/// What `celerity demo` measured.
#[derive(Debug, Clone)]
pub struct DemoReport {
    pub jobs: u64,
    pub failures: u64,
    pub seconds: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// Producer + worker + result lookups in one process: sends `jobs` × `demo.add(i, i)`, waits for
/// every result, checks each value, and reports the rate and latency percentiles.
pub async fn run_demo(args: &DemoArgs, conn: &ConnectionArgs) -> Result<DemoReport> {
    // One fixed queue, emptied before and after, so repeated demos leave nothing behind.
    let queue = DEMO_QUEUE.to_owned();
    let broker = connect_broker(&conn.broker).await?;
    // Declared first: purging a queue RabbitMQ does not have yet closes the channel.
    broker.declare_queue(&queue).await?;
    broker.purge(&queue).await?;
    let Some(backend) = backend_for(conn).await? else {
        return Err(WorkerError::Config(
            "the demo reads results: give --backend redis://… with an AMQP broker".into(),
        ));
    };
    let client = Client::new(broker.clone(), Some(backend.clone()));
    let mut registry = Registry::new();
    crate::demo::register(&mut registry);
    let shutdown = Shutdown::default();
    let config = WorkerConfig {
        queues: vec![queue.clone()],
        concurrency: args.concurrency.max(1),
        ..WorkerConfig::default()
    };
    let worker = tokio::spawn(run(
        registry,
        broker.clone(),
        Some(backend.clone()),
        config,
        shutdown.clone(),
    ));

    let bar = ProgressBar::new(args.jobs);
    if let Ok(style) = ProgressStyle::with_template("{msg:8} {bar:40} {pos}/{len} {per_sec}") {
        bar.set_style(style);
    }
    bar.set_message("sending");
    let started = Instant::now();
    let options = SendOptions::new().queue(queue.clone());
    let mut sent: Vec<(String, i64, chrono::DateTime<chrono::Utc>)> =
        Vec::with_capacity(args.jobs as usize);
    let mut i = 0i64;
    while (sent.len() as u64) < args.jobs {
        let n = (args.jobs - sent.len() as u64).min(1000);
        let now = chrono::Utc::now();
        let batch: Vec<TaskMessage> = (0..n)
            .map(|_| {
                i += 1;
                options.build("demo.add", vec![json!(i), json!(i)], Map::new(), now)
            })
            .collect::<std::result::Result<_, _>>()?;
        let t = chrono::Utc::now();
        client.send_batch(&batch, &queue).await?;
        sent.extend(
            batch
                .iter()
                .zip((i - n as i64 + 1)..)
                .map(|(m, k)| (m.id().to_owned(), k, t)),
        );
        bar.set_position(sent.len() as u64);
    }
    bar.set_message("results");
    bar.set_position(0);
    let mut latencies = Vec::with_capacity(sent.len());
    let mut failures = 0;
    let mut checked = 0u64;
    for chunk in sent.chunks(1000) {
        let ids: Vec<String> = chunk.iter().map(|(id, _, _)| id.clone()).collect();
        let metas = backend.get_many(&ids).await?;
        for ((id, k, sent_at), meta) in chunk.iter().zip(metas) {
            let meta = if meta.status.is_ready() {
                meta
            } else {
                backend.wait(id, Some(Duration::from_secs(60))).await?
            };
            // Send → result stored, on the same clock.
            let done = meta.date_done.unwrap_or_else(chrono::Utc::now);
            latencies.push((done - *sent_at).to_std().unwrap_or_default());
            if meta.status != State::Success || meta.result != json!(2 * k) {
                failures += 1;
            }
        }
        checked += chunk.len() as u64;
        bar.set_position(checked);
    }
    let seconds = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    shutdown.warm.cancel();
    if let Ok(Err(e)) = worker.await {
        tracing::warn!(error = %e, "demo worker stopped with an error");
    }
    let _ = broker.purge(&queue).await;
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * p).round() as usize)
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    Ok(DemoReport {
        jobs: args.jobs,
        failures,
        seconds,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
    })
}
