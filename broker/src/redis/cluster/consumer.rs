//! The `redis+cluster://` consumer and its ack handles.
//!
//! A fetch runs `fetch.lua` (the single-server transport's script) once per queue, with that queue's
//! own keys only (its lists, its `unacked` hash and index, its dead-letter list: one hash slot), so
//! each pop-and-record is atomic on the master owning the queue. Queues are visited round-robin,
//! the first queue of one fetch going last in the next.
//!
//! Waiting for work: one blocking command cannot wait on lists in several slots (they may live on
//! different masters), and a blocking command would stall the multiplexed cluster connection it is
//! sent on. An idle consumer therefore polls: after a fetch that found nothing it waits 5 ms,
//! doubling up to [`MAX_IDLE_DELAY`] while the queues stay empty, and goes back to fetching at once
//! when a fetch finds work. An idle consumer costs at most 5 script calls a second per queue, and
//! picks up a message within [`MAX_IDLE_DELAY`].
//!
//! Each delivery's ack handle settles it with `settle.lua` / `restore.lua` against its queue's own
//! keys. Unacked deliveries older than the visibility timeout are restored by a periodic sweep of
//! each consumed queue's own `unacked_index` (under that queue's own mutex). `next()` is cancel-safe:
//! a fetch runs as a task whose handle the consumer keeps.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use redis::Value;
use tokio::sync::OwnedSemaphorePermit;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::conn::ClusterRedial;
use super::keys::{check_single_slot, from_redis, ClusterKeys};
use crate::backoff::Backoff;
use crate::error::{BrokerError, Result};
use crate::limits::Limits;
use crate::redis::envelope;
use crate::redis::restore::{unix_now, Side};
use crate::redis::scripts::{FETCH, RESTORE, SETTLE, UNLOCK};
use crate::transport::{AckHandle, Consumer, Delivery, PrefetchWindow};

/// The most messages one fetch pops (over all queues).
const MAX_BATCH: usize = 64;
/// The first pause of an idle consumer.
const MIN_IDLE_DELAY: Duration = Duration::from_millis(5);
/// The longest pause of an idle consumer between fetches.
pub(crate) const MAX_IDLE_DELAY: Duration = Duration::from_millis(200);
/// Most lapsed deliveries one sweep round restores per queue.
const SWEEP_BATCH: usize = 500;

/// What the consumers and ack handles of one cluster broker share.
pub(crate) struct Inner {
    pub(crate) conn: ClusterRedial,
    pub(crate) keys: ClusterKeys,
    pub(crate) visibility_timeout: f64,
    pub(crate) restore_interval: Duration,
    pub(crate) limits: Limits,
    pub(crate) closed: CancellationToken,
}

/// Deliveries handed out and not yet settled: `(queue, tag)` → the scores they may hold.
type Outstanding = Arc<Mutex<HashMap<(String, String), Vec<String>>>>;

/// One message a fetch brought.
struct Fetched {
    queue: String,
    score: String,
    /// 1 recorded, 0 dead-lettered as unreadable, 2 dead-lettered as a duplicate tag.
    kind: i64,
    tag: String,
    raw: Vec<u8>,
}

/// A fetch in flight, kept across cancelled `next()` calls.
struct Pending {
    task: JoinHandle<Result<Vec<Fetched>>>,
    permits: Vec<OwnedSemaphorePermit>,
}

/// A consumer of one or more queues on a cluster (see the module doc).
pub(crate) struct ClusterConsumer {
    inner: Arc<Inner>,
    queues: Vec<String>,
    /// The queue the next fetch visits first.
    start: usize,
    buffer: VecDeque<Delivery>,
    pending: Option<Pending>,
    window: PrefetchWindow,
    idle_delay: Duration,
    backoff: Backoff,
    cancel: CancellationToken,
    outstanding: Outstanding,
    sweeper: JoinHandle<()>,
    closed: bool,
}

impl ClusterConsumer {
    pub(crate) async fn start(inner: Arc<Inner>, queues: Vec<String>, prefetch: usize) -> Self {
        let cancel = inner.closed.child_token();
        for q in &queues {
            if let Err(e) = sweep_queue(&inner, q).await {
                tracing::warn!(queue = %q, error = %e, "initial restore sweep failed");
            }
        }
        let sweeper = tokio::spawn(sweep_periodically(
            inner.clone(),
            queues.clone(),
            cancel.clone(),
        ));
        ClusterConsumer {
            inner,
            queues,
            start: 0,
            buffer: VecDeque::new(),
            pending: None,
            window: PrefetchWindow::new(prefetch.max(1)),
            idle_delay: MIN_IDLE_DELAY,
            backoff: Backoff::default(),
            cancel,
            outstanding: Arc::default(),
            sweeper,
            closed: false,
        }
    }

