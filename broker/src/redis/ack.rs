//! Settling Redis deliveries: ack, reject, keep-alive, and the bookkeeping of what a consumer holds.
//!
//! A delivery is a record in kombu's `unacked` hash plus a score (its delivery time) in
//! `unacked_index`. Ack removes both, as kombu does, but through a script that first checks that
//! the score is still the one we wrote (`settle_many.lua`; acks sent while one call is in flight are
//! grouped into the next, see `batch`). If a visibility-timeout sweep gave the message back and another
//! worker took it again under the same delivery tag, a late ack or keep-alive from us leaves that
//! worker's delivery alone. Reject with requeue pushes the message to the back of its queue marked
//! redelivered (kombu's `restore_by_tag(leftmost=True)`); reject without requeue is an ack.
//! `keep_alive` renews the score. All of these are compare-and-swaps, so they are retried on a
//! connection error.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;

mod batch;

use super::restore::{self, unix_now, Side};
use super::scripts::SETTLE;
use super::shared::Shared;
use crate::backoff::retry_idempotent;
use crate::error::Result;
use crate::transport::AckHandle;

/// Unconfirmed renewals remembered per delivery.
const MAX_PENDING: usize = 8;

/// One delivery handed out and not settled yet.
#[derive(Debug, Clone, Default)]
struct Held {
    /// Hand-out order.
    seq: u64,
    /// Its `unacked_index` score as we last wrote it: proof that the record is still ours.
    score: String,
    /// Renewals begun so far: each `keep_alive` gets the next number.
    renewals: u64,
    /// The number of the renewal that wrote `score` (0: the hand-out).
    applied: u64,
    /// Scores renewals may have written without our seeing the reply (a dropped or still running
    /// `keep_alive`), with their numbers.
    pending: Vec<(u64, String)>,
}

impl Held {
    /// Every score the record may have if it is still ours.
    fn scores(&self) -> Vec<String> {
        let mut all = Vec::with_capacity(1 + self.pending.len());
        all.push(self.score.clone());
        all.extend(self.pending.iter().map(|(_, s)| s.clone()));
        all
    }

    /// Starts renewal to `score`: returns its number and the scores the record may have now.
    /// The new score is remembered before it is sent, in case the caller's future is dropped mid-flight.
    fn begin_renewal(&mut self, score: &str) -> (u64, Vec<String>) {
        self.renewals = self.renewals.saturating_add(1);
        let scores = self.scores();
        if self.pending.len() < MAX_PENDING {
            self.pending.push((self.renewals, score.to_owned()));
        }
        (self.renewals, scores)
    }

    /// Renewal `n` wrote `score`. Renewals can finish out of order (two `keep_alive`s in flight at
    /// once): an older one's reply must not replace the newer score Redis already holds, or the ack
    /// would no longer match and the job would be restored and run again.
    fn renewed(&mut self, n: u64, score: String) {
        if n <= self.applied {
            return;
        }
        self.score = score;
        self.applied = n;
        self.pending.retain(|(m, _)| *m > n);
    }
}

/// The deliveries a consumer handed out and that are not settled yet, shared with their handles.
pub(crate) struct Outstanding {
    shared: Arc<Shared>,
    /// Groups acks sent while another group is in flight into one script call.
    batcher: batch::AckBatcher,
    next_seq: AtomicU64,
    /// delivery tag -> what we hold.
    tags: Mutex<HashMap<String, Held>>,
}

