//! Celery events from one worker process: `worker-online`, `worker-heartbeat` (every
//! [`HEARTBEAT_EVERY`], `freq` 2.0), `worker-offline` on a warm or cold stop, and — when task
//! events are on (`-E`, or the remote `enable_events` Flower sends) — `task-received`, `-started`,
//! `-succeeded`, `-failed`, `-retried`, `-revoked`, with the fields Flower and `celery events` read.
//!
//! Jobs never wait for the broker here: [`EventSender::task`] builds the event and `try_send`s it
//! into a bounded channel ([`QUEUE`] events). One task drains that channel and broadcasts on the
//! `celeryev` exchange: the events that arrive within 20 ms of the first (at most 200) go as one
//! `task.multi` array, as a Celery worker batches them, so under load a broker round trip carries
//! many events. When the channel is full — the broker is slower than the jobs — the event is
//! dropped and counted ([`EventSender::dropped`], shown in `inspect stats` and logged at stop);
//! events are monitoring data, and a job is never held back for them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use celerity_broker::backend::ExceptionInfo;
use celerity_broker::protocol::clock::LamportClock;
use celerity_broker::protocol::event::{self, EVENT_EXCHANGE, SW_IDENT};
use celerity_broker::protocol::{repr, TaskMessage};
use celerity_broker::Broker;

use crate::control::ControlState;
use crate::executor::Counters;

/// How often `worker-heartbeat` is sent (Celery's default `--heartbeat-interval`).
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
/// Task events waiting to be published; more are dropped (and counted).
pub const QUEUE: usize = 10_000;
/// Most task events in one `task.multi` message.
const BATCH: usize = 200;
/// How long the first event of a batch waits for others to join it (Celery flushes its batch on
/// each event-loop tick; a monitor never notices this delay).
const LINGER: Duration = Duration::from_millis(20);

/// What to send.
#[derive(Debug, Clone, Copy)]
pub struct EventsConfig {
    /// Send task events from the start (`-E`).
    pub task_events: bool,
    /// Send worker-online/heartbeat/offline (Celery sends them unless `--without-heartbeat`).
    pub heartbeat: bool,
}

/// The handle jobs and remote control use. Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct EventSender {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    tx: mpsc::Sender<Map<String, Value>>,
    hostname: String,
    clock: Arc<LamportClock>,
    task_events: AtomicBool,
    dropped: AtomicU64,
    /// Asks for one heartbeat now (the remote `heartbeat` command).
    wake: Notify,
}

impl EventSender {
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

