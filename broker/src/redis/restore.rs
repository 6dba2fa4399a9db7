//! Giving unacked messages back to their queues, the kombu way: the periodic visibility-timeout
//! sweep (`restore_visible`), and the restores done by reject-with-requeue and consumer close.
//!
//! A restore reads the `unacked` record, rewrites its envelope in Rust with `redelivered: true` in
//! `headers` and `properties.delivery_info` (kombu's `_do_restore_message`), works out the destination
//! queue(s) as kombu's `_lookup` does, and then moves the message with `scripts/restore.lua`: a
//! compare-and-swap that only acts if the record is still byte-for-byte what was read, so a message
//! acked or restored concurrently (by us or by a Python worker) is never pushed twice.
//!
//! Records that cannot be parsed, or whose exchange routes nowhere and have no routing key, go to the
//! dead-letter list `celerity.dead` (with the prefix) rather than being dropped as kombu would.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use super::redial::Redial;
use futures_util::future::join_all;

use super::envelope;
use super::keys::SEP;
use super::scripts::{FORGET_ORPHAN, FORWARD, PARK, RESTORE, UNLOCK};
use super::shared::Shared;
use crate::error::Result;
use crate::topic::topic_matches;

/// kombu's `unacked_mutex_expire` (300 s): the sweep lock is dropped by Redis after this long, or
/// after the visibility timeout if that is shorter (see [`mutex_expire_ms`]).
const MUTEX_EXPIRE_MS: u64 = 300_000;
/// Tags restored per round of a sweep.
const SWEEP_BATCH: usize = 500;
/// Rounds per sweep (bounds the time the lock is held; the next sweep goes on).
const SWEEP_ROUNDS: usize = 20;

/// Which end of the list a restored message goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    /// `RPUSH`: consumers pop from the right, so it is taken next (sweeps, close).
    Next,
    /// `LPUSH`: the back of the queue (kombu's reject with requeue).
    Back,
}

/// Unix time in seconds, as kombu's `time()`.
pub(crate) fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One step of a restore, decided after reading the records.
enum Op {
    /// The index has the tag but `unacked` has no record: drop the index entry.
    Forget { tag: String },
    /// Move the message (if its record, and score when given, are unchanged) to `dests`.
    Move {
        tag: String,
        /// Scores the caller may hold (empty: any).
        scores: Vec<String>,
        expected: Vec<u8>,
        payload: Vec<u8>,
        dests: Vec<String>,
        side: Side,
    },
}

/// kombu's `restore_visible`: under the `unacked_mutex` lock, restores every delivery older than the
/// visibility timeout. Returns how many messages were moved back (0 if another process holds the lock).
pub(crate) async fn sweep(shared: &Shared) -> Result<usize> {
    let mut conn = shared.conn.clone();
    let mutex = shared.keys.unacked_mutex();
    let Some(token) = take_mutex(shared, &mut conn).await? else {
        tracing::debug!("restore sweep skipped: another process holds the unacked_mutex");
        return Ok(0);
    };
    let result = sweep_locked(shared, &mut conn).await;
    let released: redis::RedisResult<i64> =
        UNLOCK.key(&mutex).arg(&token).invoke_async(&mut conn).await;
    if let Err(e) = released {
        tracing::warn!(error = %e, "could not release the unacked_mutex (it expires by itself)");
    }
    result
}

/// How long the sweep lock lives if its holder dies mid-sweep: kombu's 300 s, or the visibility
/// timeout if shorter. A process killed while sweeping must not stop every restore for five minutes
/// when leases lapse in seconds; a sweep that outlives its lock is still safe (every move is a
/// compare-and-swap), it may only overlap another.
fn mutex_expire_ms(visibility_timeout: f64) -> u64 {
    let visibility_ms = (visibility_timeout * 1000.0).ceil();
    if visibility_ms.is_finite() && visibility_ms >= 1.0 && visibility_ms < MUTEX_EXPIRE_MS as f64 {
        visibility_ms as u64
    } else {
        MUTEX_EXPIRE_MS
    }
}

/// Takes the `unacked_mutex` (kombu's sweep lock): its token, or `None` if another process holds it.
async fn take_mutex(shared: &Shared, conn: &mut Redial) -> Result<Option<String>> {
    let token = uuid::Uuid::new_v4().simple().to_string();
    let locked: Option<String> = redis::cmd("SET")
        .arg(shared.keys.unacked_mutex())
        .arg(&token)
        .arg("NX")
        .arg("PX")
        .arg(mutex_expire_ms(shared.visibility_timeout))
        .query_async(conn)
        .await?;
    Ok(locked.map(|_| token))
}

