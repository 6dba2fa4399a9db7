//! The Redis consumer: batched atomic fetch into kombu's ack emulation, and a prefetch window.
//!
//! `next()` hands out a buffered delivery if it has one. Otherwise it takes a prefetch slot (plus any
//! other free ones, up to [`MAX_BATCH`]) and runs `fetch.lua`. In one atomic step that script pops up to
//! that many messages, priority-major over the queues (kombu's key order), and records each one in
//! `unacked` / `unacked_index` exactly as kombu does. A consumer killed at any instant therefore
//! loses nothing: a message is either still in its list or recorded where any restore sweep (ours or
//! a Python worker's) finds it after the visibility timeout. Queues served by a batch are rotated to
//! the end of the order for the next one (kombu's round-robin).
//!
//! When a fetch comes back empty, or with fewer messages than it asked for, the queues were empty
//! and the next fetch is queued behind a blocking wait: on a connection of its own the consumer
//! sends `BLMOVE k k RIGHT RIGHT 1` on its first key (the step-0 list of its first queue, where
//! messages without a priority go) and `fetch.lua` in the same write. Redis runs the script the
//! moment the wait returns, so a message that arrives on an idle consumer costs one round trip, not
//! two. That fetch records its messages with the server's clock, as it runs at a time the consumer
//! does not know. The other keys are watched by [`Waiters`] (see that module), each on a connection
//! of its own: 4 keys per queue (kombu's priority steps) would be 4 × queues connections per
//! consumer, so at most [`MAX_WATCHED_KEYS`] keys are watched — every queue's step-0 list first —
//! and messages on the others are found by the fetch each wait runs when it times out (within
//! about a second). When one of the watched keys gets
//! a message, the consumer `CLIENT UNBLOCK`s the first key's wait and its queued fetch runs at once
//! (it pops from every key). A wait that times out runs the fetch too, which finds nothing, and the
//! consumer queues the next one.
//!
//! The processes of one pool take turns at that wait when they share a [`WaitLock`] (see that
//! module): an idle consumer queues its wait-and-fetch only while it holds the lock, so a message
//! wakes one process of the pool, not all of them. It keeps the lock while it goes on waiting (a fetch
//! that found the queues empty or nearly so) and lets go when a fetch comes back full, when all its
//! prefetch slots are taken, on a connection error and on close. Without the lock it waits for it,
//! and looks for work itself every [`IDLE_RECHECK`] meanwhile.
//!
//! `next()` is cancel-safe: the in-flight fetch (and the idle waits) are futures kept in the consumer,
//! so a caller that stops waiting (a `select!`, a timeout) leaves the reply to the next call instead of
//! stranding what it fetched. They are polled in place, with no task hop on the latency path. Closing
//! unblocks a fetch that is still queued behind its wait and gives back whatever it brought.
//!
//! Malformed messages are never lost and never stop the consumer. An envelope the script cannot read
//! (not JSON, or no delivery tag) is pushed by the script to `<queue>.celerity.dead`. One that parses
//! but does not decode (bad base64, unknown body encoding, wrong field types) is moved there from
//! `unacked`, byte for byte. Both are logged at error level; the dead-letter lists keep the bytes for
//! inspection and replay.
//!
//! Settling deliveries is `ack.rs`'s. `close()`, or dropping the consumer, gives the still-unacked
//! deliveries (and anything a cancelled fetch brought) back to the front of their queues, marked
//! redelivered. Connection errors are retried with a backoff; `next()` fails only on errors that
//! retrying cannot fix.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::BoxFuture;
use redis::aio::MultiplexedConnection;
use redis::Value;
use tokio::sync::OwnedSemaphorePermit;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::ack::Outstanding;
use super::envelope;
use super::restore::{self, unix_now, Side};
use super::scripts::FETCH;
use super::shared::Shared;
use super::waiter::{self, Waiters, BLOCK_SECS};
use crate::backoff::Backoff;
use crate::error::{BrokerError, Result};
use crate::transport::{Consumer, Delivery, PrefetchWindow};
use crate::wait_lock::WaitLock;