    /// Sends a heartbeat at once (remote `heartbeat`).
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
            f.insert("exception".into(), Value::String(exception_repr(exc)));
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

/// Python's `repr(exc)`: `ValueError('boom')`.
pub fn exception_repr(exc: &ExceptionInfo) -> String {
    let args: Vec<String> = exc.exc_message.iter().map(repr::value_repr).collect();
    format!("{}({})", exc.exc_type, args.join(", "))
}

/// The running publisher; [`EventsTask::stop`] sends what is queued, then `worker-offline`.
pub(crate) struct EventsTask {
    stop: CancellationToken,
    handle: JoinHandle<()>,
}

impl EventsTask {
    /// Flushes queued events, sends `worker-offline` and ends the task.
    pub async fn stop(self) {
        self.stop.cancel();
        if let Err(e) = self.handle.await {
            tracing::warn!(error = %e, "the events task ended abnormally");
        }
    }
}

/// Numbers the heartbeats carry.
pub(crate) struct Gauges {
    pub control: Arc<ControlState>,
    pub counters: Arc<Counters>,
}

/// Starts publishing for node `hostname` on `broker`.
pub(crate) fn start(
    broker: Arc<dyn Broker>,
    hostname: String,
    clock: Arc<LamportClock>,
    config: EventsConfig,
    gauges: Gauges,
) -> (EventSender, EventsTask) {
    let (tx, rx) = mpsc::channel(QUEUE);
    let inner = Arc::new(Inner {
        tx,
        hostname,
        clock,
        task_events: AtomicBool::new(config.task_events),
        dropped: AtomicU64::new(0),
        wake: Notify::new(),
    });
    let stop = CancellationToken::new();
    let publisher = Publisher {
        broker,
        inner: inner.clone(),
        gauges,
        heartbeat: config.heartbeat,
        failing: false,
    };
    let handle = tokio::spawn(publisher.run(rx, stop.clone()));
    (EventSender { inner }, EventsTask { stop, handle })
}

struct Publisher {
    broker: Arc<dyn Broker>,
    inner: Arc<Inner>,
    gauges: Gauges,
    heartbeat: bool,
    /// True while publishing fails (so a broker outage logs once, not per event).
    failing: bool,
}

impl Publisher {
    async fn run(mut self, mut rx: mpsc::Receiver<Map<String, Value>>, stop: CancellationToken) {
        if self.heartbeat {
            self.worker_event("worker-online").await;
        }
        let mut tick = tokio::time::interval_at(
            tokio::time::Instant::now() + HEARTBEAT_EVERY,
            HEARTBEAT_EVERY,
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                _ = tick.tick(), if self.heartbeat => self.worker_event("worker-heartbeat").await,
                () = self.inner.wake.notified() => self.worker_event("worker-heartbeat").await,
                first = rx.recv() => {
                    let Some(first) = first else { break };
                    // Gather what comes within LINGER: under load one message carries many
                    // events instead of a broker round trip each.
                    let mut batch = vec![first];
                    let until = tokio::time::Instant::now() + LINGER;
                    while batch.len() < BATCH {
                        match tokio::time::timeout_at(until, rx.recv()).await {
                            Ok(Some(e)) => batch.push(e),
                            Ok(None) | Err(_) => break,
                        }
                    }
                    self.publish(batch).await;
                }
            }
        }
        // Stopping: what jobs queued goes out first, then the goodbye.
        let mut rest = Vec::new();
        while let Ok(e) = rx.try_recv() {
            rest.push(e);
        }
        for chunk in rest.chunks(BATCH) {
            self.publish(chunk.to_vec()).await;
        }
        if self.heartbeat {
            self.worker_event("worker-offline").await;
        }
        let dropped = self.inner.dropped.load(Ordering::Relaxed);
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "task events dropped because the broker could not keep up"
            );
        }
    }

    async fn worker_event(&mut self, kind: &str) {
        let mut f = Map::new();
        f.insert("freq".into(), Value::from(HEARTBEAT_EVERY.as_secs_f64()));
        f.insert(
            "active".into(),
            Value::from(self.gauges.control.active_count()),
        );
        f.insert(
            "processed".into(),
            Value::from(self.gauges.counters.processed()),
        );
        f.insert("loadavg".into(), Value::from(loadavg()));
        f.insert("sw_ident".into(), Value::from(SW_IDENT));
        f.insert("sw_ver".into(), Value::from(env!("CARGO_PKG_VERSION")));
        f.insert("sw_sys".into(), Value::from(event::sw_sys()));
        let e = event::event(kind, &self.inner.hostname, self.inner.clock.forward(), f);
        self.publish(vec![e]).await;
    }

    async fn publish(&mut self, events: Vec<Map<String, Value>>) {
        let Some((key, message)) = event::to_message(&self.inner.hostname, events) else {
            return;
        };
        match self.broker.broadcast(EVENT_EXCHANGE, &key, &message).await {
            Ok(()) => {
                if self.failing {
                    tracing::info!("events are being published again");
                }
                self.failing = false;
            }
            Err(e) => {
                if !self.failing {
                    tracing::warn!(error = %e, "could not publish events; dropping them until the broker is back");
                }
                self.failing = true;
            }
        }
    }
}

/// The 1, 5 and 15 minute load averages (`/proc/loadavg`), rounded up to 2 decimals as Celery
/// sends them; zeros where they cannot be read.
pub fn loadavg() -> Vec<f64> {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut out: Vec<f64> = text
        .split_whitespace()
        .take(3)
        .map(|v| v.parse::<f64>().map_or(0.0, |x| (x * 100.0).ceil() / 100.0))
        .collect();
    out.resize(3, 0.0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use celerity_broker::memory::MemoryBroker;

    #[tokio::test]
    async fn worker_and_task_events_reach_subscribers() {
        let broker: Arc<dyn Broker> =
            Arc::new(MemoryBroker::named(&uuid::Uuid::new_v4().to_string()));
        let mut sub = broker.subscribe(EVENT_EXCHANGE, "#", "test").await.unwrap();
        let (events, task) = start(
            broker.clone(),
            "w@h".into(),
            Arc::new(LamportClock::new()),
            EventsConfig {
                task_events: false,
                heartbeat: true,
            },
            Gauges {
                control: Arc::default(),
                counters: Arc::default(),
            },
        );
        events.task("task-started", "id-0", Map::new);
        events.set_task_events(true);
        events.task("task-started", "id-1", Map::new);
        task.stop().await;
        let mut kinds = Vec::new();
        while let Ok(Ok(Some(m))) =
            tokio::time::timeout(Duration::from_millis(200), sub.next()).await
        {
            for e in event::from_message(&m) {
                assert_eq!(e["hostname"], "w@h");
                kinds.push(format!(
                    "{} {}",
                    e["type"].as_str().unwrap(),
                    e.get("uuid").and_then(Value::as_str).unwrap_or("-")
                ));
            }
        }
        assert_eq!(
            kinds,
            ["worker-online -", "task-started id-1", "worker-offline -"]
        );
        assert_eq!(events.dropped(), 0);
    }

    #[test]
    fn exceptions_read_like_python() {
        let e = ExceptionInfo::new("ValueError", "boom", "builtins");
        assert_eq!(exception_repr(&e), "ValueError('boom')");
    }

    #[test]
    fn loadavg_has_three_values() {
        assert_eq!(loadavg().len(), 3);
    }
}
