//! Prometheus metrics and health of a worker (`--metrics-addr`).
//!
//! The job path counts into [`WorkerMetrics`]: plain atomics, one [`TaskCounters`] per task name
//! and queue, found by name without allocating (created once, on a task's first job). Nothing is
//! formatted until a scrape asks: then the counters become a [`Snapshot`] and `prometheus-client`
//! writes the text. Names and labels are celery-exporter's (`celery_task_*_total` by `name`,
//! `hostname`, `queue_name`; `celery_task_runtime`; `celery_worker_up`, `celery_worker_tasks_active`,
//! `celery_queue_length`), so dashboards made for Celery read ours; our own carry `celerity_`.
//!
//! - `snapshot`: the values, adding them up, and the text format;
//! - `serve`: the listener for `/metrics`, `/healthz` and `/readyz`;
//! - `probe`: in a worker process, the loop that measures queue lengths and readiness;
//! - `pool`: in a supervisor, the children's reports added up (a restarted child's counts stay).

mod pool;
mod probe;
mod serve;
mod snapshot;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

pub use pool::{PoolMetrics, RestartCause};
pub(crate) use probe::Probe;
pub use serve::{serve, Health, Joined, MetricsSource};
pub use snapshot::{Hist, Labels, Series, Snapshot, Totals};

/// The runtime buckets (seconds): Prometheus's default ones, as celery-exporter uses.
pub const RUNTIME_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// Buckets for the result-store and publish latencies (seconds).
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// Most task series (name × queue) one process keeps; the jobs of further names (a flood of
/// unknown task names, say) are counted under [`OTHER_TASKS`].
pub const MAX_TASK_SERIES: usize = 1_000;
/// The `name` label of tasks past [`MAX_TASK_SERIES`].
pub const OTHER_TASKS: &str = "(other)";

/// A histogram of fixed buckets in atomics.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    sum_ns: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(self.bounds.len());
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(1, Relaxed);
        }
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    /// The histogram's state now.
    pub fn value(&self) -> Hist {
        Hist {
            bounds: self.bounds.to_vec(),
            buckets: self.buckets.iter().map(|b| b.load(Relaxed)).collect(),
            sum: self.sum_ns.load(Relaxed) as f64 / 1e9,
            count: self.count.load(Relaxed),
        }
    }
}

/// The counters of one task name on one queue.
#[derive(Debug)]
pub struct TaskCounters {
    name: Box<str>,
    queue: Box<str>,
    pub received: AtomicU64,
    pub started: AtomicU64,
    pub succeeded: AtomicU64,
    pub rejected: AtomicU64,
    pub revoked: AtomicU64,
    pub retried: AtomicU64,
    pub sent: AtomicU64,
    /// Failures by exception type (the rare path: a short list behind a lock).
    failed: Mutex<Vec<(String, u64)>>,
    pub runtime: Histogram,
}

impl TaskCounters {
    fn new(name: &str, queue: &str) -> TaskCounters {
        TaskCounters {
            name: name.into(),
            queue: queue.into(),
            received: AtomicU64::new(0),
            started: AtomicU64::new(0),
            succeeded: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            revoked: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            failed: Mutex::new(Vec::new()),
            runtime: Histogram::new(&RUNTIME_BUCKETS),
        }
    }

    /// Counts a failure with exception type `exc`.
    pub fn failed(&self, exc: &str) {
        let mut f = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        match f.iter_mut().find(|(e, _)| e == exc) {
            Some((_, n)) => *n = n.saturating_add(1),
            None => f.push((exc.to_owned(), 1)),
        }
    }
}

/// Adds one to a counter.
pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

/// The metrics of one worker process.
#[derive(Debug)]
pub struct WorkerMetrics {
    hostname: String,
    /// Task name → its counters on each queue it came from.
    tasks: RwLock<HashMap<Box<str>, Vec<Arc<TaskCounters>>>>,
    /// How many task series there are.
    series: std::sync::atomic::AtomicUsize,
    pub fetch_errors: AtomicU64,
    pub result_store: Histogram,
    pub publish: Histogram,
    dead_lettered: Mutex<Vec<(&'static str, u64)>>,
    /// Filled in by the probe: gauges measured off the job path.
    measured: Mutex<Vec<Series<f64>>>,
    readiness: Mutex<Result<(), String>>,
    pub events_dropped: AtomicU64,
}

impl WorkerMetrics {
    pub fn new(hostname: &str) -> WorkerMetrics {
        WorkerMetrics {
            hostname: hostname.to_owned(),
            tasks: RwLock::default(),
            series: std::sync::atomic::AtomicUsize::new(0),
            fetch_errors: AtomicU64::new(0),
            result_store: Histogram::new(&LATENCY_BUCKETS),
            publish: Histogram::new(&LATENCY_BUCKETS),
            dead_lettered: Mutex::new(Vec::new()),
            measured: Mutex::new(Vec::new()),
            readiness: Mutex::new(Err("starting".into())),
            events_dropped: AtomicU64::new(0),
        }
    }

    /// The counters of task `name` from `queue`: a read lock and a lookup by `&str` (no allocation)
    /// once the task has been seen; created on its first job.
    pub fn task(&self, name: &str, queue: &str) -> Arc<TaskCounters> {
        if let Some(c) = self.find(name, queue) {
            return c;
        }
        let name = if self.series.load(Relaxed) >= MAX_TASK_SERIES {
            OTHER_TASKS
        } else {
            name
        };
        let mut tasks = self.tasks.write().unwrap_or_else(|e| e.into_inner());
        let qs = tasks.entry(name.into()).or_default();
        if let Some(c) = qs.iter().find(|c| &*c.queue == queue) {
            return c.clone();
        }
        let c = Arc::new(TaskCounters::new(name, queue));
        qs.push(c.clone());
        self.series.fetch_add(1, Relaxed);
        c
    }