    /// One prefetch slot (waiting for it) and any other free ones, up to [`MAX_BATCH`]; `None`
    /// once closed.
    async fn take_permits(&self) -> Option<Vec<OwnedSemaphorePermit>> {
        let first = tokio::select! {
            p = self.window.permits().clone().acquire_owned() => p.ok()?,
            () = self.cancel.cancelled() => return None,
        };
        let mut permits = vec![first];
        while permits.len() < MAX_BATCH {
            match self.window.permits().clone().try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        Some(permits)
    }

    fn start_fetch(&mut self, permits: Vec<OwnedSemaphorePermit>) {
        let n = self.queues.len();
        let order: Vec<String> = (0..n)
            .map(|i| self.queues[(self.start + i) % n].clone())
            .collect();
        self.start = (self.start + 1) % n.max(1);
        let want = permits.len();
        let inner = self.inner.clone();
        let task = tokio::spawn(async move { fetch(&inner, &order, want).await });
        self.pending = Some(Pending { task, permits });
    }

    /// Turns fetched messages into deliveries (each with one permit); malformed ones are logged and
    /// dead-lettered, never lost.
    fn accept(&mut self, batch: Vec<Fetched>, mut permits: Vec<OwnedSemaphorePermit>) {
        for f in batch {
            if f.kind != 1 {
                tracing::error!(queue = %f.queue, tag = %f.tag, duplicate = f.kind == 2, message = %preview(&f.raw), "unreadable or duplicate-tagged message moved to the dead-letter list");
                continue;
            }
            match envelope::decode(&f.raw) {
                Ok(decoded) => {
                    let Some(permit) = permits.pop() else {
                        // Cannot happen (a fetch pops at most one message per permit); give it back.
                        tokio::spawn(restore_one(
                            self.inner.clone(),
                            f.queue,
                            f.tag,
                            vec![f.score],
                            Side::Next,
                        ));
                        continue;
                    };
                    self.outstanding
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert((f.queue.clone(), f.tag.clone()), vec![f.score.clone()]);
                    let handle = ClusterAck {
                        inner: self.inner.clone(),
                        outstanding: self.outstanding.clone(),
                        queue: f.queue.clone(),
                        tag: f.tag,
                        scores: Mutex::new(vec![f.score]),
                    };
                    self.buffer.push_back(Delivery::new(
                        decoded.message,
                        f.queue,
                        decoded.redelivered,
                        Box::new(handle),
                        Some(permit),
                    ));
                }
                Err(e) => {
                    tracing::error!(queue = %f.queue, tag = %f.tag, error = %e, message = %preview(&f.raw), "message does not decode; moved to the dead-letter list");
                    let inner = self.inner.clone();
                    tokio::spawn(async move {
                        if let Err(e) = dead_letter(&inner, &f.queue, &f.tag, &f.score, f.raw).await
                        {
                            tracing::warn!(error = %e, "could not dead-letter; it comes back after the visibility timeout");
                        }
                    });
                }
            }
        }
    }

    /// Sleeps `delay` unless closed first (true: closed).
    async fn pause(&self, delay: Duration) -> bool {
        tokio::select! {
            () = tokio::time::sleep(delay) => false,
            () = self.cancel.cancelled() => true,
        }
    }

    /// Gives back everything not settled: the buffer, a fetch in flight, and handed-out deliveries.
    async fn shut_down(&mut self) -> Result<()> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        self.cancel.cancel();
        self.sweeper.abort();
        if let Some(p) = self.pending.take() {
            if let Ok(Ok(batch)) = p.task.await {
                for f in batch.into_iter().filter(|f| f.kind == 1) {
                    restore_one(
                        self.inner.clone(),
                        f.queue,
                        f.tag,
                        vec![f.score],
                        Side::Next,
                    )
                    .await;
                }
            }
        }
        self.buffer.clear(); // their handles are still outstanding: given back below
        let held: Vec<((String, String), Vec<String>)> = self
            .outstanding
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .collect();
        for ((queue, tag), scores) in held {
            restore_one(self.inner.clone(), queue, tag, scores, Side::Next).await;
        }
        Ok(())
    }
}

