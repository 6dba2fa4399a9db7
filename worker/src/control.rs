//! Remote control: listens on Celery's pidbox fanout (`celery.pidbox`) for requests addressed to
//! this worker (`destination` null or naming it, or a `glob` pattern matching it), acts on them
//! and, when the request carries a ticket, replies the way a Celery worker does: to
//! `reply_to.exchange` (`reply.celery.pidbox`) with routing key `reply_to.routing_key`, headers
//! `{ticket, clock}`, body `{"<node>": reply}`. The
//! commands themselves are in `commands.rs`; Python's `celery inspect …` / `app.control.…` and
//! `celerity inspect|control …` send the same requests.
//!
//! [`ControlState`] is what remote control shares with the executor: revoked ids (kept like Celery
//! keeps them: in memory, at most [`MAX_REVOKED`], each for [`REVOKED_FOR`]; a job whose id is
//! revoked is skipped when it arrives or right before it starts, stored as REVOKED; with `terminate`
//! a running job's cancellation token fires), and the jobs this process holds — reserved (waiting
//! for a slot or a rate limit), scheduled (waiting for their ETA) and active — for `inspect`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use celerity_broker::protocol::clock::LamportClock;
use celerity_broker::protocol::control::{
    pidbox_queue, reply_message, ControlRequest, PIDBOX_EXCHANGE,
};
use celerity_broker::protocol::{event, TaskMessage};
use celerity_broker::{Broker, Delivery};

use crate::commands;
use crate::events::EventSender;
use crate::executor::Counters;
use crate::limits::RateLimits;
use crate::pool::Pool;
use crate::registry::Registry;

/// Most revoked ids remembered (Celery's `CELERY_WORKER_REVOKES_MAX`).
pub const MAX_REVOKED: usize = 50_000;
/// How long a revoked id is remembered (Celery's `CELERY_WORKER_REVOKE_EXPIRES`).
pub const REVOKED_FOR: Duration = Duration::from_secs(10_800);

/// What remote control shares with the executor.
#[derive(Debug, Default)]
pub(crate) struct ControlState {
    revoked: Mutex<Revoked>,
    /// Running jobs' cancellation tokens, for `terminate`.
    running: Mutex<HashMap<String, CancellationToken>>,
    /// Jobs held by this process, by id, for `inspect active|reserved|scheduled`.
    jobs: Mutex<HashMap<String, Job>>,
    /// Jobs started, by task name (`inspect stats` → `total`).
    totals: Mutex<HashMap<String, u64>>,
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

#[derive(Debug, Default)]
struct Revoked {
    at: HashMap<String, Instant>,
    order: VecDeque<(Instant, String)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ControlState {
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
        {
            let mut r = lock(&self.revoked);
            let now = Instant::now();
            for id in ids {
                r.at.insert(id.clone(), now);
                r.order.push_back((now, id.clone()));
            }
            // Forget the oldest beyond the limits (entries re-revoked later keep their newer time).
            while let Some((t, id)) = r.order.front().cloned() {
                if r.order.len() <= MAX_REVOKED && t.elapsed() < REVOKED_FOR {
                    break;
                }
                r.order.pop_front();
                if r.at.get(&id) == Some(&t) {
                    r.at.remove(&id);
                }
            }
        }
        if !terminate {
            return 0;
        }
        let running = lock(&self.running);
        ids.iter()
            .filter_map(|id| running.get(id))
            .map(CancellationToken::cancel)
            .count()
    }

    /// Registers a running job (and marks it active for `inspect`); the guard unregisters it.
    pub fn started(self: &Arc<Self>, id: &str, token: CancellationToken) -> RunningGuard {
        lock(&self.running).insert(id.to_owned(), token);
        let name = {
            let mut jobs = lock(&self.jobs);
            jobs.get_mut(id).map(|j| {
                j.phase = Phase::Active;
                j.time_start = Some(event::timestamp());
                j.name.clone()
            })
        };
        if let Some(name) = name {
            *lock(&self.totals).entry(name).or_default() += 1;
        }
        RunningGuard {
            state: self.clone(),
            id: id.to_owned(),
        }
    }

    /// Starts showing a received job as reserved; it disappears when the guard drops.
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
        };
        lock(&self.jobs).insert(h.id.clone(), job);
        JobGuard {
            state: self.clone(),
            id: h.id.clone(),
        }
    }

    /// Jobs in `phase`, oldest id order not guaranteed.
    pub fn jobs(&self, phase: Phase) -> Vec<Job> {
        lock(&self.jobs)
            .values()
            .filter(|j| j.phase == phase)
            .cloned()
            .collect()
    }

    /// Jobs running now.
    pub fn active_count(&self) -> usize {
        lock(&self.running).len()
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
                (
                    id.clone(),
                    Value::Array(vec![Value::from(at), Value::String(id.clone())]),
                )
            })
            .collect()
    }

    fn set_phase(&self, id: &str, phase: Phase) {
        if let Some(j) = lock(&self.jobs).get_mut(id) {
            j.phase = phase;
        }
    }
}