/// The most messages one fetch pops.
const MAX_BATCH: usize = 64;
/// The most keys an idle consumer watches with a blocking wait (one connection each; the first key
/// also carries the fetch). Keys past it are found by the fetch every wait runs when it times out,
/// within [`waiter::BLOCK_SECS`].
const MAX_WATCHED_KEYS: usize = 16;
/// How soon an unblock that found the wait not (yet) blocked is sent again.
const UNBLOCK_RETRY: Duration = Duration::from_millis(2);
/// How often an idle consumer looks for itself, in case a wake-up was missed.
const IDLE_RECHECK: Duration = Duration::from_secs(1);

/// The keys an idle consumer blocks on, at most `cap`: priority-major (every queue's step-0 list, where
/// messages without a priority go, before any queue's step-3 list, …), so the keys most messages
/// arrive on are watched first.
fn keys_to_watch(queue_keys: &[[String; 5]], cap: usize) -> Vec<String> {
    (0..4)
        .flat_map(|step| queue_keys.iter().map(move |k| k[step].clone()))
        .take(cap)
        .collect()
}

/// What `next()` does after a step of its loop.
enum Flow {
    /// Go on.
    Go,
    /// Start the loop over.
    Again,
    /// The consumer is closed: no more deliveries.
    Closed,
}

/// Whether a consumer may queue its fetch behind a blocking wait now: always without a wait lock;
/// with one, once it holds the lock. Still without it after [`IDLE_RECHECK`] (or on close) it
/// fetches without waiting instead, so work is found even if the holder is stuck.
async fn my_turn(lock: Option<Arc<WaitLock>>, cancel: CancellationToken) -> bool {
    let Some(lock) = lock else {
        return true;
    };
    if lock.try_take() {
        return true;
    }
    tokio::select! {
        () = lock.take() => true,
        () = tokio::time::sleep(IDLE_RECHECK) => false,
        () = cancel.cancelled() => false,
    }
}

/// One message popped by `fetch.lua`.
struct Fetched {
    /// False when the script dead-lettered it.
    recorded: bool,
    /// Dead-lettered because another unacked message has its delivery tag.
    duplicate: bool,
    /// Position in the queue order the fetch used.
    pos: usize,
    tag: String,
    raw: Vec<u8>,
}

/// A fetch whose reply has not been taken yet (it survives a cancelled `next()`).
struct PendingFetch {
    /// The `unacked_index` score the messages were recorded with, and the messages.
    reply: BoxFuture<'static, Result<(String, Vec<Fetched>)>>,
    /// While the fetch is queued behind a blocking wait: that connection's client id.
    behind: Option<i64>,
    /// The wait is to end now (another key got a message) but has not been seen to end yet.
    unblocking: bool,
    permits: Vec<OwnedSemaphorePermit>,
}

/// The connection an idle consumer's fetch waits on, and its client id.
struct Blocking {
    conn: MultiplexedConnection,
    id: i64,
}

/// What one turn of waiting for a fetch came to.
enum Turn {
    Reply(Result<(String, Vec<Fetched>)>),
    /// Another key got a message: unblock the wait the fetch is queued behind.
    Woken,
    /// Nothing yet: keep waiting.
    Again,
    Closed,
}

/// A consumer of one or more queues (see the module doc).
pub(crate) struct RedisConsumer {
    shared: Arc<Shared>,
    outstanding: Arc<Outstanding>,
    queues: Vec<String>,
    /// The five keys of each queue: priority steps 0, 3, 6, 9, then the dead-letter list.
    queue_keys: Vec<[String; 5]>,
    /// The key an idle consumer's fetch waits on (see the module doc); `waiters` watch the others.
    wake_key: String,
    blocking: Option<Blocking>,
    /// The last fetch found nothing: the next one waits for a message.
    idle: bool,
    /// Queue positions in the order the next fetch visits them.
    order: Vec<usize>,
    buffer: VecDeque<Delivery>,
    pending: Option<PendingFetch>,
    window: PrefetchWindow,
    cancel: CancellationToken,
    waiters: Waiters,
    /// Shared with the other processes of the pool: whose turn it is to wait (see the module doc).
    wait_lock: Option<Arc<WaitLock>>,
    sweeper: Option<JoinHandle<()>>,
    closed: bool,
}