#[async_trait]
impl Consumer for ClusterConsumer {
    async fn next(&mut self) -> Result<Option<Delivery>> {
        loop {
            if let Some(d) = self.buffer.pop_front() {
                return Ok(Some(d));
            }
            if self.closed || self.cancel.is_cancelled() {
                self.shut_down().await?;
                return Ok(None);
            }
            if self.pending.is_none() {
                let Some(permits) = self.take_permits().await else {
                    self.shut_down().await?;
                    return Ok(None);
                };
                self.start_fetch(permits);
            }
            let Some(p) = self.pending.as_mut() else {
                continue;
            };
            let joined = tokio::select! {
                j = &mut p.task => j,
                () = self.cancel.cancelled() => continue,
            };
            let Some(Pending { permits, .. }) = self.pending.take() else {
                continue;
            };
            let fetched = joined.unwrap_or_else(|e| {
                Err(BrokerError::Transport {
                    transport: "redis-cluster",
                    message: format!("fetch task failed: {e}"),
                })
            });
            match fetched {
                Ok(batch) if !batch.is_empty() => {
                    self.backoff.reset();
                    self.idle_delay = MIN_IDLE_DELAY;
                    self.accept(batch, permits);
                }
                Ok(_) => {
                    drop(permits);
                    self.backoff.reset();
                    let delay = self.idle_delay;
                    self.idle_delay = (delay * 2).min(MAX_IDLE_DELAY);
                    if self.pause(delay).await {
                        continue;
                    }
                }
                Err(e) => {
                    // Connection loss and failover (CLUSTERDOWN, TRYAGAIN, MOVED storms) all heal.
                    drop(permits);
                    let delay = self.backoff.next();
                    tracing::warn!(error = %e, retry_in = ?delay, "redis-cluster fetch failed; retrying");
                    if self.pause(delay).await {
                        continue;
                    }
                }
            }
        }
    }

    async fn set_prefetch(&mut self, prefetch: usize) -> Result<()> {
        self.window.resize(prefetch);
        Ok(())
    }

    async fn close(&mut self) -> Result<()> {
        self.shut_down().await
    }
}

impl Drop for ClusterConsumer {
    fn drop(&mut self) {
        self.cancel.cancel();
        self.sweeper.abort();
        if !self.closed {
            tracing::debug!("redis-cluster consumer dropped without close; its deliveries come back after the visibility timeout");
        }
    }
}

/// Pops up to `want` messages, visiting `queues` in order, one `fetch.lua` call per queue.
async fn fetch(inner: &Inner, queues: &[String], want: usize) -> Result<Vec<Fetched>> {
    let mut out = Vec::new();
    for q in queues {
        if out.len() >= want {
            break;
        }
        let k = &inner.keys;
        let [k0, k3, k6, k9] = k.priority_keys(q);
        let keys = [k.unacked(q), k.unacked_index(q), k0, k3, k6, k9, k.dead(q)];
        check_single_slot(&keys)?;
        let mut inv = FETCH.prepare_invoke();
        for key in &keys {
            inv.key(key);
        }
        inv.arg(format!("{:.6}", unix_now()))
            .arg(want - out.len())
            .arg(inner.limits.max_dead_letters)
            .arg(q);
        let reply: Value = inv
            .invoke_async(&mut inner.conn.clone())
            .await
            .map_err(from_redis)?;
        parse_fetch(reply, q, &mut out)?;
    }
    Ok(out)
}

/// Reads `fetch.lua`'s flat reply (the score, then kind, position, tag, envelope per message).
fn parse_fetch(reply: Value, queue: &str, out: &mut Vec<Fetched>) -> Result<()> {
    let bad = || BrokerError::malformed("unexpected reply from fetch.lua");
    let Value::Array(items) = reply else {
        return Err(bad());
    };
    let mut it = items.into_iter();
    let score = match it.next() {
        Some(Value::BulkString(b)) => String::from_utf8(b).map_err(|_| bad())?,
        _ => return Err(bad()),
    };
    while let (Some(kind), Some(_pos), Some(tag), Some(raw)) =
        (it.next(), it.next(), it.next(), it.next())
    {
        let (Value::Int(kind), Value::BulkString(tag), Value::BulkString(raw)) = (kind, tag, raw)
        else {
            return Err(bad());
        };
        out.push(Fetched {
            queue: queue.to_owned(),
            score: score.clone(),
            kind,
            tag: String::from_utf8(tag).map_err(|_| bad())?,
            raw,
        });
    }
    Ok(())
}