    fn find(&self, name: &str, queue: &str) -> Option<Arc<TaskCounters>> {
        let tasks = self.tasks.read().unwrap_or_else(|e| e.into_inner());
        tasks
            .get(name)?
            .iter()
            .find(|c| &*c.queue == queue)
            .cloned()
    }

    /// Counts a message dead-lettered for `reason` (a fixed word, not the message's text).
    pub fn dead_lettered(&self, reason: &'static str) {
        let mut d = self.dead_lettered.lock().unwrap_or_else(|e| e.into_inner());
        match d.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, n)) => *n = n.saturating_add(1),
            None => d.push((reason, 1)),
        }
    }

    /// Replaces the measured gauges (queue lengths, active and prefetched jobs).
    pub(crate) fn set_measured(&self, gauges: Vec<Series<f64>>) {
        *self.measured.lock().unwrap_or_else(|e| e.into_inner()) = gauges;
    }

    /// Ready, or why not (set by the probe).
    pub(crate) fn set_ready(&self, r: Result<(), String>) {
        *self.readiness.lock().unwrap_or_else(|e| e.into_inner()) = r;
    }

    fn readiness(&self) -> Result<(), String> {
        self.readiness
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn host(&self) -> (String, String) {
        ("hostname".to_owned(), self.hostname.clone())
    }

    /// The values now.
    pub fn snapshot(&self) -> Snapshot {
        let mut s = Snapshot {
            ready: self.readiness().is_ok(),
            ..Snapshot::default()
        };
        let tasks: Vec<Arc<TaskCounters>> = self
            .tasks
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .flatten()
            .cloned()
            .collect();
        for t in &tasks {
            self.task_series(t, &mut s);
        }
        let host = || vec![self.host()];
        let counter = |name: &str, labels: Labels, value: u64| Series {
            name: name.to_owned(),
            labels,
            value,
        };
        s.counters.push(counter(
            "celerity_broker_reconnects",
            host(),
            self.fetch_errors.load(Relaxed),
        ));
        s.counters.push(counter(
            "celerity_events_dropped",
            host(),
            self.events_dropped.load(Relaxed),
        ));
        for (reason, n) in self
            .dead_lettered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let mut labels = host();
            labels.push(("reason".to_owned(), (*reason).to_owned()));
            s.counters
                .push(counter("celerity_dead_lettered", labels, *n));
        }
        for (name, h) in [
            ("celerity_result_store_seconds", &self.result_store),
            ("celerity_publish_seconds", &self.publish),
        ] {
            s.histograms.push(Series {
                name: name.to_owned(),
                labels: host(),
                value: h.value(),
            });
        }
        s.gauges.push(Series {
            name: "celery_worker_up".to_owned(),
            labels: host(),
            value: 1.0,
        });
        s.gauges.extend(
            self.measured
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .cloned(),
        );
        s
    }

    fn task_series(&self, t: &TaskCounters, s: &mut Snapshot) {
        let labels = || {
            vec![
                ("name".to_owned(), t.name.to_string()),
                self.host(),
                ("queue_name".to_owned(), t.queue.to_string()),
            ]
        };
        for (name, c) in [
            ("celery_task_sent", &t.sent),
            ("celery_task_received", &t.received),
            ("celery_task_started", &t.started),
            ("celery_task_succeeded", &t.succeeded),
            ("celery_task_rejected", &t.rejected),
            ("celery_task_revoked", &t.revoked),
            ("celery_task_retried", &t.retried),
        ] {
            s.counters.push(Series {
                name: name.to_owned(),
                labels: labels(),
                value: c.load(Relaxed),
            });
        }
        for (exc, n) in t.failed.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let mut l = labels();
            l.push(("exception".to_owned(), exc.clone()));
            s.counters.push(Series {
                name: "celery_task_failed".to_owned(),
                labels: l,
                value: *n,
            });
        }
        s.histograms.push(Series {
            name: "celery_task_runtime".to_owned(),
            labels: labels(),
            value: t.runtime.value(),
        });
    }
}

/// A worker process serves its own metrics; it is live while its runtime answers (this answer).
impl MetricsSource for WorkerMetrics {
    fn snapshot(&self) -> Snapshot {
        WorkerMetrics::snapshot(self)
    }

    fn health(&self) -> Health {
        Health {
            live: Ok(()),
            ready: self.readiness(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_counters_are_made_once_per_name_and_queue() {
        let m = WorkerMetrics::new("w@h");
        let a = m.task("t", "q");
        inc(&a.succeeded);
        inc(&m.task("t", "q").succeeded);
        inc(&m.task("t", "other").succeeded);
        m.task("t", "q").failed("ValueError");
        m.task("t", "q").failed("ValueError");
        m.task("t", "q").runtime.observe(Duration::from_millis(30));
        let text = m.snapshot().render();
        for want in [
            r#"celery_task_succeeded_total{name="t",hostname="w@h",queue_name="q"} 2"#,
            r#"celery_task_succeeded_total{name="t",hostname="w@h",queue_name="other"} 1"#,
            r#"celery_task_failed_total{name="t",hostname="w@h",queue_name="q",exception="ValueError"} 2"#,
            r#"celery_task_runtime_bucket{le="0.05",name="t",hostname="w@h",queue_name="q"} 1"#,
            r#"celery_worker_up{hostname="w@h"} 1"#,
        ] {
            assert!(text.contains(want), "{want} not in\n{text}");
        }
    }
}
