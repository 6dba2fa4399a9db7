//! The one owner of a worker process's in-flight state: the jobs it holds and where each is
//! (reserved, scheduled, active), the revoked ids, the jobs started per task, and the outcome
//! counters. The processor writes it through [`JobGuard`] and [`Jobs::count`]; remote control, the
//! heartbeater and the server's summary only read it, through the small API below.
//!
//! Revoked ids are kept as Celery keeps them: in memory, at most [`MAX_REVOKED`], each for
//! [`REVOKED_FOR`]. A job whose id is revoked is skipped when it arrives or right before it starts
//! (stored as REVOKED); with `terminate` a running job's cancellation token fires.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use celerity_broker::protocol::{event, TaskMessage};
use celerity_broker::Delivery;

/// Most revoked ids remembered (Celery's `CELERY_WORKER_REVOKES_MAX`).
pub const MAX_REVOKED: usize = 50_000;
/// How long a revoked id is remembered (Celery's `CELERY_WORKER_REVOKE_EXPIRES`).
pub const REVOKED_FOR: Duration = Duration::from_secs(10_800);

/// What a worker did, returned when it stops.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    pub succeeded: u64,
    pub failed: u64,
    pub retried: u64,
    pub revoked: u64,
    pub rejected: u64,
    /// True if a remote `shutdown` command stopped this worker (a pool child then tells its
    /// supervisor to stop the whole pool, as `celery control shutdown` stops a Celery worker).
    pub shutdown_requested: bool,
}

/// How a job ended, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Succeeded,
    Failed,
    Retried,
    Revoked,
    /// Undecodable: dead-lettered.
    Rejected,
}

/// Where a held job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Waiting for a slot (or its rate limit).
    Reserved,
    /// Waiting for its ETA.
    Scheduled,
    /// Running.
    Active,
}

/// A held job: what `inspect` shows of it (built into Celery's request info only when asked, so a
/// job pays a few moves and one clone of its arguments, not a JSON document).
#[derive(Debug, Clone)]
pub(crate) struct Job {
    pub phase: Phase,
    pub id: String,
    pub name: String,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    pub queue: String,
    pub priority: u8,
    pub redelivered: bool,
    pub eta: Option<String>,
    /// Unix time it started running.
    pub time_start: Option<f64>,
    /// Fired by a revoke with `terminate` while it runs.
    cancel: Option<CancellationToken>,
}

impl Job {
    /// Celery's request info (`Request.info()`): id, name, args, kwargs, type, hostname,
    /// time_start, acknowledged, delivery_info, worker_pid.
    pub fn info(&self, hostname: &str) -> Value {
        serde_json::json!({
            "id": self.id,
            "name": self.name,
            "args": self.args,
            "kwargs": self.kwargs,
            "type": self.name,
            "hostname": hostname,
            "time_start": self.time_start,
            "acknowledged": false,
            "delivery_info": {
                "exchange": "",
                "routing_key": self.queue,
                "priority": self.priority,
                "redelivered": self.redelivered,
            },
            "worker_pid": std::process::id(),
        })
    }
}

/// The in-flight state of one worker process.
#[derive(Debug, Default)]
pub(crate) struct Jobs {
    revoked: Mutex<Revoked>,
    /// Jobs held by this process, by id.
    held: Mutex<HashMap<String, Job>>,
    /// Jobs started, by task name (`inspect stats` → `total`).
    totals: Mutex<HashMap<String, u64>>,
    counters: Counters,
}

#[derive(Debug, Default)]
struct Counters {
    succeeded: AtomicU64,
    failed: AtomicU64,
    retried: AtomicU64,
    revoked: AtomicU64,
    rejected: AtomicU64,
}