async fn sweep_locked(shared: &Shared, conn: &mut Redial) -> Result<usize> {
    let ceil = unix_now() - shared.visibility_timeout;
    let mut restored = 0;
    for _ in 0..SWEEP_ROUNDS {
        let tags = read_lapsed(shared, conn, ceil).await?;
        if tags.is_empty() {
            break;
        }
        restored += restore_tags(shared, &tags, Side::Next).await?;
        if tags.len() < SWEEP_BATCH {
            break;
        }
    }
    if restored > 0 {
        tracing::info!(
            restored,
            "restored unacked messages older than the visibility timeout"
        );
    }
    Ok(restored)
}

/// Up to [`SWEEP_BATCH`] deliveries whose lease lapsed before `ceil` (unix seconds), each with the
/// score read: the sweep restores a tag only if its score is still that one, so a holder that renewed
/// its lease in between keeps its delivery.
async fn read_lapsed(
    shared: &Shared,
    conn: &mut Redial,
    ceil: f64,
) -> Result<Vec<(String, Vec<String>)>> {
    let lapsed: Vec<(String, String)> = redis::cmd("ZRANGE")
        .arg(shared.keys.unacked_index())
        .arg("-inf")
        .arg(format!("{ceil:.6}"))
        .arg("BYSCORE")
        .arg("LIMIT")
        .arg(0)
        .arg(SWEEP_BATCH)
        .arg("WITHSCORES")
        .query_async(conn)
        .await?;
    Ok(lapsed
        .into_iter()
        .map(|(tag, score)| (tag, vec![score]))
        .collect())
}

/// Restores the deliveries `tags` (marked redelivered) to their queues. With scores, a tag is only
/// restored if its `unacked_index` score is one of them (the caller's own delivery). Tags with no
/// record are dropped from the index. Returns how many messages were moved back.
pub(crate) async fn restore_tags(
    shared: &Shared,
    tags: &[(String, Vec<String>)],
    side: Side,
) -> Result<usize> {
    if tags.is_empty() {
        return Ok(0);
    }
    let mut conn = shared.conn.clone();
    let records: Vec<Option<Vec<u8>>> = redis::cmd("HMGET")
        .arg(shared.keys.unacked())
        .arg(tags.iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>())
        .query_async(&mut conn)
        .await?;
    let mut bindings = HashMap::new();
    let mut ops = Vec::with_capacity(tags.len());
    for ((tag, scores), record) in tags.iter().zip(records) {
        let Some(record) = record else {
            ops.push(Op::Forget { tag: tag.clone() });
            continue;
        };
        let op = match envelope::restored(&record) {
            Ok(r) => {
                let queues =
                    destinations(shared, &r.exchange, &r.routing_key, &mut bindings).await?;
                let dests: Vec<String> = if queues.is_empty() {
                    tracing::warn!(tag, exchange = %r.exchange, "unacked message routes nowhere; moved to the dead-letter list");
                    vec![shared.keys.dead_unroutable()]
                } else {
                    queues
                        .iter()
                        .map(|q| shared.keys.queue(q, r.priority))
                        .collect()
                };
                Op::Move {
                    tag: tag.clone(),
                    scores: scores.clone(),
                    payload: r.payload,
                    expected: record,
                    dests,
                    side,
                }
            }
            Err(e) => {
                tracing::error!(tag, error = %e, "unreadable unacked record; moved to the dead-letter list");
                Op::Move {
                    tag: tag.clone(),
                    scores: scores.clone(),
                    payload: record.clone(),
                    expected: record,
                    dests: vec![shared.keys.dead_unroutable()],
                    side: Side::Back,
                }
            }
        };
        ops.push(op);
    }
    // Sent concurrently: the multiplexed connection pipelines them, in order.
    let results = join_all(ops.iter().map(|op| apply(shared, op))).await;
    let mut moved = 0;
    for r in results {
        moved += usize::from(r?);
    }
    Ok(moved)
}

/// Parks the delivery `tag` (if its score is one of `scores`) in the schedule until `due` (unix
/// seconds): its envelope, marked redelivered, goes back to its queue when due (see `forward_due`).
/// Returns false if the delivery was no longer ours or its record changed (nothing done).
pub(crate) async fn park_tag(
    shared: &Shared,
    tag: &str,
    scores: &[String],
    due: f64,
) -> Result<bool> {
    let mut conn = shared.conn.clone();
    let record: Option<Vec<u8>> = redis::cmd("HGET")
        .arg(shared.keys.unacked())
        .arg(tag)
        .query_async(&mut conn)
        .await?;
    let Some(record) = record else {
        return Ok(false);
    };
    let r = envelope::restored(&record)?;
    let queues = destinations(shared, &r.exchange, &r.routing_key, &mut HashMap::new()).await?;
    let Some(queue) = queues.first() else {
        return Err(crate::error::BrokerError::malformed(format_args!(
            "delivery {tag} routes to no queue; cannot park it"
        )));
    };
    let mut member = shared.keys.queue(queue, r.priority).into_bytes();
    member.push(b'\n');
    member.extend_from_slice(&r.payload);
    let mut inv = PARK.prepare_invoke();
    inv.key(shared.keys.unacked())
        .key(shared.keys.unacked_index())
        .key(shared.keys.scheduled());
    inv.arg(tag)
        .arg(record.as_slice())
        .arg(member.as_slice())
        .arg(format!("{due:.6}"));
    for s in scores {
        inv.arg(s);
    }
    let done: i64 = inv.invoke_async(&mut conn).await?;
    Ok(done == 1)
}