impl RedisConsumer {
    /// Starts the next fetch (behind the blocking wait when idle and it is our turn): opens the
    /// waiting connection if needed and takes prefetch slots, one at least.
    async fn begin_fetch(&mut self, backoff: &mut Backoff) -> Result<Flow> {
        if self.idle && self.blocking.is_none() {
            match waiter::connect_blocking(&self.shared.client).await {
                Ok((conn, id)) => self.blocking = Some(Blocking { conn, id }),
                Err(e) => {
                    // Fetch on the shared connection meanwhile, after a backoff.
                    self.idle = false;
                    let delay = backoff.next();
                    tracing::warn!(error = %e, retry_in = ?delay, "redis consumer could not open its waiting connection");
                    return Ok(if self.sleep_or_close(delay).await {
                        Flow::Closed
                    } else {
                        Flow::Again
                    });
                }
            }
        }
        let Some(permits) = self.take_permits().await else {
            self.shut_down().await?;
            return Ok(Flow::Closed);
        };
        let wait = self.idle && my_turn(self.wait_lock.clone(), self.cancel.clone()).await;
        if self.cancel.is_cancelled() {
            drop(permits);
            self.shut_down().await?;
            return Ok(Flow::Closed);
        }
        let behind = if wait { self.blocking.as_ref() } else { None };
        self.pending = Some(self.start_fetch(permits, behind));
        Ok(Flow::Go)
    }

    /// One prefetch slot (waiting for it if all are taken) and any other free ones, up to
    /// [`MAX_BATCH`]; `None` once the consumer is closed.
    async fn take_permits(&mut self) -> Option<Vec<OwnedSemaphorePermit>> {
        let first = match self.window.permits().clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                // Every slot is taken: a sibling process waits for new work meanwhile.
                self.let_go(false);
                tokio::select! {
                    p = self.window.permits().clone().acquire_owned() => p.ok()?,
                    () = self.cancel.cancelled() => return None,
                }
            }
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

    /// Takes in what a fetch brought (or its error): buffers the deliveries, notes whether the
    /// queues ran dry (the next fetch then waits), and backs off after a lost connection.
    async fn end_fetch(
        &mut self,
        fetched: Result<(String, Vec<Fetched>)>,
        permits: Vec<OwnedSemaphorePermit>,
        backoff: &mut Backoff,
    ) -> Result<Flow> {
        match fetched {
            Ok((score, batch)) if !batch.is_empty() => {
                backoff.reset();
                // Fewer than asked for: the queues were empty after it, so the next fetch may
                // as well wait for a message (it returns at once if one is there by then).
                self.idle = batch.len() < permits.len();
                self.let_go(self.idle);
                // Everything fetched may have been malformed: then the loop fetches again.
                self.accept(batch, &score, permits);
            }
            Ok(_) => {
                // Nothing there: the next fetch waits for a message.
                backoff.reset();
                self.idle = true;
                self.let_go(true);
                drop(permits);
            }
            Err(e) if e.is_connection() => {
                drop(permits);
                self.let_go(false);
                if self.idle {
                    // It waited on the blocking connection: open a new one next time.
                    self.blocking = None;
                }
                let delay = backoff.next();
                tracing::warn!(error = %e, retry_in = ?delay, "redis fetch failed; retrying");
                if self.sleep_or_close(delay).await {
                    return Ok(Flow::Closed);
                }
            }
            Err(e) => return Err(e),
        }
        Ok(Flow::Go)
    }

    pub(crate) async fn start(
        shared: Arc<Shared>,
        queues: Vec<String>,
        prefetch: usize,
        wait_lock: Option<Arc<WaitLock>>,
    ) -> Result<Self> {
        let prefetch = prefetch.max(1);
        let queue_keys: Vec<[String; 5]> = queues
            .iter()
            .map(|q| {
                let [k0, k3, k6, k9] = shared.keys.priority_keys(q);
                [k0, k3, k6, k9, shared.keys.dead(q)]
            })
            .collect();
        let cancel = shared.closed.child_token();
        let mut wait_keys = keys_to_watch(&queue_keys, MAX_WATCHED_KEYS);
        if wait_keys.is_empty() {
            return Err(BrokerError::Transport {
                transport: "redis",
                message: "a consumer needs at least one queue".into(),
            });
        }
        let wake_key = wait_keys.remove(0);
        let waiters = Waiters::new(&shared.client, wait_keys);
        // kombu restores at poll start; a failure here is not fatal (the periodic sweep retries).
        if let Err(e) = restore::sweep(&shared).await {
            tracing::warn!(error = %e, "initial restore sweep failed");
        }
        let sweeper = tokio::spawn(sweep_periodically(shared.clone(), cancel.clone()));
        Ok(RedisConsumer {
            outstanding: Outstanding::new(shared.clone()),
            shared,
            order: (0..queues.len()).collect(),
            queues,
            queue_keys,
            wake_key,
            blocking: None,
            idle: false,
            buffer: VecDeque::new(),
            pending: None,
            window: PrefetchWindow::new(prefetch),
            cancel,
            waiters,
            wait_lock,
            sweeper: Some(sweeper),
            closed: false,
        })
    }

