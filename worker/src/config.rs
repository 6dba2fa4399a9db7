//! The settings of one worker process ([`WorkerConfig`]), as an application or the CLI gives them.

use std::time::Duration;

use crate::events::EventsConfig;
use crate::limits::RateLimit;
use crate::report::Reporter;

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
    /// Where undecodable and oversized messages are copied before they are acked
    /// ([`crate::DEAD_LETTER_QUEUE`] unless set; `--dead-letter-queue`).
    pub dead_letter_queue: String,
    /// Count into these metrics (`--metrics-addr`); none: nothing is counted or probed.
    pub metrics: Option<std::sync::Arc<crate::metrics::WorkerMetrics>>,
    /// How often the janitor deletes expired results from a backend that does not expire them by
    /// itself (PostgreSQL; an hour by default); `None`: never.
    pub cleanup_every: Option<Duration>,
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
            dead_letter_queue: crate::DEAD_LETTER_QUEUE.to_owned(),
            metrics: None,
            cleanup_every: Some(Duration::from_secs(3600)),
        }
    }
}
