//! One worker process: wires the components together, runs until told to stop, and stops them in
//! order. The components, each in its own file with one start and one stop:
//!
//! - the fetcher (`fetcher.rs`) takes deliveries and spawns the processor (`processor/`) on each;
//! - the heartbeater (`heartbeat.rs`) publishes worker and task events;
//! - the control listener (`control.rs`) answers remote control;
//! - [`Jobs`] (`jobs.rs`) owns the in-flight state all of them read;
//! - the janitor (`janitor.rs`) deletes expired results from a backend that keeps them (PostgreSQL);
//! - with metrics on, the probe (`metrics/probe.rs`) measures queues and readiness every second.
//!   It stops last, so a pool child's final report holds every job it finished.
//!
//! Stop order (senders before receivers): on **warm** the fetcher stops taking work and the control
//! listener stops; running jobs get the grace period; past it (or on **cold**) they are cancelled
//! and give their deliveries back; then the heartbeater flushes its events and says
//! `worker-offline`; last the consumer closes, and the broker takes back whatever is still unacked.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

use celerity_broker::protocol::clock::LamportClock;
use celerity_broker::{Broker, Consumer, ResultBackend};

use crate::commands::Remote;
use crate::config::WorkerConfig;
use crate::control::ControlListener;
use crate::error::{Result, WorkerError};
use crate::events::EventSender;
use crate::fetcher::Fetcher;
use crate::heartbeat::Heartbeater;
use crate::janitor::Janitor;
use crate::jobs::{Jobs, Summary};
use crate::limits::{RateLimit, RateLimits};
use crate::metrics::Probe;
use crate::pool::Pool;
use crate::processor::Processor;
use crate::registry::Registry;
use crate::results::ResultStore;
use crate::shutdown::Shutdown;

/// How long a cold stop waits for cancelled jobs to give their deliveries back.
const COLD_WAIT: Duration = Duration::from_secs(5);

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
    let registry = Arc::new(registry);
    let jobs = Arc::new(Jobs::default());
    let buckets = Arc::new(rate_limits(&registry, &config));
    let (window_tx, window_rx) = mpsc::unbounded_channel::<isize>();
    let pool = Arc::new(Pool::new(config.concurrency, window_tx.clone()));
    let clock = Arc::new(LamportClock::new());
    let (events, events_rx) = EventSender::new(
        config.hostname.clone(),
        clock.clone(),
        config.events.task_events,
    );
    let heartbeater = Heartbeater::start(
        broker.clone(),
        events.clone(),
        events_rx,
        jobs.clone(),
        config.events.heartbeat,
    );
    let shutdown_requested = Arc::new(AtomicBool::new(false));
    let remote = Remote {
        hostname: config.hostname.clone(),
        transport: broker.transport(),
        queues: config.queues.clone(),
        started: std::time::Instant::now(),
        clock,
        jobs: jobs.clone(),
        registry: registry.clone(),
        limits: buckets.clone(),
        pool: pool.clone(),
        events: events.clone(),
        shutdown: shutdown.warm.clone(),
        shutdown_requested: shutdown_requested.clone(),
    };
    let control = ControlListener::start(broker.clone(), remote);
    let processor = Arc::new(Processor {
        registry,
        broker: broker.clone(),
        results: ResultStore::new(
            backend.clone(),
            config.hostname.clone(),
            shutdown.cold.clone(),
            config.metrics.clone(),
        ),
        slots: pool.slots().clone(),
        buckets,
        events,
        window: window_tx,
        abort: shutdown.cold.clone(),
        jobs: jobs.clone(),
        reporter: config.reporter,
        park_after: config.park_after,
        dead_letter_queue: config.dead_letter_queue.clone(),
        metrics: config.metrics.clone(),
    });

    let consumer = broker.consume(&config.queues, config.concurrency).await?;
    let janitor = match (&backend, config.cleanup_every) {
        (Some(backend), Some(every)) => Some(Janitor::start(backend.clone(), every)),
        _ => None,
    };
    tracing::info!(hostname = config.hostname, queues = ?config.queues, concurrency = config.concurrency, transport = broker.transport(), "worker ready");
    let consuming = Arc::new(AtomicBool::new(true));
    let probe_stop = tokio_util::sync::CancellationToken::new();
    let probe = config.metrics.clone().map(|metrics| {
        let probe = Probe {
            metrics,
            broker: broker.clone(),
            backend,
            queues: config.queues.clone(),
            jobs: jobs.clone(),
            events: processor.events.clone(),
            reporter: config.reporter,
            consuming: consuming.clone(),
        };
        tokio::spawn(probe.run(probe_stop.clone()))
    });
    let tracker = TaskTracker::new();
    let fetcher = Fetcher {
        consumer,
        processor,
        tracker: tracker.clone(),
        window_rx,
        pool,
        window: config.concurrency,
        max_tasks: config.max_tasks,
        max_memory_kib: config.max_memory_kib,
    };
    let consumer = fetcher.run(shutdown.warm.clone()).await;
    consuming.store(false, Ordering::Relaxed);
    stop(consumer, tracker, control, heartbeater, &config, &shutdown).await;
    if let Some(janitor) = janitor {
        janitor.shutdown().await;
    }
    probe_stop.cancel();
    if let Some(p) = probe {
        let _ = p.await;
    }
    Ok(Summary {
        shutdown_requested: shutdown_requested.load(Ordering::SeqCst),
        ..jobs.summary()
    })
}

/// The limits the tasks declare, overridden by the configured ones.
fn rate_limits(registry: &Registry, config: &WorkerConfig) -> RateLimits {
    let mut limits: HashMap<String, RateLimit> = registry
        .names()
        .into_iter()
        .filter_map(|n| {
            let limit = registry.get(n)?.options.rate_limit?;
            Some((n.to_owned(), limit))
        })
        .collect();
    limits.extend(config.rate_limits.iter().cloned());
    RateLimits::new(limits, config.global_rate_limits.clone())
}

/// The stop order, once the fetcher has stopped (see the module doc).
async fn stop(
    mut consumer: Box<dyn Consumer>,
    tracker: TaskTracker,
    control: ControlListener,
    heartbeater: Heartbeater,
    config: &WorkerConfig,
    shutdown: &Shutdown,
) {
    tracker.close();
    let control_stopped = control.stop();
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
        let _ = tokio::time::timeout(COLD_WAIT, tracker.wait()).await;
    }
    control_stopped.await;
    // worker-offline goes out on warm and cold stops alike, after the last task events.
    heartbeater.stop().await;
    if let Err(e) = consumer.close().await {
        tracing::warn!(error = %e, "closing the consumer failed; the broker will redeliver what was unacked");
    }
}