    /// Starts `fetch.lua` for as many messages as `permits` allows (sent when first polled), on the
    /// shared connection or, if `behind` is given, queued behind a blocking wait on the wake key.
    fn start_fetch(
        &self,
        permits: Vec<OwnedSemaphorePermit>,
        behind: Option<&Blocking>,
    ) -> PendingFetch {
        let keys = &self.shared.keys;
        let mut inv = FETCH.prepare_invoke();
        inv.key(keys.unacked()).key(keys.unacked_index());
        for &i in &self.order {
            for k in &self.queue_keys[i] {
                inv.key(k);
            }
        }
        // Behind a wait, the script takes the time when it runs.
        let score = match behind {
            Some(_) => String::new(),
            None => format!("{:.6}", unix_now()),
        };
        inv.arg(score)
            .arg(permits.len())
            .arg(self.shared.limits.max_dead_letters);
        for &i in &self.order {
            inv.arg(&self.queues[i]);
        }
        let nqueues = self.order.len();
        let Some(blocking) = behind else {
            let mut conn = self.shared.conn.clone();
            return PendingFetch {
                reply: Box::pin(async move {
                    let reply: Value = inv.invoke_async(&mut conn).await?;
                    parse_fetch(reply, nqueues)
                }),
                behind: None,
                unblocking: false,
                permits,
            };
        };
        let mut conn = blocking.conn.clone();
        let key = self.wake_key.clone();
        let reply = Box::pin(async move {
            let mut pipe = redis::pipe();
            pipe.cmd("BLMOVE")
                .arg(&key)
                .arg(&key)
                .arg("RIGHT")
                .arg("RIGHT")
                .arg(BLOCK_SECS)
                .ignore()
                .invoke_script(&inv);
            match pipe.query_async::<(Value,)>(&mut conn).await {
                Ok((reply,)) => parse_fetch(reply, nqueues),
                // The script was flushed from Redis: nothing ran. Load it; the next fetch works.
                Err(e)
                    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    FETCH.load_async(&mut conn).await?;
                    Ok((String::new(), Vec::new()))
                }
                Err(e) => Err(e.into()),
            }
        });
        PendingFetch {
            reply,
            behind: Some(blocking.id),
            unblocking: false,
            permits,
        }
    }

    /// After a fetch: a consumer that will wait again (`again`) keeps its turn for the next wait
    /// (released if that does not come soon); one that is busy or stopping lets a sibling wait.
    fn let_go(&self, again: bool) {
        let Some(lock) = &self.wait_lock else {
            return;
        };
        if !again {
            lock.release();
        } else if lock.is_held() {
            lock.release_soon();
        }
    }

    /// Waits for the pending fetch's reply; while it is queued behind a wait, also for the other keys
    /// and for the consumer to close.
    async fn turn(&mut self) -> Turn {
        let Some(pending) = self.pending.as_mut() else {
            return Turn::Again;
        };
        let Some(id) = pending.behind else {
            return Turn::Reply(pending.reply.as_mut().await);
        };
        if pending.unblocking {
            // A `CLIENT UNBLOCK` that reaches Redis before the `BLMOVE` it is meant for (written
            // on another connection a moment earlier) ends nothing, and the fetch would then wait
            // out the whole block: so it is sent again until one lands or the reply comes.
            if unblock(&self.shared, id).await {
                pending.behind = None;
                return Turn::Reply(pending.reply.as_mut().await);
            }
            return tokio::select! {
                reply = pending.reply.as_mut() => Turn::Reply(reply),
                () = tokio::time::sleep(UNBLOCK_RETRY) => Turn::Again,
                () = self.cancel.cancelled() => Turn::Closed,
            };
        }
        tokio::select! {
            reply = pending.reply.as_mut() => Turn::Reply(reply),
            woken = self.waiters.wait(IDLE_RECHECK) => if woken { Turn::Woken } else { Turn::Again },
            () = self.cancel.cancelled() => Turn::Closed,
        }
    }

    /// Turns a fetched batch into buffered deliveries, one permit each, and rotates the queue order.
    fn accept(&mut self, batch: Vec<Fetched>, score: &str, mut permits: Vec<OwnedSemaphorePermit>) {
        let mut served = Vec::new();
        for f in batch {
            let qi = self.order[f.pos];
            if !served.contains(&qi) {
                served.push(qi);
            }
            let queue = &self.queues[qi];
            if f.duplicate {
                tracing::error!(
                    queue = %queue,
                    tag = %f.tag,
                    dead_letter = %self.shared.keys.dead(queue),
                    preview = %preview(&f.raw),
                    "a message reuses the delivery tag of another unacked message (its producer does not make unique tags); moved to the dead-letter list"
                );
                continue;
            }
            if !f.recorded {
                tracing::error!(
                    queue = %queue,
                    dead_letter = %self.shared.keys.dead(queue),
                    preview = %preview(&f.raw),
                    "unreadable message (not a kombu envelope); moved to the dead-letter list"
                );
                continue;
            }
            match envelope::decode(&f.raw) {
                Ok(d) => {
                    let handle = self.outstanding.hand_out(f.tag, score);
                    self.buffer.push_back(Delivery::new(
                        d.message,
                        queue.clone(),
                        d.redelivered,
                        Box::new(handle),
                        permits.pop(),
                    ));
                }
                Err(e) => {
                    tracing::error!(queue = %queue, tag = %f.tag, error = %e, preview = %preview(&f.raw),
                        "undecodable message; moving it to the dead-letter list");
                    tokio::spawn(dead_letter(
                        self.shared.clone(),
                        queue.clone(),
                        f.tag,
                        score.to_owned(),
                        f.raw,
                    ));
                }
            }
        }
        // kombu's round-robin: the queues just served go to the end of the order.
        let (mut hit, mut order): (Vec<usize>, Vec<usize>) =
            self.order.iter().partition(|i| served.contains(i));
        order.append(&mut hit);
        self.order = order;
    }

    /// Sleeps for `delay` after a connection error. True if the consumer was closed meanwhile (it is
    /// then shut down, best effort: Redis may be why we are here).
    async fn sleep_or_close(&mut self, delay: Duration) -> bool {
        let closed = tokio::select! {
            () = tokio::time::sleep(delay) => false,
            () = self.cancel.cancelled() => true,
        };
        if closed {
            if let Err(e) = self.shut_down().await {
                tracing::warn!(error = %e, "could not give back unacked deliveries on close");
            }
        }
        closed
    }

    /// Stops the background tasks and hands back every outstanding delivery. The giving back runs in
    /// its own task, so it completes even if the caller stops waiting for it.
    async fn shut_down(&mut self) -> Result<()> {
        if self.closed {
            return Ok(());
        }
        let job = self.stop();
        let restored = job.await.map_err(|e| BrokerError::Transport {
            transport: "redis",
            message: format!("giving back unacked deliveries: {e}"),
        })??;
        if restored > 0 {
            tracing::debug!(restored, "consumer closed; unacked deliveries given back");
        }
        Ok(())
    }

    /// Marks the consumer closed, stops its tasks and spawns the giving back of what it holds.
    fn stop(&mut self) -> JoinHandle<Result<usize>> {
        self.closed = true;
        self.cancel.cancel();
        self.let_go(false);
        self.waiters = Waiters::new(&self.shared.client, Vec::new());
        if let Some(s) = self.sweeper.take() {
            s.abort();
        }
        self.window.permits().close();
        self.buffer.clear();
        let held = self.outstanding.drain();
        let pending = self.pending.take();
        let shared = self.shared.clone();
        tokio::spawn(async move {
            // What an unfinished fetch brought was never handed out: it goes back first, so it ends up
            // behind the deliveries that were. One still waiting is woken so that it ends now.
            let mut tags = Vec::new();
            if let Some(mut p) = pending {
                let reply = match p.behind {
                    Some(id) => unblocked_reply(&shared, id, &mut p.reply).await,
                    None => p.reply.await,
                };
                if let Ok((score, batch)) = reply {
                    tags.extend(
                        batch
                            .into_iter()
                            .rev()
                            .filter(|f| f.recorded)
                            .map(|f| (f.tag, vec![score.clone()])),
                    );
                }
            }
            tags.extend(held);
            restore::restore_tags(&shared, &tags, Side::Next).await
        })
    }
}

