//! The beat loop: stand by until the leader lock is ours, then send each entry's due ticks
//! (recorded first, fenced, then sent as an ordinary Celery task message), renewing the lease,
//! until shutdown or until the lock is lost. A reloaded schedule takes effect at once; entries keep
//! their progress across reloads by name.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use tokio::sync::watch;
use tokio::time::{sleep, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use celerity_client::{Client, Expires, SendOptions};

use crate::error::Result;
use crate::observe::BeatObserver;
use crate::schedule::{CatchUp, Entry};
use crate::state::{Lease, Recorded, Store};

/// Longest single sleep, so a wall-clock jump is noticed.
const MAX_SLEEP: Duration = Duration::from_secs(30);

/// A configured beat: its entries, where it sends, where its lock and state live.
pub(crate) struct Ticker {
    entries: watch::Receiver<Vec<Entry>>,
    client: Client,
    store: Store,
    lease: Duration,
    observer: Arc<dyn BeatObserver>,
}

/// Watches nothing.
#[derive(Debug)]
struct Unobserved;

impl BeatObserver for Unobserved {}

/// Why leading stopped.
enum Led {
    Shutdown,
    LostLock,
}

impl Ticker {
    /// A beat over the latest schedule in `entries` (disabled entries are ignored) with a leader
    /// lease of `lease`.
    pub(crate) fn new(
        entries: watch::Receiver<Vec<Entry>>,
        client: Client,
        store: Store,
        lease: Duration,
    ) -> Self {
        let lease = lease.max(Duration::from_millis(300));
        Ticker {
            entries,
            client,
            store,
            lease,
            observer: Arc::new(Unobserved),
        }
    }

    /// Tells `observer` (if any) what this beat does.
    pub(crate) fn observed_by(mut self, observer: Option<Arc<dyn BeatObserver>>) -> Self {
        if let Some(o) = observer {
            self.observer = o;
        }
        self
    }

    /// Runs until `shutdown`: standby (retrying the lock every lease/3), then leader.
    pub(crate) async fn run(&self, shutdown: CancellationToken) -> Result<()> {
        let out = self.run_until(shutdown).await;
        self.store.close().await;
        self.observer.stopped();
        out
    }

    async fn run_until(&self, shutdown: CancellationToken) -> Result<()> {
        let retry = self.lease / 3;
        loop {
            let held = match self.store.try_acquire(self.lease).await {
                Ok(Some(l)) => l,
                Ok(None) => {
                    self.observer.standing_by();
                    debug!("beat: another beat holds the lock; standing by");
                    if wait(&shutdown, retry).await {
                        return Ok(());
                    }
                    continue;
                }
                Err(e) => {
                    self.observer.unreachable(&e.to_string());
                    warn!("beat: cannot reach the lock: {e}");
                    if wait(&shutdown, retry).await {
                        return Ok(());
                    }
                    continue;
                }
            };
            info!(epoch = held.epoch, "beat: leader");
            self.observer.leading();
            let led = self.lead(&held, &shutdown).await;
            if !matches!(led, Ok(Led::Shutdown)) {
                self.observer.lost();
            }
            match led {
                Ok(Led::Shutdown) => {
                    if let Err(e) = self.store.release(&held).await {
                        warn!("beat: could not release the lock: {e}");
                    }
                    return Ok(());
                }
                Ok(Led::LostLock) => warn!(epoch = held.epoch, "beat: lost the lock; standing by"),
                Err(e) => warn!(epoch = held.epoch, "beat: leading failed: {e}; standing by"),
            }
            if wait(&shutdown, retry).await {
                return Ok(());
            }
        }
    }

    async fn lead(&self, held: &Lease, shutdown: &CancellationToken) -> Result<Led> {
        let mut rx = self.entries.clone();
        let mut entries = enabled(&rx.borrow_and_update());
        let start = Utc::now().trunc_subsecs(0);
        let last = self.store.last_runs().await?;
        // Per entry: the tick up to which everything is sent or deliberately skipped.
        let mut cursor: HashMap<String, DateTime<Utc>> = HashMap::new();
        for e in &entries {
            let done = last
                .get(&e.name)
                .and_then(|t| DateTime::from_timestamp(*t, 0));
            let c = match done {
                None => start,
                Some(l) => match (e.latest_in(l, start), e.catch_up) {
                    (None, _) => l,
                    (Some(missed), CatchUp::Once) => {
                        info!(entry = %e.name, tick = %missed, "beat: catching up a tick missed while no beat ran");
                        if !self.fire(held, e, missed).await? {
                            return Ok(Led::LostLock);
                        }
                        missed
                    }
                    (Some(missed), CatchUp::Skip) => {
                        info!(entry = %e.name, latest = %missed, "beat: skipping ticks missed while no beat ran");
                        start
                    }
                },
            };
            cursor.insert(e.name.clone(), c);
        }
        let mut renew_at = Instant::now() + self.lease / 3;
        loop {
            let now = Utc::now();
            for e in &entries {
                let Some(c) = cursor.get_mut(e.name.as_str()) else {
                    continue;
                };
                if let Some(due) = e.latest_in(*c, now) {
                    if e.next_after(*c).is_some_and(|first| first < due) {
                        warn!(entry = %e.name, "beat: fell behind; sending only the latest of several due ticks");
                    }
                    if !self.fire(held, e, due).await? {
                        return Ok(Led::LostLock);
                    }
                    *c = due;
                }
            }
            let next_due = entries
                .iter()
                .filter_map(|e| cursor.get(e.name.as_str()).and_then(|c| e.next_after(*c)))
                .min();
            let mut wake = renew_at.min(Instant::now() + MAX_SLEEP);
            if let Some(t) = next_due {
                let until = (t - Utc::now()).to_std().unwrap_or(Duration::ZERO);
                wake = wake.min(Instant::now() + until);
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(Led::Shutdown),
                _ = tokio::time::sleep_until(wake) => {}
                Ok(()) = rx.changed() => {
                    entries = enabled(&rx.borrow_and_update());
                    // Kept entries keep their cursor; new ones start from now; removed ones go.
                    let now = Utc::now().trunc_subsecs(0);
                    cursor.retain(|name, _| entries.iter().any(|e| &e.name == name));
                    for e in &entries {
                        cursor.entry(e.name.clone()).or_insert(now);
                    }
                }
            }
            if Instant::now() >= renew_at {
                if !self.store.renew(held, self.lease).await? {
                    return Ok(Led::LostLock);
                }
                self.observer.renewed();
                renew_at = Instant::now() + self.lease / 3;
            }
        }
    }

    /// Records `tick` for `e` (fenced) and then sends it. `false`: we are no longer the leader.
    async fn fire(&self, held: &Lease, e: &Entry, tick: DateTime<Utc>) -> Result<bool> {
        match self.store.record(held, &e.name, tick.timestamp()).await? {
            Recorded::NotLeader => return Ok(false),
            Recorded::AlreadySent => {
                debug!(entry = %e.name, %tick, "beat: tick already sent");
                return Ok(true);
            }
            Recorded::Fresh => {}
        }
        let mut o = SendOptions::new();
        o.queue = e.queue.clone();
        o.priority = e.priority;
        o.expires = e.expires.map(Expires::In);
        match self
            .client
            .send_task(&e.task, e.args.clone(), e.kwargs.clone(), &o)
            .await
        {
            Ok(r) => {
                let now = Utc::now();
                self.observer
                    .sent(&e.name, (now - tick).to_std().unwrap_or_default());
                info!(
                    entry = %e.name, task = %e.task, id = %r.id(), scheduled = %tick, actual = %now,
                    "beat: sent"
                )
            }
            // The tick is recorded: sending it again later could run it twice, so it is dropped.
            Err(err) => {
                error!(entry = %e.name, task = %e.task, scheduled = %tick, "beat: send failed, tick dropped: {err}")
            }
        }
        Ok(true)
    }
}

/// The enabled entries of a schedule.
fn enabled(entries: &[Entry]) -> Vec<Entry> {
    entries.iter().filter(|e| e.enabled).cloned().collect()
}

/// Sleeps `d` or until shutdown; `true` if shut down.
async fn wait(shutdown: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = sleep(d) => false,
    }
}