impl Outstanding {
    pub(crate) fn new(shared: Arc<Shared>) -> Arc<Self> {
        Arc::new(Outstanding {
            batcher: batch::AckBatcher::start(shared.clone()),
            shared,
            next_seq: AtomicU64::new(0),
            tags: Mutex::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Held>> {
        self.tags.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a delivery recorded in Redis with `score`, and returns its handle.
    pub(crate) fn hand_out(self: &Arc<Self>, tag: String, score: &str) -> RedisAck {
        let held = Held {
            seq: self.next_seq.fetch_add(1, Ordering::Relaxed),
            score: score.to_owned(),
            ..Held::default()
        };
        self.lock().insert(tag.clone(), held);
        RedisAck {
            outstanding: self.clone(),
            tag,
        }
    }

    /// Takes `tag` out; `None` if it was already settled or given back by `close()`.
    fn take(&self, tag: &str) -> Option<Held> {
        self.lock().remove(tag)
    }

    fn put_back(&self, tag: &str, held: Held) {
        self.lock().insert(tag.to_owned(), held);
    }

    /// Takes every outstanding tag with its scores, last handed out first (restoring them with RPUSH
    /// in this order leaves the first one handed out at the very front of its queue).
    pub(crate) fn drain(&self) -> Vec<(String, Vec<String>)> {
        let mut all: Vec<(String, Held)> = self.lock().drain().collect();
        all.sort_by_key(|h| std::cmp::Reverse(h.1.seq));
        all.into_iter().map(|(t, h)| (t, h.scores())).collect()
    }
}

/// How a Redis delivery is settled.
pub(crate) struct RedisAck {
    outstanding: Arc<Outstanding>,
    tag: String,
}

impl RedisAck {
    /// `settle.lua`: forget the delivery (`new_score` empty) or renew it, if its score is one of
    /// `scores` (it is still ours).
    async fn settle_script(&self, scores: &[String], new_score: &str) -> Result<bool> {
        let shared = &self.outstanding.shared;
        let mut conn = shared.conn.clone();
        let mut inv = SETTLE.prepare_invoke();
        inv.key(shared.keys.unacked())
            .key(shared.keys.unacked_index())
            .arg(&self.tag)
            .arg(new_score);
        for s in scores {
            inv.arg(s);
        }
        let done: i64 = inv.invoke_async(&mut conn).await?;
        Ok(done == 1)
    }

    async fn settle(&self, requeue: bool) -> Result<()> {
        // Already settled, or given back by close(): nothing to do.
        let Some(held) = self.outstanding.take(&self.tag) else {
            return Ok(());
        };
        let scores = held.scores();
        let done = if requeue {
            let mine = [(self.tag.clone(), scores)];
            retry_idempotent(|| restore::restore_tags(&self.outstanding.shared, &mine, Side::Back))
                .await
                .map(|_| ())
        } else {
            // Retried (it is a compare-and-swap) by the batcher.
            self.outstanding
                .batcher
                .ack(&self.tag, scores)
                .await
                .map(|_| ())
        };
        if done.is_err() {
            self.outstanding.put_back(&self.tag, held);
        }
        done
    }
}

#[async_trait]
impl AckHandle for RedisAck {
    async fn ack(self: Box<Self>) -> Result<()> {
        self.settle(false).await
    }

    async fn reject(self: Box<Self>, requeue: bool) -> Result<()> {
        tracing::debug!(tag = %self.tag, requeue, "reject");
        self.settle(requeue).await
    }

    fn lease(&self) -> Option<std::time::Duration> {
        std::time::Duration::try_from_secs_f64(self.outstanding.shared.visibility_timeout).ok()
    }

    fn can_park(&self, _due: std::time::SystemTime) -> bool {
        true
    }

    /// Moves the message into `celerity.scheduled` until `due`; the consumers' forwarder puts it back.
    async fn park(
        self: Box<Self>,
        _message: &crate::message::Message,
        _queue: &str,
        due: std::time::SystemTime,
    ) -> Result<()> {
        let due = due
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let Some(held) = self.outstanding.take(&self.tag) else {
            return Ok(());
        };
        let scores = held.scores();
        let shared = &self.outstanding.shared;
        match retry_idempotent(|| restore::park_tag(shared, &self.tag, &scores, due)).await {
            Ok(_) => Ok(()),
            Err(e) => {
                self.outstanding.put_back(&self.tag, held);
                Err(e)
            }
        }
    }

    /// Renews the delivery's lease: its `unacked_index` score becomes now (if it is still ours).
    async fn keep_alive(&self) -> Result<()> {
        let renewed = format!("{:.6}", unix_now());
        let (n, scores) = {
            let mut all = self.outstanding.lock();
            let Some(h) = all.get_mut(&self.tag) else {
                return Ok(());
            };
            h.begin_renewal(&renewed)
        };
        if retry_idempotent(|| self.settle_script(&scores, &renewed)).await? {
            if let Some(h) = self.outstanding.lock().get_mut(&self.tag) {
                h.renewed(n, renewed);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(score: &str) -> Held {
        Held {
            score: score.to_owned(),
            ..Held::default()
        }
    }

    /// Two renewals in flight, the newer one's reply seen first: the record in Redis holds the newer
    /// score, and so must we (before: the older reply overwrote it, and the ack no longer matched).
    #[test]
    fn an_older_renewal_finishing_last_keeps_the_newer_score() {
        let mut h = held("1.0");
        let (a, a_scores) = h.begin_renewal("2.0");
        let (b, b_scores) = h.begin_renewal("3.0");
        assert_eq!(a_scores, ["1.0"]);
        assert_eq!(b_scores, ["1.0", "2.0"], "b may find a's score in Redis");
        h.renewed(b, "3.0".into());
        h.renewed(a, "2.0".into());
        assert_eq!(h.score, "3.0");
        assert!(h.pending.is_empty());
    }

    /// In order, each renewal replaces the score and forgets only the pending scores up to itself.
    #[test]
    fn renewals_in_order_keep_later_pending_scores() {
        let mut h = held("1.0");
        let (a, _) = h.begin_renewal("2.0");
        let (_b, _) = h.begin_renewal("3.0");
        h.renewed(a, "2.0".into());
        assert_eq!(h.score, "2.0");
        assert_eq!(
            h.scores(),
            ["2.0", "3.0"],
            "b's score may still land in Redis"
        );
    }

    /// A renewal whose future was dropped leaves its score among those an ack accepts.
    #[test]
    fn a_dropped_renewal_stays_acceptable() {
        let mut h = held("1.0");
        let _ = h.begin_renewal("2.0");
        assert_eq!(h.scores(), ["1.0", "2.0"]);
        let (c, _) = h.begin_renewal("3.0");
        h.renewed(c, "3.0".into());
        assert_eq!(h.scores(), ["3.0"]);
    }

    /// Pending scores are bounded however many renewals are dropped.
    #[test]
    fn pending_scores_are_bounded() {
        let mut h = held("1.0");
        for i in 0..100 {
            let _ = h.begin_renewal(&format!("{i}.5"));
        }
        assert_eq!(h.pending.len(), MAX_PENDING);
    }
}