/// Moves parked messages that are due back to their queues, at most `batch` per call. Safe to run
/// from every consumer at once. Returns how many were moved.
pub(crate) async fn forward_due(shared: &Shared, batch: usize) -> Result<usize> {
    let mut conn = shared.conn.clone();
    let moved: i64 = FORWARD
        .key(shared.keys.scheduled())
        .arg(format!("{:.6}", unix_now()))
        .arg(batch)
        .invoke_async(&mut conn)
        .await?;
    Ok(usize::try_from(moved).unwrap_or(0))
}

/// Moves one recorded delivery to `dest` as it is (no redelivered flag), if its record is still
/// `expected` and its score one of `scores`. Used to dead-letter an envelope that does not decode.
pub(crate) async fn move_record(
    shared: &Shared,
    tag: &str,
    scores: &[String],
    expected: Vec<u8>,
    payload: Vec<u8>,
    dest: String,
) -> Result<bool> {
    let op = Op::Move {
        tag: tag.to_owned(),
        scores: scores.to_vec(),
        expected,
        payload,
        dests: vec![dest],
        side: Side::Back,
    };
    apply(shared, &op).await
}

async fn apply(shared: &Shared, op: &Op) -> Result<bool> {
    let mut conn = shared.conn.clone();
    let keys = &shared.keys;
    let done: i64 = match op {
        Op::Forget { tag } => {
            FORGET_ORPHAN
                .key(keys.unacked())
                .key(keys.unacked_index())
                .arg(tag)
                .invoke_async(&mut conn)
                .await?
        }
        Op::Move {
            tag,
            scores,
            expected,
            payload,
            dests,
            side,
        } => {
            let mut inv = RESTORE.prepare_invoke();
            inv.key(keys.unacked()).key(keys.unacked_index());
            for d in dests {
                inv.key(d);
            }
            inv.arg(tag)
                .arg(expected.as_slice())
                .arg(payload.as_slice())
                .arg(if *side == Side::Back { "L" } else { "R" });
            for s in scores {
                inv.arg(s);
            }
            let done: i64 = inv.invoke_async(&mut conn).await?;
            if done == 1 && dests.iter().any(|d| *d == keys.dead_unroutable()) {
                trim_dead(shared, &keys.dead_unroutable()).await;
            }
            done
        }
    };
    Ok(done == 1 && matches!(op, Op::Move { .. }))
}

/// Keeps only the newest `max_dead_letters` of dead-letter list `key` (after a push to it; not
/// atomic with the push, so the list may hold a few more for a moment). A failure is logged: the
/// next push trims it.
pub(crate) async fn trim_dead(shared: &Shared, key: &str) {
    let keep = i64::from(shared.limits.max_dead_letters);
    let mut conn = shared.conn.clone();
    let trimmed: redis::RedisResult<()> = redis::cmd("LTRIM")
        .arg(key)
        .arg(0)
        .arg(keep - 1)
        .query_async(&mut conn)
        .await;
    if let Err(e) = trimmed {
        tracing::warn!(list = key, error = %e, "could not trim the dead-letter list");
    }
}