#[derive(Debug, Default)]
struct Revoked {
    at: HashMap<String, Instant>,
    order: VecDeque<(Instant, String)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Jobs {
    /// Starts showing a received job as reserved; it is forgotten when the guard drops.
    pub fn track(self: &Arc<Self>, message: &TaskMessage, delivery: &Delivery) -> JobGuard {
        let h = &message.headers;
        let job = Job {
            phase: Phase::Reserved,
            id: h.id.clone(),
            name: h.task.clone(),
            args: message.args.clone(),
            kwargs: message.kwargs.clone(),
            queue: delivery.queue.clone(),
            priority: delivery.message.properties.priority,
            redelivered: delivery.redelivered,
            eta: h.eta.map(|e| e.to_rfc3339()),
            time_start: None,
            cancel: None,
        };
        lock(&self.held).insert(h.id.clone(), job);
        JobGuard {
            jobs: self.clone(),
            id: h.id.clone(),
        }
    }

    /// Counts a job's outcome.
    pub fn count(&self, outcome: Outcome) {
        let c = &self.counters;
        let counter = match outcome {
            Outcome::Succeeded => &c.succeeded,
            Outcome::Failed => &c.failed,
            Outcome::Retried => &c.retried,
            Outcome::Revoked => &c.revoked,
            Outcome::Rejected => &c.rejected,
        };
        counter.fetch_add(1, Relaxed);
    }

    /// The outcome counters so far.
    pub fn summary(&self) -> Summary {
        let c = &self.counters;
        Summary {
            succeeded: c.succeeded.load(Relaxed),
            failed: c.failed.load(Relaxed),
            retried: c.retried.load(Relaxed),
            revoked: c.revoked.load(Relaxed),
            rejected: c.rejected.load(Relaxed),
            shutdown_requested: false,
        }
    }

    /// Jobs handled so far, whatever their outcome but rejection (the `processed` of worker events).
    pub fn processed(&self) -> u64 {
        let s = self.summary();
        s.succeeded + s.failed + s.retried + s.revoked
    }

    /// True if `id` was revoked (and not so long ago that it was forgotten).
    pub fn is_revoked(&self, id: &str) -> bool {
        lock(&self.revoked)
            .at
            .get(id)
            .is_some_and(|t| t.elapsed() < REVOKED_FOR)
    }

    /// Remembers `ids` as revoked; with `terminate`, cancels those running here. Returns how many
    /// running jobs were terminated.
    pub fn revoke(&self, ids: &[String], terminate: bool) -> usize {
        lock(&self.revoked).remember(ids);
        if !terminate {
            return 0;
        }
        let held = lock(&self.held);
        ids.iter()
            .filter_map(|id| held.get(id)?.cancel.as_ref())
            .map(CancellationToken::cancel)
            .count()
    }

    /// Jobs in `phase`, in no particular order.
    pub fn in_phase(&self, phase: Phase) -> Vec<Job> {
        lock(&self.held)
            .values()
            .filter(|j| j.phase == phase)
            .cloned()
            .collect()
    }

    /// Jobs running now.
    pub fn active_count(&self) -> usize {
        lock(&self.held)
            .values()
            .filter(|j| j.phase == Phase::Active)
            .count()
    }

    /// Jobs running now and jobs held but not started (reserved or waiting for their ETA).
    pub fn phase_counts(&self) -> (usize, usize) {
        let held = lock(&self.held);
        let active = held.values().filter(|j| j.phase == Phase::Active).count();
        (active, held.len() - active)
    }

    /// Jobs started so far, by task name.
    pub fn totals(&self) -> HashMap<String, u64> {
        lock(&self.totals).clone()
    }

    /// Revoked ids still remembered.
    pub fn revoked_ids(&self) -> Vec<String> {
        let r = lock(&self.revoked);
        r.at.iter()
            .filter(|(_, t)| t.elapsed() < REVOKED_FOR)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Revoked ids still remembered with when they were revoked (unix seconds), in the shape
    /// Celery's `hello` (mingle) exchanges: `{id: [time, id]}`.
    pub fn revoked_for_hello(&self) -> Map<String, Value> {
        let now = event::timestamp();
        let r = lock(&self.revoked);
        r.at.iter()
            .filter(|(_, t)| t.elapsed() < REVOKED_FOR)
            .map(|(id, t)| {
                let at = now - t.elapsed().as_secs_f64();
                let pair = Value::Array(vec![Value::from(at), Value::String(id.clone())]);
                (id.clone(), pair)
            })
            .collect()
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut Job)) {
        if let Some(j) = lock(&self.held).get_mut(id) {
            f(j);
        }
    }
}

impl Revoked {
    fn remember(&mut self, ids: &[String]) {
        let now = Instant::now();
        for id in ids {
            self.at.insert(id.clone(), now);
            self.order.push_back((now, id.clone()));
        }
        // Forget the oldest beyond the limits (entries re-revoked later keep their newer time).
        while let Some((t, id)) = self.order.front().cloned() {
            if self.order.len() <= MAX_REVOKED && t.elapsed() < REVOKED_FOR {
                break;
            }
            self.order.pop_front();
            if self.at.get(&id) == Some(&t) {
                self.at.remove(&id);
            }
        }
    }
}

/// A job held by this process, shown to `inspect` until dropped.
pub(crate) struct JobGuard {
    jobs: Arc<Jobs>,
    id: String,
}

impl JobGuard {
    /// The job waits for its ETA.
    pub fn scheduled(&self) {
        self.jobs.update(&self.id, |j| j.phase = Phase::Scheduled);
    }

