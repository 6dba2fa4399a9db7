//! The heartbeater: the one task of a worker process that publishes Celery events on the `celeryev`
//! exchange. It sends `worker-online` when it starts, `worker-heartbeat` every [`HEARTBEAT_EVERY`]
//! (`freq` 2.0, with the active and processed counts read from [`Jobs`]) or when asked, and
//! `worker-offline` when stopped; and it drains the task events jobs queue through
//! [`EventSender`]: the events that arrive within 20 ms of the first (at most 200) go as one
//! `task.multi` array, as a Celery worker batches them, so under load a broker round trip carries
//! many events. A broker outage drops events (logged once), never blocks a job.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use celerity_broker::protocol::event::{self, EVENT_EXCHANGE, SW_IDENT};
use celerity_broker::Broker;

use crate::events::{Event, EventSender};
use crate::jobs::Jobs;

/// How often `worker-heartbeat` is sent (Celery's default `--heartbeat-interval`).
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
/// Most task events in one `task.multi` message.
const BATCH: usize = 200;
/// How long the first event of a batch waits for others to join it (Celery flushes its batch on
/// each event-loop tick; a monitor never notices this delay).
const LINGER: Duration = Duration::from_millis(20);

/// The running heartbeater; [`Heartbeater::stop`] sends what is queued, then `worker-offline`.
pub(crate) struct Heartbeater {
    stop: CancellationToken,
    handle: JoinHandle<()>,
}

impl Heartbeater {
    /// Starts publishing `events`' queue (`rx`) on `broker`; worker events too when `heartbeat`.
    pub fn start(
        broker: Arc<dyn Broker>,
        events: EventSender,
        rx: mpsc::Receiver<Event>,
        jobs: Arc<Jobs>,
        heartbeat: bool,
    ) -> Heartbeater {
        let stop = CancellationToken::new();
        let publisher = Publisher {
            broker,
            events,
            jobs,
            heartbeat,
            failing: false,
        };
        let handle = tokio::spawn(publisher.run(rx, stop.clone()));
        Heartbeater { stop, handle }
    }

    /// Flushes queued events, sends `worker-offline` and ends the task.
    pub async fn stop(self) {
        self.stop.cancel();
        if let Err(e) = self.handle.await {
            tracing::warn!(error = %e, "the heartbeater ended abnormally");
        }
    }
}

struct Publisher {
    broker: Arc<dyn Broker>,
    events: EventSender,
    jobs: Arc<Jobs>,
    heartbeat: bool,
    /// True while publishing fails (so a broker outage logs once, not per event).
    failing: bool,
}

impl Publisher {
    async fn run(mut self, mut rx: mpsc::Receiver<Event>, stop: CancellationToken) {
        if self.heartbeat {
            self.worker_event("worker-online").await;
        }
        let mut tick = tokio::time::interval_at(
            tokio::time::Instant::now() + HEARTBEAT_EVERY,
            HEARTBEAT_EVERY,
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let events = self.events.clone();
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                _ = tick.tick(), if self.heartbeat => self.worker_event("worker-heartbeat").await,
                () = events.heartbeat_wanted() => self.worker_event("worker-heartbeat").await,
                first = rx.recv() => {
                    let Some(first) = first else { break };
                    let batch = gather(first, &mut rx).await;
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
        let dropped = self.events.dropped();
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
        f.insert("active".into(), Value::from(self.jobs.active_count()));
        f.insert("processed".into(), Value::from(self.jobs.processed()));
        f.insert("loadavg".into(), Value::from(loadavg()));
        f.insert("sw_ident".into(), Value::from(SW_IDENT));
        f.insert("sw_ver".into(), Value::from(env!("CARGO_PKG_VERSION")));
        f.insert("sw_sys".into(), Value::from(event::sw_sys()));
        let e = self.events.worker_event(kind, f);
        self.publish(vec![e]).await;
    }

    async fn publish(&mut self, events: Vec<Event>) {
        let Some((key, message)) = event::to_message(self.events.hostname(), events) else {
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

/// `first` and what else arrives within [`LINGER`] (at most [`BATCH`]): under load one message
/// carries many events instead of a broker round trip each.
async fn gather(first: Event, rx: &mut mpsc::Receiver<Event>) -> Vec<Event> {
    let mut batch = vec![first];
    let until = tokio::time::Instant::now() + LINGER;
    while batch.len() < BATCH {
        match tokio::time::timeout_at(until, rx.recv()).await {
            Ok(Some(e)) => batch.push(e),
            Ok(None) | Err(_) => break,
        }
    }
    batch
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
    use celerity_broker::protocol::clock::LamportClock;

    #[tokio::test]
    async fn worker_and_task_events_reach_subscribers() {
        let broker: Arc<dyn Broker> =
            Arc::new(MemoryBroker::named(&uuid::Uuid::new_v4().to_string()));
        let mut sub = broker.subscribe(EVENT_EXCHANGE, "#", "test").await.unwrap();
        let (events, rx) = EventSender::new("w@h".into(), Arc::new(LamportClock::new()), false);
        let task = Heartbeater::start(broker.clone(), events.clone(), rx, Arc::default(), true);
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
    fn loadavg_has_three_values() {
        assert_eq!(loadavg().len(), 3);
    }
}
