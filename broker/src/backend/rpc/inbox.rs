//! The client's side of the reply queue, in memory: the result messages that arrived, sorted by
//! task id, and the handles waiting for them.
//!
//! Three kinds of ids, three places:
//! - *ours*: ids sent through this backend ([`Inbox::expect`]) or being waited on. Their latest
//!   state is kept until a handle reads the ready state (or forgets the id), however many there
//!   are: a result that arrives before its handle waits is never lost.
//! - *read*: ready results a handle already read, kept (the newest [`READ_CACHE`]) so reading a
//!   handle twice gives the same answer.
//! - *others*: results for ids this client neither sent nor waits on. Celery keeps at most 1,000
//!   of them (`BacklogLimitExceeded`); so do we (the URL's `backlog_limit`): past the limit the
//!   oldest is dropped with an error log, and reading a dropped id later is
//!   [`BrokerError::BacklogLimitExceeded`], never a silent PENDING or a hang.
//!
//! A ready state is never replaced by a later non-ready one (a redelivered job's STARTED after its
//! SUCCESS).

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;

use crate::backend::TaskMeta;
use crate::error::{BrokerError, Result};

/// How many already-read ready results are kept for a second read.
pub(crate) const READ_CACHE: usize = 10_000;
/// How many dropped ids are remembered (so reading one is an error rather than PENDING), per
/// result kept: the memory of a dropped id is a short string.
const DROPPED_MEMORY_FACTOR: usize = 100;

/// A bounded map that forgets its oldest entries first.
struct Fifo<V> {
    map: HashMap<String, V>,
    order: VecDeque<String>,
}

impl<V> Default for Fifo<V> {
    fn default() -> Self {
        Fifo {
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }
}

impl<V> Fifo<V> {
    /// Inserts or replaces; returns the entries pushed out past `cap`, oldest first.
    fn put(&mut self, id: String, v: V, cap: usize) -> Vec<(String, V)> {
        if self.map.insert(id.clone(), v).is_none() {
            self.order.push_back(id);
        }
        let mut out = Vec::new();
        while self.map.len() > cap {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(v) = self.map.remove(&old) {
                out.push((old, v));
            }
        }
        out
    }

    fn get(&self, id: &str) -> Option<&V> {
        self.map.get(id)
    }

    /// Removes `id` (its place in the order is skipped when it comes up).
    fn remove(&mut self, id: &str) -> Option<V> {
        let v = self.map.remove(id);
        if v.is_some() && self.order.len() > 2 * self.map.len() + 16 {
            let map = &self.map;
            self.order.retain(|k| map.contains_key(k));
        }
        v
    }
}

#[derive(Default)]
struct State {
    /// Ids of ours: the latest state (None until one arrives), watched by waiting handles.
    ours: HashMap<String, watch::Sender<Option<TaskMeta>>>,
    read: Fifo<TaskMeta>,
    others: Fifo<TaskMeta>,
    dropped: Fifo<()>,
    /// Results dropped past the limit since the last log line.
    dropped_unlogged: u64,
}

/// What [`Inbox::deliver`] did with a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivered {
    /// For an id of ours.
    Ours,
    /// Kept for an id nobody waits on (yet).
    Other,
    /// A repeat of an id already read, or an older state than the one kept: ignored.
    Stale,
}

/// The results received on one reply queue (see the module doc).
pub(crate) struct Inbox {
    state: Mutex<State>,
    /// Most results for ids not ours that are kept.
    limit: usize,
}

fn newer(old: Option<&TaskMeta>, new: &TaskMeta) -> bool {
    !matches!(old, Some(o) if o.status.is_ready() && !new.status.is_ready())
}

