//! One worker process: consumes from its queues and runs jobs, until told to stop.
//!
//! The fetch loop pulls deliveries under a prefetch window equal to the concurrency (so prefetch
//! follows free slots: a long job never holds short ones that other slots could run) and hands each
//! to the executor in its own tracked task. Stopping is in two phases, driven by the caller's tokens:
//! **warm** (stop fetching, let running jobs finish within the grace period) and **cold** (cancel
//! what still runs and give it back to the broker). Unacked deliveries go back when the consumer
//! closes.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use celerity_broker::{Broker, ResultBackend};

use celerity_broker::protocol::clock::LamportClock;

use crate::control::{ControlState, Remote};
use crate::error::{Result, WorkerError};
use crate::events::EventsConfig;
use crate::executor::{Counters, Executor, Reporter};
use crate::limits::{RateLimit, RateLimits};
use crate::pool::Pool;
use crate::registry::Registry;

/// Settings of one worker process.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Queues to consume from.
    pub queues: Vec<String>,
    /// Jobs run at once.
    pub concurrency: usize,
    /// Node name, e.g. `celerity@host`.
    pub hostname: String,
    /// How long a warm shutdown waits for running jobs.
    pub grace: Duration,
    /// Stop (warm) after taking this many jobs, so the supervisor starts a fresh process.
    pub max_tasks: Option<u64>,
    /// Stop (warm) once the resident memory of this process is above this many KiB.
    pub max_memory_kib: Option<u64>,
    /// In a supervised child: where jobs with a hard time limit are reported.
    pub reporter: Option<Reporter>,
    /// Rate limits set at start (`--rate-limit TASK=RATE`), over those the tasks declare.
    pub rate_limits: Vec<(String, RateLimit)>,
    /// Share every rate limit across the fleet through this Redis instead of per process.
    pub global_rate_limits: Option<celerity_broker::redis::RedisRateLimiter>,
    /// A job whose ETA is further away than this is parked on the broker (Redis) rather than held
    /// unacked in this process; nearer ones are held, their lease renewed.
    pub park_after: Duration,
    /// Celery events: task events from the start (`-E`), worker heartbeats.
    pub events: EventsConfig,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            queues: vec![celerity_client::DEFAULT_QUEUE.to_owned()],
            concurrency: 16,
            hostname: format!("celerity@{}", celerity_broker::protocol::node::hostname()),
            grace: Duration::from_secs(30),
            max_tasks: None,
            max_memory_kib: None,
            reporter: None,
            park_after: Duration::from_secs(10),
            rate_limits: Vec::new(),
            global_rate_limits: None,
            events: EventsConfig {
                task_events: false,
                heartbeat: true,
            },
        }
    }
}

/// The two stop signals of a worker.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    /// Stop fetching; finish running jobs.
    pub warm: CancellationToken,
    /// Stop running jobs now and give them back.
    pub cold: CancellationToken,
}

/// What a worker did, returned when it stops.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    pub succeeded: u64,
    pub failed: u64,
    pub retried: u64,
    pub revoked: u64,
    pub rejected: u64,
}