#[async_trait]
impl Consumer for RedisConsumer {
    async fn next(&mut self) -> Result<Option<Delivery>> {
        let mut backoff = Backoff::default();
        loop {
            if self.closed {
                return Ok(None);
            }
            if let Some(d) = self.buffer.pop_front() {
                return Ok(Some(d));
            }
            // A fetch left by a cancelled call is finished before a new one starts.
            if self.pending.is_none() {
                match self.begin_fetch(&mut backoff).await? {
                    Flow::Go => {}
                    Flow::Again => continue,
                    Flow::Closed => return Ok(None),
                }
            }
            let fetched = match self.turn().await {
                Turn::Reply(r) => r,
                Turn::Again => continue,
                Turn::Woken => {
                    if let Some(p) = self.pending.as_mut() {
                        p.unblocking = true;
                    }
                    continue;
                }
                Turn::Closed => {
                    self.shut_down().await?;
                    return Ok(None);
                }
            };
            let Some(PendingFetch { permits, .. }) = self.pending.take() else {
                continue;
            };
            if let Flow::Closed = self.end_fetch(fetched, permits, &mut backoff).await? {
                return Ok(None);
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

impl Drop for RedisConsumer {
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        if tokio::runtime::Handle::try_current().is_err() {
            self.cancel.cancel();
            tracing::warn!(
                "redis consumer dropped outside a runtime; its deliveries come back after the visibility timeout"
            );
            return;
        }
        // Dropped without close(): give the deliveries back in the background.
        let job = self.stop();
        tokio::spawn(async move {
            match job.await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "could not give back the deliveries of a dropped consumer")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "giving back the deliveries of a dropped consumer failed")
                }
            }
        });
    }
}