impl Inbox {
    pub(crate) fn new(limit: usize) -> Self {
        Inbox {
            state: Mutex::default(),
            limit: limit.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks ids as ours (sent through this backend): their results are kept until read.
    pub(crate) fn expect<'a>(&self, ids: impl IntoIterator<Item = &'a str>) {
        let mut st = self.lock();
        for id in ids {
            Self::adopt(&mut st, id);
        }
    }

    /// Makes `id` ours, taking over a result already kept for it as another's; returns its slot.
    fn adopt(st: &mut State, id: &str) -> watch::Sender<Option<TaskMeta>> {
        if let Some(tx) = st.ours.get(id) {
            return tx.clone();
        }
        let early = st.others.remove(id);
        let tx = watch::Sender::new(early);
        st.ours.insert(id.to_owned(), tx.clone());
        tx
    }

    /// Files a result that arrived for `id`.
    pub(crate) fn deliver(&self, id: &str, meta: TaskMeta) -> Delivered {
        let mut st = self.lock();
        if let Some(tx) = st.ours.get(id) {
            let mut changed = false;
            tx.send_if_modified(|slot| {
                changed = newer(slot.as_ref(), &meta);
                if changed {
                    *slot = Some(meta);
                }
                changed
            });
            return if changed {
                Delivered::Ours
            } else {
                Delivered::Stale
            };
        }
        if st.read.get(id).is_some() {
            return Delivered::Stale;
        }
        if !newer(st.others.get(id), &meta) {
            return Delivered::Stale;
        }
        let limit = self.limit;
        let pushed_out = st.others.put(id.to_owned(), meta, limit);
        for (old, _) in pushed_out {
            st.dropped_unlogged += 1;
            if st.dropped_unlogged == 1 || st.dropped_unlogged.is_multiple_of(1000) {
                tracing::error!(
                    task_id = %old,
                    dropped = st.dropped_unlogged,
                    limit,
                    "rpc:// reply queue: more results for tasks this client is not waiting on than \
                     `backlog_limit` keeps (Celery's BacklogLimitExceeded); dropping the oldest"
                );
            }
            st.dropped
                .put(old, (), limit.saturating_mul(DROPPED_MEMORY_FACTOR));
        }
        Delivered::Other
    }

    /// The latest state known for `id`, without waiting: PENDING when nothing arrived.
    pub(crate) fn get(&self, id: &str) -> Result<TaskMeta> {
        let st = self.lock();
        if let Some(tx) = st.ours.get(id) {
            if let Some(m) = tx.borrow().as_ref() {
                return Ok(m.clone());
            }
        } else if let Some(m) = st.read.get(id).or_else(|| st.others.get(id)) {
            return Ok(m.clone());
        } else if st.dropped.get(id).is_some() {
            return Err(self.dropped(id));
        }
        Ok(TaskMeta::pending(id))
    }

    fn dropped(&self, id: &str) -> BrokerError {
        BrokerError::BacklogLimitExceeded {
            task_id: id.to_owned(),
            limit: self.limit,
        }
    }

    /// Waits until `id` is in a ready state; `None` waits forever. The id becomes ours while waited
    /// on; once read, its result moves to the read cache.
    pub(crate) async fn wait(&self, id: &str, timeout: Option<Duration>) -> Result<TaskMeta> {
        let mut rx = {
            let mut st = self.lock();
            if let Some(m) = st.read.get(id) {
                if m.status.is_ready() {
                    return Ok(m.clone());
                }
            }
            if !st.ours.contains_key(id) && st.dropped.get(id).is_some() {
                return Err(self.dropped(id));
            }
            Self::adopt(&mut st, id).subscribe()
        };
        let ready = |m: &Option<TaskMeta>| m.as_ref().is_some_and(|m| m.status.is_ready());
        let waited = async {
            match rx.wait_for(ready).await {
                Ok(m) => m.clone().ok_or(BrokerError::Closed),
                // The id was forgotten while we waited.
                Err(_) => Err(BrokerError::Closed),
            }
        };
        let meta = match timeout {
            None => waited.await?,
            Some(t) => tokio::time::timeout(t, waited)
                .await
                .map_err(|_| BrokerError::Timeout(t))??,
        };
        let mut st = self.lock();
        st.ours.remove(id);
        st.read.put(id.to_owned(), meta.clone(), READ_CACHE);
        Ok(meta)
    }

    /// Forgets everything about `id` (a waiting handle gets [`BrokerError::Closed`]).
    pub(crate) fn forget(&self, id: &str) {
        let mut st = self.lock();
        st.ours.remove(id);
        st.read.remove(id);
        st.others.remove(id);
        st.dropped.remove(id);
    }

    /// Ids of ours whose result has not been read yet (for tests and logs).
    #[cfg(test)]
    pub(crate) fn ours(&self) -> usize {
        self.lock().ours.len()
    }

    /// Ids dropped past the limit that are still remembered.
    #[cfg(test)]
    fn dropped_count(&self) -> usize {
        self.lock().dropped.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::State;
    use serde_json::json;

    fn ok(id: &str, v: i64) -> TaskMeta {
        TaskMeta::success(id, json!(v))
    }

    #[tokio::test]
    async fn a_result_that_arrives_before_the_wait_is_kept() {
        let inbox = Inbox::new(2);
        inbox.expect(["a"]);
        // Many results for others push out only others, never ours.
        for i in 0..10 {
            inbox.deliver(&format!("o{i}"), ok("x", i));
        }
        assert_eq!(inbox.deliver("a", ok("a", 1)), Delivered::Ours);
        let m = inbox.wait("a", Some(Duration::from_secs(1))).await.unwrap();
        assert_eq!(m.result, json!(1));
        // A second read gives the same; the id has moved to the read cache.
        assert_eq!(inbox.get("a").unwrap().result, json!(1));
        assert_eq!(inbox.wait("a", None).await.unwrap().result, json!(1));
        assert_eq!(inbox.ours(), 0);
        // A late duplicate is ignored.
        assert_eq!(inbox.deliver("a", ok("a", 2)), Delivered::Stale);
    }

    #[tokio::test]
    async fn others_past_the_limit_are_dropped_with_a_clear_error() {
        let inbox = Inbox::new(3);
        for i in 0..5 {
            assert_eq!(
                inbox.deliver(&format!("o{i}"), ok("x", i)),
                Delivered::Other
            );
        }
        assert_eq!(inbox.dropped_count(), 2);
        for id in ["o0", "o1"] {
            let e = inbox.get(id).unwrap_err();
            assert!(
                matches!(e, BrokerError::BacklogLimitExceeded { limit: 3, .. }),
                "{e}"
            );
            assert!(inbox
                .wait(id, Some(Duration::from_millis(10)))
                .await
                .is_err());
        }
        // The newest are kept and can be waited for (an id waited on becomes ours).
        assert_eq!(inbox.wait("o4", None).await.unwrap().result, json!(4));
        assert_eq!(inbox.get("nobody").unwrap().status, State::Pending);
    }

    #[tokio::test]
    async fn a_ready_state_is_not_replaced_by_a_late_started() {
        let inbox = Inbox::new(10);
        inbox.expect(["a"]);
        let started = TaskMeta::with_state("a", State::Started, json!(null));
        assert_eq!(inbox.deliver("a", started.clone()), Delivered::Ours);
        assert_eq!(inbox.get("a").unwrap().status, State::Started);
        inbox.deliver("a", ok("a", 5));
        assert_eq!(inbox.deliver("a", started), Delivered::Stale);
        assert_eq!(inbox.get("a").unwrap().status, State::Success);
    }

    #[tokio::test]
    async fn waiting_times_out_and_forget_wakes_the_waiter() {
        let inbox = std::sync::Arc::new(Inbox::new(10));
        let e = inbox
            .wait("a", Some(Duration::from_millis(20)))
            .await
            .unwrap_err();
        assert!(matches!(e, BrokerError::Timeout(_)));
        let waiter = {
            let inbox = inbox.clone();
            tokio::spawn(async move { inbox.wait("b", None).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        inbox.forget("b");
        let r = tokio::time::timeout(Duration::from_secs(2), waiter).await;
        assert!(matches!(r, Ok(Ok(Err(BrokerError::Closed)))));
    }
}