/// A job shown to `inspect` until dropped.
pub(crate) struct JobGuard {
    state: Arc<ControlState>,
    id: String,
}

impl JobGuard {
    /// The job waits for its ETA.
    pub fn scheduled(&self) {
        self.state.set_phase(&self.id, Phase::Scheduled);
    }

    /// The job waits for a slot.
    pub fn reserved(&self) {
        self.state.set_phase(&self.id, Phase::Reserved);
    }
}

impl Drop for JobGuard {
    fn drop(&mut self) {
        lock(&self.state.jobs).remove(&self.id);
    }
}

/// Unregisters a running job when dropped.
pub(crate) struct RunningGuard {
    state: Arc<ControlState>,
    id: String,
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        lock(&self.state.running).remove(&self.id);
    }
}

/// What the listener needs to answer requests (shared with `commands.rs`).
pub(crate) struct Remote {
    pub hostname: String,
    pub broker: Arc<dyn Broker>,
    pub state: Arc<ControlState>,
    pub clock: Arc<LamportClock>,
    pub registry: Arc<Registry>,
    pub limits: Arc<RateLimits>,
    pub counters: Arc<Counters>,
    pub pool: Arc<Pool>,
    pub events: EventSender,
    pub queues: Vec<String>,
    pub started: std::time::Instant,
    /// Cancelled by a remote `shutdown` (a warm stop).
    pub shutdown: CancellationToken,
}

/// Serves control requests for `remote.hostname` until `stop` fires.
pub(crate) async fn listen(remote: Arc<Remote>, stop: CancellationToken) {
    let queue = pidbox_queue(&remote.hostname);
    let mut sub = tokio::select! {
        s = remote.broker.subscribe(PIDBOX_EXCHANGE, "", &queue) => match s {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "remote control is not available on this broker; revoke and inspect will not reach this worker");
                return;
            }
        },
        _ = stop.cancelled() => return,
    };
    loop {
        let message = tokio::select! {
            m = sub.next() => m,
            _ = stop.cancelled() => return,
        };
        let message = match message {
            Ok(Some(m)) => m,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "remote control stopped");
                return;
            }
        };
        let request = match ControlRequest::from_message(&message) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring a malformed control request");
                continue;
            }
        };
        if !request.is_for(&remote.hostname) {
            continue;
        }
        if let Some(seen) = message.headers.get("clock").and_then(Value::as_u64) {
            remote.clock.adjust(seen);
        } else {
            remote.clock.forward();
        }
        // A request whose sender stopped waiting needs no answer.
        let expired = message
            .headers
            .get("expires")
            .and_then(Value::as_f64)
            .is_some_and(|e| e > 0.0 && e < event::timestamp());
        if expired {
            continue;
        }
        let reply = commands::dispatch(&remote, &request);
        if let (Some((exchange, key)), Some(ticket), Some(reply)) =
            (request.reply_target(), request.ticket.as_deref(), reply)
        {
            let m = reply_message(&remote.hostname, ticket, remote.clock.forward(), reply);
            if let Err(e) = remote.broker.broadcast(&exchange, &key, &m).await {
                tracing::warn!(error = %e, method = request.method, "could not send a control reply");
            }
        }
    }
}

/// `task_id` as one id or a list of ids.
pub(crate) fn task_ids(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revoked_ids_are_remembered_and_running_ones_terminated() {
        let s = Arc::new(ControlState::default());
        let token = CancellationToken::new();
        let guard = s.started("run-1", token.clone());
        assert_eq!(s.revoke(&["a".into(), "run-1".into()], false), 0);
        assert!(s.is_revoked("a") && s.is_revoked("run-1") && !s.is_revoked("b"));
        assert!(!token.is_cancelled());
        assert_eq!(s.revoke(&["run-1".into()], true), 1);
        assert!(token.is_cancelled());
        drop(guard);
        assert_eq!(s.revoke(&["run-1".into()], true), 0);
    }

    #[test]
    fn the_set_is_bounded() {
        let s = ControlState::default();
        let ids: Vec<String> = (0..MAX_REVOKED + 10).map(|i| i.to_string()).collect();
        s.revoke(&ids, false);
        assert!(!s.is_revoked("0") && s.is_revoked(&(MAX_REVOKED + 9).to_string()));
        assert_eq!(lock(&s.revoked).at.len(), MAX_REVOKED);
    }
}
