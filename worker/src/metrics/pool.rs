//! The supervisor's side of the metrics of a pool: each child sends its [`Snapshot`] every second
//! over the pipe it already reports on (`report`); `/metrics` is their sum. When a child ends, its
//! last counts move into the retired totals, so the totals never go back when a child is replaced
//! (counts made in the last second of a child that is killed are the only ones lost). Gauges are
//! only the live children's. The supervisor adds what only it knows: restarts by cause and the
//! jobs it failed at their hard time limit.
//!
//! Live (`/healthz`): every child has reported within [`STALE_AFTER`] (a child whose runtime is
//! stuck in a job that never yields stops reporting). Ready (`/readyz`): every child says ready.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::snapshot::{Labels, Series, Snapshot, Totals};
use super::{Health, MetricsSource};

/// A child that has not reported for this long makes the pool not live.
pub const STALE_AFTER: Duration = Duration::from_secs(6);

/// Why a child was replaced (the `cause` label of `celerity_process_restarts_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartCause {
    /// It exited by itself (an error, or status 0 for no known reason).
    Exit,
    /// A signal killed it.
    Signal,
    /// The supervisor killed it: a job ran past its hard time limit.
    HardTimeLimit,
    /// It recycled itself after `--max-tasks-per-child` jobs.
    MaxTasks,
    /// It recycled itself above `--max-memory-per-child`.
    MaxMemory,
}

impl RestartCause {
    fn label(self) -> &'static str {
        match self {
            RestartCause::Exit => "exit",
            RestartCause::Signal => "signal",
            RestartCause::HardTimeLimit => "hard_time_limit",
            RestartCause::MaxTasks => "max_tasks",
            RestartCause::MaxMemory => "max_memory",
        }
    }
}

struct Child {
    last: Option<Snapshot>,
    heard: Instant,
}

#[derive(Default)]
struct Inner {
    retired: Totals,
    own: Totals,
    live: HashMap<usize, Child>,
}

/// The pool's metrics, kept by the supervisor.
pub struct PoolMetrics {
    processes: usize,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for PoolMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolMetrics")
            .field("processes", &self.processes)
            .finish_non_exhaustive()
    }
}

impl PoolMetrics {
    pub fn new(processes: usize) -> PoolMetrics {
        PoolMetrics {
            processes,
            inner: Mutex::default(),
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A child started in `slot`.
    pub fn started(&self, slot: usize) {
        let now = Instant::now();
        self.inner().live.insert(
            slot,
            Child {
                last: None,
                heard: now,
            },
        );
    }

    /// The child in `slot` reported.
    pub fn report(&self, slot: usize, snapshot: Snapshot) {
        let now = Instant::now();
        let mut inner = self.inner();
        let child = inner.live.entry(slot).or_insert(Child {
            last: None,
            heard: now,
        });
        child.last = Some(snapshot);
        child.heard = now;
    }

    /// The child in `slot` ended; `cause` if it is to be replaced (not on shutdown).
    pub fn ended(&self, slot: usize, cause: Option<RestartCause>) {
        let mut inner = self.inner();
        if let Some(last) = inner.live.remove(&slot).and_then(|c| c.last) {
            inner.retired.add(&last, false);
        }
        if let Some(cause) = cause {
            let labels = vec![("cause".to_owned(), cause.label().to_owned())];
            inner
                .own
                .add(&one("celerity_process_restarts", labels), false);
        }
    }

    /// The supervisor failed job of `task` from `queue` at its hard time limit, in `slot`'s child.
    pub fn time_limit_failure(&self, slot: usize, task: &str, queue: &str) {
        let mut inner = self.inner();
        let hostname = inner
            .live
            .get(&slot)
            .and_then(|c| c.last.as_ref())
            .and_then(hostname_of)
            .unwrap_or_default();
        let labels = vec![
            ("name".to_owned(), task.to_owned()),
            ("hostname".to_owned(), hostname),
            ("queue_name".to_owned(), queue.to_owned()),
            ("exception".to_owned(), "TimeLimitExceeded".to_owned()),
        ];
        inner.own.add(&one("celery_task_failed", labels), false);
    }

    /// The pool's totals now.
    pub fn snapshot(&self) -> Snapshot {
        let inner = self.inner();
        let mut t = Totals::default();
        t.add(&inner.retired.snapshot(), false);
        t.add(&inner.own.snapshot(), false);
        for c in inner.live.values() {
            if let Some(s) = &c.last {
                t.add(s, true);
            }
        }
        let mut s = t.snapshot();
        s.ready = self.ready(&inner).is_ok();
        s
    }

    fn live(&self, inner: &Inner) -> Result<(), String> {
        let now = Instant::now();
        let mut stale: Vec<usize> = inner
            .live
            .iter()
            .filter(|(_, c)| now.saturating_duration_since(c.heard) > STALE_AFTER)
            .map(|(slot, _)| *slot)
            .collect();
        stale.sort_unstable();
        if stale.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "pool processes {stale:?} have not reported for over {} s",
                STALE_AFTER.as_secs()
            ))
        }
    }

    fn ready(&self, inner: &Inner) -> Result<(), String> {
        self.live(inner)?;
        let mut waiting: Vec<usize> = (0..self.processes)
            .filter(|slot| {
                !inner
                    .live
                    .get(slot)
                    .and_then(|c| c.last.as_ref())
                    .is_some_and(|s| s.ready)
            })
            .collect();
        waiting.sort_unstable();
        if waiting.is_empty() {
            Ok(())
        } else {
            Err(format!("pool processes {waiting:?} are not ready"))
        }
    }
}

impl MetricsSource for PoolMetrics {
    fn snapshot(&self) -> Snapshot {
        PoolMetrics::snapshot(self)
    }

    fn health(&self) -> Health {
        let inner = self.inner();
        Health {
            live: self.live(&inner),
            ready: self.ready(&inner),
        }
    }
}

fn one(name: &str, labels: Labels) -> Snapshot {
    Snapshot {
        counters: vec![Series {
            name: name.to_owned(),
            labels,
            value: 1,
        }],
        ..Snapshot::default()
    }
}

fn hostname_of(s: &Snapshot) -> Option<String> {
    s.gauges
        .iter()
        .find(|g| g.name == "celery_worker_up")?
        .labels
        .iter()
        .find(|(k, _)| k == "hostname")
        .map(|(_, v)| v.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counted(n: u64, ready: bool) -> Snapshot {
        let mut s = one("celery_task_succeeded", vec![("name".into(), "t".into())]);
        if let Some(c) = s.counters.first_mut() {
            c.value = n;
        }
        s.ready = ready;
        s
    }

    #[test]
    fn a_replaced_childs_counts_stay_in_the_totals() {
        let pool = PoolMetrics::new(2);
        pool.started(0);
        pool.started(1);
        pool.report(0, counted(5, true));
        pool.report(1, counted(2, true));
        assert_eq!(pool.health().ready, Ok(()));
        pool.ended(0, Some(RestartCause::MaxTasks));
        pool.started(0);
        assert!(pool.health().ready.is_err());
        pool.report(0, counted(1, true));
        let text = pool.metrics();
        assert!(
            text.contains(r#"celery_task_succeeded_total{name="t"} 8"#),
            "{text}"
        );
        assert!(
            text.contains(r#"celerity_process_restarts_total{cause="max_tasks"} 1"#),
            "{text}"
        );
        assert_eq!(
            pool.health(),
            Health {
                live: Ok(()),
                ready: Ok(())
            }
        );
    }
}