/// The periodic restore sweep of one consumer, and the forwarding of parked messages that are due
/// (every second, so a parked job runs at most about a second late).
async fn sweep_periodically(shared: Arc<Shared>, cancel: CancellationToken) {
    let mut next_sweep = tokio::time::Instant::now() + shared.restore_interval;
    loop {
        tokio::select! {
            () = tokio::time::sleep(FORWARD_EVERY) => {}
            () = cancel.cancelled() => return,
        }
        loop {
            match restore::forward_due(&shared, FORWARD_BATCH).await {
                Ok(n) if n == FORWARD_BATCH => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "forwarding due parked messages failed");
                    break;
                }
            }
        }
        if tokio::time::Instant::now() >= next_sweep {
            next_sweep = tokio::time::Instant::now() + shared.restore_interval;
            if let Err(e) = restore::sweep(&shared).await {
                tracing::warn!(error = %e, "restore sweep failed");
            }
        }
    }
}

/// Ends the blocking wait of connection `id` early (as if it timed out), so the fetch queued behind
/// it runs now. True if a wait was ended; false if the connection was not blocked (its `BLMOVE` not
/// yet reached Redis, or already returned) or the command failed — harmless: the wait ends by
/// itself within [`BLOCK_SECS`].
async fn unblock(shared: &Shared, id: i64) -> bool {
    let mut conn = shared.conn.clone();
    let done: redis::RedisResult<i64> = redis::cmd("CLIENT")
        .arg("UNBLOCK")
        .arg(id)
        .query_async(&mut conn)
        .await;
    match done {
        Ok(n) => n == 1,
        Err(e) => {
            tracing::debug!(error = %e, "CLIENT UNBLOCK failed; the wait ends by itself");
            false
        }
    }
}