/// kombu's `_lookup`: the anonymous exchange routes to the queue named by the routing key; a named
/// exchange to the queues of its stored bindings whose key matches (direct, or topic wildcards). If
/// nothing matches, the routing key is used as the queue name (kombu would drop the message).
async fn destinations(
    shared: &Shared,
    exchange: &str,
    routing_key: &str,
    cache: &mut HashMap<String, Vec<String>>,
) -> Result<Vec<String>> {
    if exchange.is_empty() {
        return Ok(non_empty(routing_key));
    }
    if !cache.contains_key(exchange) {
        let mut conn = shared.conn.clone();
        let members: Vec<String> = redis::cmd("SMEMBERS")
            .arg(shared.keys.binding(exchange))
            .query_async(&mut conn)
            .await?;
        cache.insert(exchange.to_owned(), members);
    }
    let members = cache.get(exchange).map_or(&[][..], Vec::as_slice);
    let mut queues: Vec<String> = Vec::new();
    for member in members {
        let mut parts = member.splitn(3, SEP);
        let (Some(key), Some(_pattern), Some(queue)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if topic_matches(key, routing_key)
            && !queue.is_empty()
            && !queues.iter().any(|q| q == queue)
        {
            queues.push(queue.to_owned());
        }
    }
    if queues.is_empty() {
        tracing::warn!(
            exchange,
            routing_key,
            "no binding matches; restoring to the queue named by the routing key"
        );
        return Ok(non_empty(routing_key));
    }
    Ok(queues)
}

fn non_empty(queue: &str) -> Vec<String> {
    if queue.is_empty() {
        Vec::new()
    } else {
        vec![queue.to_owned()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redis::RedisBroker;
    use crate::transport::Broker;
    use crate::{BrokerUrl, Message};

    /// Deletes a test's keys when it ends, also on panic.
    struct Space(String);

    impl Drop for Space {
        fn drop(&mut self) {
            let Ok(mut c) =
                redis::Client::open("redis://127.0.0.1:6379/0").and_then(|c| c.get_connection())
            else {
                return;
            };
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{}*", self.0))
                .query(&mut c)
                .unwrap_or_default();
            if !keys.is_empty() {
                let _: redis::RedisResult<()> = redis::cmd("DEL").arg(keys).query(&mut c);
            }
        }
    }

    fn message() -> Message {
        let mut m = Message::default();
        m.headers.insert("task".into(), "tests.add".into());
        m.headers.insert("id".into(), "sweep-race-1".into());
        m.body = b"[[1, 2], {}, {}]".to_vec();
        m
    }

    /// A broker on a key space of its own (visibility timeout 1 s, no periodic sweep) that published
    /// one message on `queue`, its consumer, and the delivery it took.
    async fn one_delivery(
        queue: &str,
    ) -> (
        Space,
        RedisBroker,
        Box<dyn crate::Consumer>,
        crate::Delivery,
    ) {
        let space = Space(format!("celtest:{}:", uuid::Uuid::new_v4().simple()));
        let url = format!(
            "redis://127.0.0.1:6379/0?global_keyprefix={}&visibility_timeout=1&restore_interval=3600",
            space.0
        );
        let b = RedisBroker::connect(&BrokerUrl::parse(&url).unwrap())
            .await
            .unwrap();
        b.publish(queue, &message()).await.unwrap();
        let mut c = b.consume(&[queue.to_owned()], 1).await.unwrap();
        let d = tokio::time::timeout(std::time::Duration::from_secs(10), c.next())
            .await
            .expect("no delivery in time")
            .unwrap()
            .expect("consumer closed");
        (space, b, c, d)
    }

    /// A process killed mid-sweep leaves the sweep lock behind: with a 1 s visibility timeout the
    /// next sweep must not wait kombu's 300 s for it (before: every restore stopped for five minutes;
    /// the kill fault test lost jobs past its patience).
    #[tokio::test]
    async fn a_sweep_lock_left_by_a_dead_sweeper_lapses_with_the_visibility_timeout() {
        let (_space, b, c, d) = one_delivery("dead-sweeper").await;
        // The holder of this delivery dies (its lease is not renewed); a sweeper dies holding the lock.
        std::mem::forget(d);
        let shared = &b.shared;
        let mut conn = shared.conn.clone();
        assert!(take_mutex(shared, &mut conn).await.unwrap().is_some());
        tokio::time::sleep(std::time::Duration::from_millis(1300)).await;
        assert_eq!(
            sweep(shared).await.unwrap(),
            1,
            "the lapsed delivery was restored"
        );
        drop(c);
    }

    /// The sweep reads a lapsed delivery, its holder renews the lease, then the sweep moves what it
    /// read: the delivery must stay with its holder (before, the sweep moved any tag it had read, and
    /// a job still running was handed out again).
    #[tokio::test]
    async fn a_lease_renewed_after_the_sweep_read_it_is_not_restored() {
        let (_space, b, mut c, d) = one_delivery("sweep").await;
        tokio::time::sleep(std::time::Duration::from_millis(1300)).await;

        let shared = &b.shared;
        let mut conn = shared.conn.clone();
        let lapsed = read_lapsed(shared, &mut conn, unix_now() - shared.visibility_timeout)
            .await
            .unwrap();
        assert_eq!(lapsed.len(), 1, "the lease has lapsed");
        d.keep_alive().await.unwrap();
        let moved = restore_tags(shared, &lapsed, Side::Next).await.unwrap();
        assert_eq!(moved, 0, "a renewed lease was restored");

        let queued: usize = redis::cmd("LLEN")
            .arg(shared.keys.queue("sweep", 0))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(queued, 0);
        d.ack().await.unwrap();
        let held: usize = redis::cmd("HLEN")
            .arg(shared.keys.unacked())
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(held, 0, "the holder's ack still matched");
        c.close().await.unwrap();
    }
}