    /// The job waits for a slot.
    pub fn reserved(&self) {
        self.jobs.update(&self.id, |j| j.phase = Phase::Reserved);
    }

    /// The job runs; `cancel` fires if it is revoked with `terminate`.
    pub fn started(&self, cancel: CancellationToken) {
        let mut name = None;
        self.jobs.update(&self.id, |j| {
            j.phase = Phase::Active;
            j.time_start = Some(event::timestamp());
            j.cancel = Some(cancel);
            name = Some(j.name.clone());
        });
        if let Some(name) = name {
            *lock(&self.jobs.totals).entry(name).or_default() += 1;
        }
    }
}

impl Drop for JobGuard {
    fn drop(&mut self) {
        lock(&self.jobs.held).remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use celerity_broker::protocol::TaskMessage;
    use celerity_broker::transport::AckHandle;

    struct NoAck;

    #[async_trait::async_trait]
    impl AckHandle for NoAck {
        async fn ack(self: Box<Self>) -> celerity_broker::Result<()> {
            Ok(())
        }
        async fn reject(self: Box<Self>, _requeue: bool) -> celerity_broker::Result<()> {
            Ok(())
        }
    }

    fn delivery(message: &TaskMessage) -> Delivery {
        Delivery::new(message.encode(), "q".into(), false, Box::new(NoAck), None)
    }

    #[test]
    fn revoked_ids_are_remembered_and_running_ones_terminated() {
        let jobs = Arc::new(Jobs::default());
        let m = TaskMessage::with_id("t", "run-1", vec![], Map::new());
        let guard = jobs.track(&m, &delivery(&m));
        let token = CancellationToken::new();
        guard.started(token.clone());
        assert_eq!(jobs.active_count(), 1);
        assert_eq!(jobs.revoke(&["a".into(), "run-1".into()], false), 0);
        assert!(jobs.is_revoked("a") && jobs.is_revoked("run-1") && !jobs.is_revoked("b"));
        assert!(!token.is_cancelled());
        assert_eq!(jobs.revoke(&["run-1".into()], true), 1);
        assert!(token.is_cancelled());
        drop(guard);
        assert_eq!(jobs.active_count(), 0);
        assert_eq!(jobs.revoke(&["run-1".into()], true), 0);
        assert_eq!(jobs.totals().get("t"), Some(&1));
    }

    #[test]
    fn the_revoked_set_is_bounded() {
        let jobs = Jobs::default();
        let ids: Vec<String> = (0..MAX_REVOKED + 10).map(|i| i.to_string()).collect();
        jobs.revoke(&ids, false);
        assert!(!jobs.is_revoked("0") && jobs.is_revoked(&(MAX_REVOKED + 9).to_string()));
        assert_eq!(lock(&jobs.revoked).at.len(), MAX_REVOKED);
    }

    #[test]
    fn outcomes_are_counted() {
        let jobs = Jobs::default();
        for o in [Outcome::Succeeded, Outcome::Failed, Outcome::Rejected] {
            jobs.count(o);
        }
        assert_eq!(jobs.processed(), 2);
        assert_eq!(jobs.summary().rejected, 1);
    }
}
