//! In a worker process with metrics on: once a second, measures what the job path does not count
//! (queue lengths, running and prefetched jobs, dropped events) and whether the process is ready —
//! the broker answers, the result backend answers, and the fetcher consumes. In a pool child it
//! also sends the whole [`Snapshot`](super::Snapshot) to the supervisor; a child whose runtime is
//! stuck (a job that never yields) stops sending, which is what the supervisor's `/healthz` sees.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use celerity_broker::{Broker, ResultBackend};

use crate::events::EventSender;
use crate::jobs::Jobs;
use crate::report::{JobEvent, Reporter};

use super::{Series, WorkerMetrics};

/// How often the probe measures (and a pool child reports).
pub const EVERY: Duration = Duration::from_secs(1);
/// How long the broker or the backend has to answer a probe.
const ANSWER_WITHIN: Duration = Duration::from_secs(2);
/// The id the backend probe reads (nothing is ever stored under it).
const PROBE_ID: &str = "celerity-readiness-probe";

/// What the probe looks at.
pub(crate) struct Probe {
    pub metrics: Arc<WorkerMetrics>,
    pub broker: Arc<dyn Broker>,
    pub backend: Option<Arc<dyn ResultBackend>>,
    pub queues: Vec<String>,
    pub jobs: Arc<Jobs>,
    pub events: EventSender,
    pub reporter: Option<Reporter>,
    /// True while the fetcher consumes.
    pub consuming: Arc<AtomicBool>,
}

impl Probe {
    /// Runs until `stop`; then, in a pool child, sends a last report.
    pub async fn run(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.once().await,
                _ = stop.cancelled() => break,
            }
        }
        self.metrics.set_ready(Err("stopping".into()));
        self.report();
    }

    async fn once(&self) {
        // Broker and backend are asked at once, so a dead one costs one timeout, not several.
        let (lengths, backend) = tokio::join!(self.queue_lengths(), self.backend_answers());
        let (mut gauges, broker) = lengths;
        let mut problem = broker.err().or(backend.err());
        if !self.consuming.load(Relaxed) {
            problem.get_or_insert("not consuming".into());
        }
        let (active, waiting) = self.jobs.phase_counts();
        let host = self.events.hostname();
        gauges.push(gauge(
            "celery_worker_tasks_active",
            "hostname",
            host,
            active as f64,
        ));
        gauges.push(gauge(
            "celerity_prefetched_jobs",
            "hostname",
            host,
            waiting as f64,
        ));
        self.metrics.set_measured(gauges);
        self.metrics
            .events_dropped
            .store(self.events.dropped(), Relaxed);
        self.metrics.set_ready(problem.map_or(Ok(()), Err));
        self.report();
    }

    /// The length of each consumed queue, or why the broker did not tell.
    async fn queue_lengths(&self) -> (Vec<Series<f64>>, Result<(), String>) {
        let mut gauges = Vec::new();
        for q in &self.queues {
            match tokio::time::timeout(ANSWER_WITHIN, self.broker.queue_len(q)).await {
                Ok(Ok(n)) => gauges.push(gauge("celery_queue_length", "queue_name", q, n as f64)),
                Ok(Err(e)) => return (gauges, Err(format!("broker: {e}"))),
                Err(_) => return (gauges, Err("broker: no answer within 2 s".into())),
            }
        }
        (gauges, Ok(()))
    }

    /// Whether the result backend (if any) answers a read.
    async fn backend_answers(&self) -> Result<(), String> {
        let Some(b) = &self.backend else {
            return Ok(());
        };
        match tokio::time::timeout(ANSWER_WITHIN, b.get(PROBE_ID)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("result backend: {e}")),
            Err(_) => Err("result backend: no answer within 2 s".into()),
        }
    }

    /// In a pool child: sends the snapshot to the supervisor.
    fn report(&self) {
        if let Some(r) = &self.reporter {
            r.send(&JobEvent::Metrics {
                snapshot: self.metrics.snapshot(),
            });
        }
    }
}

fn gauge(name: &str, label: &str, value: &str, v: f64) -> Series<f64> {
    Series {
        name: name.to_owned(),
        labels: vec![(label.to_owned(), value.to_owned())],
        value: v,
    }
}
