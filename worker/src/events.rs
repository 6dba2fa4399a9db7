//! Celery task events from one worker process — `task-received`, `-started`, `-succeeded`,
//! `-failed`, `-retried`, `-revoked`, with the fields Flower and `celery events` read — sent when
//! task events are on (`-E`, or the remote `enable_events` Flower sends).
//!
//! Jobs never wait for the broker here: [`EventSender::task`] builds the event and `try_send`s it
//! into a bounded channel ([`QUEUE`] events) that the heartbeater (`heartbeat.rs`) drains and
//! publishes. When the channel is full — the broker is slower than the jobs — the event is dropped
//! and counted ([`EventSender::dropped`], shown in `inspect stats` and logged at stop); events are
//! monitoring data, and a job is never held back for them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::sync::{mpsc, Notify};

use celerity_broker::backend::ExceptionInfo;
use celerity_broker::protocol::clock::LamportClock;
use celerity_broker::protocol::{event, repr, TaskMessage};

/// Task events waiting to be published; more are dropped (and counted).
pub const QUEUE: usize = 10_000;

/// What to send.
#[derive(Debug, Clone, Copy)]
pub struct EventsConfig {
    /// Send task events from the start (`-E`).
    pub task_events: bool,
    /// Send worker-online/heartbeat/offline (Celery sends them unless `--without-heartbeat`).
    pub heartbeat: bool,
}

/// One event document, as [`event::event`] builds it.
pub(crate) type Event = Map<String, Value>;

/// The handle jobs and remote control use. Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct EventSender {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    tx: mpsc::Sender<Event>,
    hostname: String,
    clock: Arc<LamportClock>,
    task_events: AtomicBool,
    dropped: AtomicU64,
    /// Asks for one heartbeat now (the remote `heartbeat` command).
    wake: Notify,
}

impl EventSender {
    /// A sender for node `hostname`, and the receiving end the heartbeater drains.
    pub fn new(
        hostname: String,
        clock: Arc<LamportClock>,
        task_events: bool,
    ) -> (EventSender, mpsc::Receiver<Event>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let inner = Arc::new(Inner {
            tx,
            hostname,
            clock,
            task_events: AtomicBool::new(task_events),
            dropped: AtomicU64::new(0),
            wake: Notify::new(),
        });
        (EventSender { inner }, rx)
    }

    /// The node the events are from.
    pub fn hostname(&self) -> &str {
        &self.inner.hostname
    }

    /// A worker event (`worker-heartbeat`, …) with `fields`, stamped with the node and the clock.
    pub fn worker_event(&self, kind: &str, fields: Map<String, Value>) -> Event {
        event::event(
            kind,
            &self.inner.hostname,
            self.inner.clock.forward(),
            fields,
        )
    }

    /// Resolves when a heartbeat was asked for ([`EventSender::heartbeat_now`]).
    pub async fn heartbeat_wanted(&self) {
        self.inner.wake.notified().await;
    }

    /// Queues task event `kind` (`task-started`, …) for job `uuid` with `fields`, if task events
    /// are on. Never waits.
    pub fn task(&self, kind: &str, uuid: &str, fields: impl FnOnce() -> Map<String, Value>) {
        if !self.task_events() {
            return;
        }
        let mut f = fields();
        f.insert("uuid".into(), Value::String(uuid.to_owned()));
        let e = event::event(kind, &self.inner.hostname, self.inner.clock.forward(), f);
        if self.inner.tx.try_send(e).is_err() {
            self.inner.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// True if task events are being sent.
    pub fn task_events(&self) -> bool {
        self.inner.task_events.load(Ordering::Relaxed)
    }

    /// Turns task events on or off (remote `enable_events` / `disable_events`).
    pub fn set_task_events(&self, on: bool) {
        self.inner.task_events.store(on, Ordering::Relaxed);
    }

    /// Asks the heartbeater for a heartbeat at once (remote `heartbeat`).
    pub fn heartbeat_now(&self) {
        self.inner.wake.notify_one();
    }

    /// Task events dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }
}

/// The task events a job goes through, with the fields Celery's worker puts in each.
impl EventSender {
    /// `task-received`: name, args/kwargs (their repr), root/parent ids, retries, eta, expires.
    pub fn received(&self, m: &TaskMessage) {
        self.task("task-received", m.id(), || {
            let h = &m.headers;
            let mut f = Map::new();
            f.insert("name".into(), Value::String(h.task.clone()));
            let args = m.args_repr();
            let kwargs = m.kwargs_repr();
            f.insert("args".into(), Value::String(args));
            f.insert("kwargs".into(), Value::String(kwargs));
            f.insert(
                "root_id".into(),
                h.root_id.clone().map_or(Value::Null, Value::String),
            );
            f.insert(
                "parent_id".into(),
                h.parent_id.clone().map_or(Value::Null, Value::String),
            );
            f.insert("retries".into(), Value::from(h.retries));
            f.insert(
                "eta".into(),
                h.eta.map_or(Value::Null, |t| Value::String(t.to_rfc3339())),
            );
            f.insert(
                "expires".into(),
                h.expires
                    .map_or(Value::Null, |t| Value::String(t.to_rfc3339())),
            );
            f
        });
    }

    /// `task-started`.
    pub fn started(&self, id: &str) {
        self.task("task-started", id, Map::new);
    }

    /// `task-succeeded`: the result's repr and the run time in seconds.
    pub fn succeeded(&self, id: &str, result: &Value, runtime: Duration) {
        self.task("task-succeeded", id, || {
            let mut f = Map::new();
            f.insert("result".into(), Value::String(repr::value_repr(result)));
            f.insert("runtime".into(), Value::from(runtime.as_secs_f64()));
            f
        });
    }

    /// `task-failed` or `task-retried` (`kind`): the exception's repr and the traceback.
    pub fn failed(&self, kind: &str, id: &str, exc: &ExceptionInfo, traceback: &str) {
        self.task(kind, id, || {
            let mut f = Map::new();
            f.insert("exception".into(), Value::String(exc.repr()));
            f.insert("traceback".into(), Value::String(traceback.to_owned()));
            f
        });
    }

    /// `task-revoked`.
    pub fn revoked(&self, id: &str, terminated: bool, expired: bool) {
        self.task("task-revoked", id, || {
            let mut f = Map::new();
            f.insert("terminated".into(), Value::Bool(terminated));
            f.insert(
                "signum".into(),
                if terminated {
                    Value::from(15)
                } else {
                    Value::Null
                },
            );
            f.insert("expired".into(), Value::Bool(expired));
            f
        });
    }
}
