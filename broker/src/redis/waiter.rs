//! Waiting for work while a consumer is idle: low latency, no busy poll, and nothing taken.
//!
//! Redis has no "block until this list is non-empty" command, but `BLMOVE k k RIGHT RIGHT <timeout>`
//! is one in effect: it blocks until `k` has an element, then pops it from the right and pushes it
//! back on the right of the same list. The list is unchanged and the message never leaves it, so a
//! waiter that dies holds nothing. Redis also serves every client blocked on the key, in order (the list
//! stays non-empty), so Python workers blocked in `BRPOP` still get their share.
//!
//! [`Waiters`] keeps one such wait per priority key of the consumer's queues, each on its own
//! connection (a blocking command occupies its connection). The waits are futures owned by the
//! consumer, not tasks: they are only polled inside [`Waiters::wait`], and a key is only re-armed
//! there, so an idle consumer blocks on every key while a busy one sends nothing new. A wait that
//! was in flight when the consumer got busy stays in flight; if its key gets a message meanwhile, the
//! next `wait` returns at once and the consumer fetches again. Waits time out after [`BLOCK_SECS`] and
//! are re-armed while the consumer is still waiting. After a connection error a key's wait
//! reconnects after a backoff.
//!
//! The consumer's first key (the step-0 list of its first queue, where messages without a priority
//! go) is not among them: the consumer waits on it itself, with its fetch queued behind the wait on
//! the same connection (see the consumer's module doc). [`connect_blocking`] opens that connection.

use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, StreamExt as _};
use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;

use super::sentinel::Dialer;
use super::shared::CONNECT_TIMEOUT;
use crate::backoff::Backoff;

/// How long one blocking wait lasts before it is re-issued.
pub(super) const BLOCK_SECS: f64 = 1.0;

/// What one blocking wait saw.
enum Outcome {
    /// The key has at least one message.
    Arrived,
    /// The wait timed out: the key stayed empty.
    Empty,
    /// The connection failed (it is dropped; the next wait reconnects after a backoff).
    Failed(redis::RedisError),
}

/// A finished wait: the key's index, its connection if still usable, and what it saw.
type Finished = (usize, Option<MultiplexedConnection>, Outcome);

/// The blocking waits of one consumer (see the module doc). Dropping it cancels them.
pub(crate) struct Waiters {
    client: Dialer,
    keys: Vec<String>,
    /// Idle connections, per key (taken while the key's wait is in flight).
    conns: Vec<Option<MultiplexedConnection>>,
    /// Whether each key has a wait in flight.
    armed: Vec<bool>,
    backoff: Vec<Backoff>,
    /// Delay before the next connection attempt, per key (after a failure).
    retry_in: Vec<Option<Duration>>,
    inflight: FuturesUnordered<BoxFuture<'static, Finished>>,
}

impl Waiters {
    /// Waiters on `keys` (nothing is sent until the first [`Waiters::wait`]).
    pub(crate) fn new(client: &Dialer, keys: Vec<String>) -> Self {
        let n = keys.len();
        Waiters {
            client: client.clone(),
            keys,
            conns: (0..n).map(|_| None).collect(),
            armed: vec![false; n],
            backoff: (0..n).map(|_| Backoff::default()).collect(),
            retry_in: vec![None; n],
            inflight: FuturesUnordered::new(),
        }
    }

    /// Waits until a message may have arrived on one of the keys (true), or for at most `limit`
    /// (false). A lost connection counts as a wake-up: the consumer should look for itself.
    /// Cancel-safe: waits in flight are kept for the next call.
    pub(crate) async fn wait(&mut self, limit: Duration) -> bool {
        for i in 0..self.keys.len() {
            self.arm(i);
        }
        let deadline = tokio::time::sleep(limit);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                finished = self.inflight.next() => {
                    let Some((i, conn, outcome)) = finished else {
                        // Nothing in flight (no keys): wait out the limit.
                        deadline.as_mut().await;
                        return false;
                    };
                    self.armed[i] = false;
                    self.conns[i] = conn;
                    match outcome {
                        Outcome::Arrived => {
                            self.backoff[i].reset();
                            return true;
                        }
                        Outcome::Empty => self.backoff[i].reset(),
                        Outcome::Failed(e) => {
                            let delay = self.backoff[i].next();
                            tracing::warn!(error = %e, retry_in = ?delay, "redis waiter lost its connection");
                            self.retry_in[i] = Some(delay);
                            // Let the consumer look for itself meanwhile.
                            return true;
                        }
                    }
                    self.arm(i);
                }
                () = &mut deadline => return false,
            }
        }
    }

    /// Starts a wait on key `i` unless one is in flight.
    fn arm(&mut self, i: usize) {
        if self.armed[i] {
            return;
        }
        self.armed[i] = true;
        let client = self.client.clone();
        let key = self.keys[i].clone();
        let conn = self.conns[i].take();
        let retry_in = self.retry_in[i].take();
        self.inflight.push(Box::pin(async move {
            if let Some(delay) = retry_in {
                tokio::time::sleep(delay).await;
            }
            let mut conn = match conn {
                Some(c) => c,
                None => match connect(&client).await {
                    Ok(c) => c,
                    Err(e) => return (i, None, Outcome::Failed(e)),
                },
            };
            let moved: redis::RedisResult<Option<Vec<u8>>> = redis::cmd("BLMOVE")
                .arg(&key)
                .arg(&key)
                .arg("RIGHT")
                .arg("RIGHT")
                .arg(BLOCK_SECS)
                .query_async(&mut conn)
                .await;
            match moved {
                Ok(Some(_)) => (i, Some(conn), Outcome::Arrived),
                Ok(None) => (i, Some(conn), Outcome::Empty),
                Err(e) => (i, None, Outcome::Failed(e)),
            }
        }));
    }
}

/// A connection for blocking commands, and its `CLIENT ID` (so another connection can `CLIENT
/// UNBLOCK` it).
pub(super) async fn connect_blocking(
    client: &Dialer,
) -> redis::RedisResult<(MultiplexedConnection, i64)> {
    let mut conn = connect(client).await?;
    let id: i64 = redis::cmd("CLIENT")
        .arg("ID")
        .query_async(&mut conn)
        .await?;
    Ok((conn, id))
}

async fn connect(client: &Dialer) -> redis::RedisResult<MultiplexedConnection> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(Duration::from_secs_f64(BLOCK_SECS) + CONNECT_TIMEOUT));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
}