/// Runs a worker until `shutdown` says stop. Returns what it did.
pub async fn run(
    registry: Registry,
    broker: Arc<dyn Broker>,
    backend: Option<Arc<dyn ResultBackend>>,
    config: WorkerConfig,
    shutdown: Shutdown,
) -> Result<Summary> {
    if config.concurrency == 0 {
        return Err(WorkerError::Config("concurrency must be at least 1".into()));
    }
    if config.queues.is_empty() {
        return Err(WorkerError::Config("no queues to consume from".into()));
    }
    let mut limits: HashMap<String, RateLimit> = registry
        .names()
        .into_iter()
        .filter_map(|n| {
            registry
                .get(n)
                .and_then(|r| r.options.rate_limit)
                .map(|l| (n.to_owned(), l))
        })
        .collect();
    limits.extend(config.rate_limits.iter().cloned());
    let buckets = Arc::new(RateLimits::new(limits, config.global_rate_limits.clone()));
    let (window_tx, mut window_rx) = mpsc::unbounded_channel::<isize>();
    let pool = Arc::new(Pool::new(config.concurrency, window_tx.clone()));
    let counters = Arc::new(Counters::default());
    let control = Arc::new(ControlState::default());
    let registry = Arc::new(registry);
    let clock = Arc::new(LamportClock::new());
    // Events (heartbeats; task events with -E) are published by their own task, off the job path.
    let (events, events_task) = crate::events::start(
        broker.clone(),
        config.hostname.clone(),
        clock.clone(),
        config.events,
        crate::events::Gauges {
            control: control.clone(),
            counters: counters.clone(),
        },
    );
    // Remote control (inspect, revoke, rate limits, pool size, shutdown) runs beside the fetch
    // loop and stops with it.
    let control_stop = CancellationToken::new();
    let remote = Arc::new(Remote {
        hostname: config.hostname.clone(),
        broker: broker.clone(),
        state: control.clone(),
        clock,
        registry: registry.clone(),
        limits: buckets.clone(),
        counters: counters.clone(),
        pool: pool.clone(),
        events: events.clone(),
        queues: config.queues.clone(),
        started: std::time::Instant::now(),
        shutdown: shutdown.warm.clone(),
    });
    let control_task = tokio::spawn(crate::control::listen(remote, control_stop.clone()));
    let executor = Arc::new(Executor {
        registry,
        broker: broker.clone(),
        backend,
        hostname: config.hostname.clone(),
        slots: pool.slots().clone(),
        buckets,
        events,
        window: window_tx,
        abort: shutdown.cold.clone(),
        counters: counters.clone(),
        reporter: config.reporter,
        park_after: config.park_after,
        control: control.clone(),
    });

    let mut consumer = broker.consume(&config.queues, config.concurrency).await?;
    tracing::info!(hostname = config.hostname, queues = ?config.queues, concurrency = config.concurrency, transport = broker.transport(), "worker ready");
    let tracker = TaskTracker::new();
    let mut window = config.concurrency as isize;
    let mut failures = 0u32;
    let mut taken = 0u64;
    let mut memory_check = tokio::time::interval(Duration::from_secs(1));
    memory_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if config.max_tasks.is_some_and(|max| taken >= max) {
            tracing::info!(taken, "max tasks per process reached; recycling");
            break;
        }
        tokio::select! {
            biased;
            _ = shutdown.warm.cancelled() => break,
            _ = memory_check.tick(), if config.max_memory_kib.is_some() => {
                let (Some(max), Some(rss)) = (config.max_memory_kib, resident_kib()) else { continue };
                if rss > max {
                    tracing::warn!(rss_kib = rss, max_kib = max, "memory above the limit per process; recycling");
                    break;
                }
            }
            Some(delta) = window_rx.recv() => {
                window = (window + delta).max(pool.size() as isize);
                if let Err(e) = consumer.set_prefetch(window as usize).await {
                    tracing::warn!(error = %e, "could not change the prefetch window");
                }
            }
            next = consumer.next() => match next {
                Ok(Some(delivery)) => {
                    failures = 0;
                    taken += 1;
                    let ex = executor.clone();
                    tracker.spawn(async move { ex.handle(delivery).await });
                }
                Ok(None) => break,
                Err(e) => {
                    failures += 1;
                    let pause = Duration::from_millis(100u64 << failures.min(6));
                    tracing::warn!(error = %e, retry_in_ms = pause.as_millis() as u64, "fetching failed");
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = shutdown.warm.cancelled() => break,
                    }
                }
            }
        }
    }
    tracker.close();
    control_stop.cancel();
    tracing::info!(
        running = tracker.len(),
        "stopping: no longer fetching; waiting for running jobs"
    );
    tokio::select! {
        _ = tracker.wait() => {}
        _ = tokio::time::sleep(config.grace) => {
            tracing::warn!(left = tracker.len(), "grace period over; giving back unfinished jobs");
            shutdown.cold.cancel();
        }
        _ = shutdown.cold.cancelled() => {}
    }
    if shutdown.cold.is_cancelled() {
        // Jobs see the cancellation and requeue themselves; wait briefly for that.
        let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
    }
    let _ = control_task.await;
    // worker-offline goes out on warm and cold stops alike, after the last task events.
    events_task.stop().await;
    if let Err(e) = consumer.close().await {
        tracing::warn!(error = %e, "closing the consumer failed; the broker will redeliver what was unacked");
    }
    let c = &counters;
    Ok(Summary {
        succeeded: c.succeeded.load(Ordering::Relaxed),
        failed: c.failed.load(Ordering::Relaxed),
        retried: c.retried.load(Ordering::Relaxed),
        revoked: c.revoked.load(Ordering::Relaxed),
        rejected: c.rejected.load(Ordering::Relaxed),
    })
}

/// Resident memory of this process in KiB (Linux `/proc/self/statm`), if it can be read.
pub fn resident_kib() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4)
}