/// Gives one delivery back to its queue (marked redelivered; an unreadable record goes to the
/// queue's dead-letter list), if its score is one of `scores`. Failures are logged: the delivery
/// then comes back through the sweep after the visibility timeout.
async fn restore_one(
    inner: Arc<Inner>,
    queue: String,
    tag: String,
    scores: Vec<String>,
    side: Side,
) {
    if let Err(e) = try_restore(&inner, &queue, &tag, &scores, side).await {
        tracing::warn!(queue, tag, error = %e, "could not give a delivery back; it comes back after the visibility timeout");
    }
}

async fn try_restore(
    inner: &Inner,
    queue: &str,
    tag: &str,
    scores: &[String],
    side: Side,
) -> Result<bool> {
    let k = &inner.keys;
    let mut conn = inner.conn.clone();
    let record: Option<Vec<u8>> = redis::cmd("HGET")
        .arg(k.unacked(queue))
        .arg(tag)
        .query_async(&mut conn)
        .await
        .map_err(from_redis)?;
    let Some(record) = record else {
        // No record: drop a stale index entry (only if it is still the one we held).
        let _: i64 = SETTLE
            .key(k.unacked(queue))
            .key(k.unacked_index(queue))
            .arg(tag)
            .arg("")
            .arg(scores)
            .invoke_async(&mut conn)
            .await
            .map_err(from_redis)?;
        return Ok(false);
    };
    let (dest, payload) = match envelope::restored(&record) {
        Ok(r) => (k.queue(queue, r.priority), r.payload),
        Err(e) => {
            tracing::error!(queue, tag, error = %e, "unreadable unacked record; moved to the dead-letter list");
            (k.dead(queue), record.clone())
        }
    };
    move_record(inner, queue, tag, scores, &record, &payload, &dest, side).await
}

/// `restore.lua` on `queue`'s own keys: moves `tag`'s record to `dest` as `payload`.
#[allow(clippy::too_many_arguments)]
async fn move_record(
    inner: &Inner,
    queue: &str,
    tag: &str,
    scores: &[String],
    record: &[u8],
    payload: &[u8],
    dest: &str,
    side: Side,
) -> Result<bool> {
    let k = &inner.keys;
    let keys = [k.unacked(queue), k.unacked_index(queue), dest.to_owned()];
    check_single_slot(&keys)?;
    let mut inv = RESTORE.prepare_invoke();
    for key in &keys {
        inv.key(key);
    }
    inv.arg(tag)
        .arg(record)
        .arg(payload)
        .arg(if side == Side::Back { "L" } else { "R" });
    for s in scores {
        inv.arg(s);
    }
    let done: i64 = inv
        .invoke_async(&mut inner.conn.clone())
        .await
        .map_err(from_redis)?;
    Ok(done == 1)
}

/// Moves a recorded delivery whose envelope does not decode to its queue's dead-letter list.
async fn dead_letter(
    inner: &Inner,
    queue: &str,
    tag: &str,
    score: &str,
    raw: Vec<u8>,
) -> Result<()> {
    let k = &inner.keys;
    let record: Option<Vec<u8>> = redis::cmd("HGET")
        .arg(k.unacked(queue))
        .arg(tag)
        .query_async(&mut inner.conn.clone())
        .await
        .map_err(from_redis)?;
    if let Some(record) = record {
        let dead = k.dead(queue);
        move_record(
            inner,
            queue,
            tag,
            &[score.to_owned()],
            &record,
            &raw,
            &dead,
            Side::Back,
        )
        .await?;
        let keep = i64::from(inner.limits.max_dead_letters);
        let _: () = redis::cmd("LTRIM")
            .arg(&dead)
            .arg(0)
            .arg(keep - 1)
            .query_async(&mut inner.conn.clone())
            .await
            .map_err(from_redis)?;
    }
    Ok(())
}