/// The reply of a fetch queued behind the wait of connection `id`, ending that wait now: unblocked
/// again every [`UNBLOCK_RETRY`] until an unblock lands or the reply comes (see [`unblock`]).
async fn unblocked_reply(
    shared: &Shared,
    id: i64,
    reply: &mut BoxFuture<'static, Result<(String, Vec<Fetched>)>>,
) -> Result<(String, Vec<Fetched>)> {
    loop {
        if unblock(shared, id).await {
            return reply.as_mut().await;
        }
        tokio::select! {
            r = reply.as_mut() => return r,
            () = tokio::time::sleep(UNBLOCK_RETRY) => {}
        }
    }
}

/// How often due parked messages are moved back to their queues.
const FORWARD_EVERY: Duration = Duration::from_secs(1);
/// Most parked messages moved per script call.
const FORWARD_BATCH: usize = 500;

/// Moves a recorded delivery that does not decode from `unacked` to its queue's dead-letter list,
/// byte for byte. On failure it stays unacked and comes back after the visibility timeout.
async fn dead_letter(shared: Arc<Shared>, queue: String, tag: String, score: String, raw: Vec<u8>) {
    let dead = shared.keys.dead(&queue);
    let mut conn = shared.conn.clone();
    let record: redis::RedisResult<Option<Vec<u8>>> = redis::cmd("HGET")
        .arg(shared.keys.unacked())
        .arg(&tag)
        .query_async(&mut conn)
        .await;
    let moved = match record {
        Ok(Some(record)) => {
            restore::move_record(&shared, &tag, &[score], record, raw, dead.clone()).await
        }
        Ok(None) => Ok(false),
        Err(e) => Err(e.into()),
    };
    if let Ok(true) = moved {
        restore::trim_dead(&shared, &dead).await;
    }
    if let Err(e) = moved {
        tracing::warn!(tag, error = %e, "could not dead-letter the message; it stays unacked and comes back after the visibility timeout");
    }
}

/// Reads `fetch.lua`'s flat reply: the score the messages were recorded with, and the messages.
fn parse_fetch(reply: Value, nqueues: usize) -> Result<(String, Vec<Fetched>)> {
    let items = match reply {
        Value::Array(items) => items,
        other => {
            return Err(BrokerError::malformed(format!(
                "unexpected reply from fetch.lua: {other:?}"
            )))
        }
    };
    let bad = || BrokerError::malformed("unexpected item in the reply of fetch.lua");
    let mut out = Vec::with_capacity(items.len() / 4);
    let mut it = items.into_iter();
    let score = match it.next() {
        Some(Value::BulkString(b)) => String::from_utf8(b).map_err(|_| bad())?,
        _ => return Err(bad()),
    };
    while let (Some(kind), Some(pos), Some(tag), Some(raw)) =
        (it.next(), it.next(), it.next(), it.next())
    {
        let (Value::Int(kind), Value::Int(pos)) = (kind, pos) else {
            return Err(bad());
        };
        let pos = usize::try_from(pos)
            .ok()
            .and_then(|p| p.checked_sub(1))
            .filter(|p| *p < nqueues)
            .ok_or_else(bad)?;
        let tag = match tag {
            Value::BulkString(b) => String::from_utf8(b).map_err(|_| bad())?,
            _ => return Err(bad()),
        };
        let Value::BulkString(raw) = raw else {
            return Err(bad());
        };
        out.push(Fetched {
            recorded: kind == 1,
            duplicate: kind == 2,
            pos,
            tag,
            raw,
        });
    }
    Ok((score, out))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watched_keys_are_capped_and_step_zero_first() {
        let queue_keys: Vec<[String; 5]> = (0..40)
            .map(|q| {
                let k = |s: &str| format!("q{q}{s}");
                [
                    k(""),
                    k("\x06\x163"),
                    k("\x06\x166"),
                    k("\x06\x169"),
                    k(".dead"),
                ]
            })
            .collect();
        let watched = keys_to_watch(&queue_keys, MAX_WATCHED_KEYS);
        // 40 queues would have meant 160 blocking connections per consumer.
        assert_eq!(watched.len(), MAX_WATCHED_KEYS);
        assert!(
            watched.iter().all(|k| !k.contains('\x06')),
            "step-0 keys first"
        );
        let two = keys_to_watch(&queue_keys[..2], MAX_WATCHED_KEYS);
        assert_eq!(two.len(), 8);
        assert_eq!(two[0], "q0");
        assert_eq!(two[1], "q1");
        assert!(!two.iter().any(|k| k.ends_with(".dead")));
    }
}