/// Restores `queue`'s deliveries unacked for longer than the visibility timeout (under the queue's
/// own mutex, so one process sweeps a queue at a time). Returns how many went back.
pub(crate) async fn sweep_queue(inner: &Inner, queue: &str) -> Result<usize> {
    let k = &inner.keys;
    let mut conn = inner.conn.clone();
    let token = uuid::Uuid::new_v4().to_string();
    let expire_ms = (inner.visibility_timeout * 1000.0).clamp(1000.0, 300_000.0) as u64;
    let locked: Option<String> = redis::cmd("SET")
        .arg(k.unacked_mutex(queue))
        .arg(&token)
        .arg("NX")
        .arg("PX")
        .arg(expire_ms)
        .query_async(&mut conn)
        .await
        .map_err(from_redis)?;
    if locked.is_none() {
        return Ok(0);
    }
    let ceil = unix_now() - inner.visibility_timeout;
    let lapsed: redis::RedisResult<Vec<(String, String)>> = redis::cmd("ZRANGE")
        .arg(k.unacked_index(queue))
        .arg("-inf")
        .arg(format!("{ceil:.6}"))
        .arg("BYSCORE")
        .arg("LIMIT")
        .arg(0)
        .arg(SWEEP_BATCH)
        .arg("WITHSCORES")
        .query_async(&mut conn)
        .await;
    let mut restored = 0;
    if let Ok(lapsed) = &lapsed {
        for (tag, score) in lapsed {
            if try_restore(inner, queue, tag, std::slice::from_ref(score), Side::Next).await? {
                restored += 1;
            }
        }
    }
    let _: redis::RedisResult<i64> = UNLOCK
        .key(k.unacked_mutex(queue))
        .arg(&token)
        .invoke_async(&mut conn)
        .await;
    lapsed.map_err(from_redis)?;
    if restored > 0 {
        tracing::info!(
            queue,
            restored,
            "restored unacked messages older than the visibility timeout"
        );
    }
    Ok(restored)
}

async fn sweep_periodically(inner: Arc<Inner>, queues: Vec<String>, cancel: CancellationToken) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(inner.restore_interval) => {}
            () = cancel.cancelled() => return,
        }
        for q in &queues {
            if let Err(e) = sweep_queue(&inner, q).await {
                tracing::warn!(queue = %q, error = %e, "restore sweep failed");
            }
        }
    }
}

/// Settles one delivery against its queue's own `unacked` hash and index.
struct ClusterAck {
    inner: Arc<Inner>,
    outstanding: Outstanding,
    queue: String,
    tag: String,
    /// The scores the delivery may hold in the index (the fetch's, and any renewal's).
    scores: Mutex<Vec<String>>,
}

impl ClusterAck {
    fn scores(&self) -> Vec<String> {
        self.scores
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn forget_outstanding(&self) {
        self.outstanding
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(self.queue.clone(), self.tag.clone()));
    }

    /// `settle.lua` with `renew` ('' = forget); true if the delivery was still ours.
    async fn settle(&self, renew: &str) -> Result<bool> {
        let k = &self.inner.keys;
        let done: i64 = SETTLE
            .key(k.unacked(&self.queue))
            .key(k.unacked_index(&self.queue))
            .arg(&self.tag)
            .arg(renew)
            .arg(self.scores())
            .invoke_async(&mut self.inner.conn.clone())
            .await
            .map_err(from_redis)?;
        Ok(done == 1)
    }
}

#[async_trait]
impl AckHandle for ClusterAck {
    async fn ack(self: Box<Self>) -> Result<()> {
        let mine = self.settle("").await?;
        self.forget_outstanding();
        if !mine {
            tracing::warn!(queue = %self.queue, tag = %self.tag, "ack of a delivery no longer ours (restored after the visibility timeout?)");
        }
        Ok(())
    }

    async fn reject(self: Box<Self>, requeue: bool) -> Result<()> {
        if requeue {
            try_restore(
                &self.inner,
                &self.queue,
                &self.tag,
                &self.scores(),
                Side::Back,
            )
            .await?;
        } else {
            self.settle("").await?;
        }
        self.forget_outstanding();
        Ok(())
    }

    async fn keep_alive(&self) -> Result<()> {
        let score = format!("{:.6}", unix_now());
        if self.settle(&score).await? {
            let mut scores = self.scores.lock().unwrap_or_else(|e| e.into_inner());
            scores.push(score.clone());
            let mut outstanding = self.outstanding.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(held) = outstanding.get_mut(&(self.queue.clone(), self.tag.clone())) {
                held.push(score);
            }
        }
        Ok(())
    }

    fn lease(&self) -> Option<Duration> {
        Duration::try_from_secs_f64(self.inner.visibility_timeout).ok()
    }
}

/// The start of a message, for logs.
fn preview(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(&raw[..raw.len().min(200)]).into_owned();
    if raw.len() > 200 {
        format!("{text}… ({} bytes)", raw.len())
    } else {
        text
    }
}
