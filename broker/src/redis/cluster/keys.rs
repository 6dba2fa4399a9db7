//! The key layout of `redis+cluster://`: every key of one queue carries the hash tag `{<prefix><queue>}`,
//! so a queue's lists (one per priority step), its own ack emulation (`unacked` hash, `unacked_index`
//! sorted set, restore mutex) and its dead-letter list live in one hash slot, and every Lua script
//! the transport runs touches one slot only. Different queues hash to different slots, so queues
//! spread over the masters.
//!
//! This is a layout of our own, not kombu's: kombu keeps one global `unacked` hash, which cannot live
//! in every queue's slot. The message envelopes stored here are kombu's, byte for byte.
//!
//! [`check_single_slot`] is the guard every multi-key command of the cluster transport passes
//! through: keys in two slots are a clear error before anything is sent.

use redis::cluster_routing::Slot;

use crate::error::{BrokerError, Result};
use crate::redis::keys::{step_for, PRIORITY_STEPS, SEP};

/// Key names for one `global_keyprefix` in cluster mode.
#[derive(Debug, Clone, Default)]
pub(crate) struct ClusterKeys {
    prefix: String,
}

impl ClusterKeys {
    pub(crate) fn new(prefix: &str) -> Self {
        ClusterKeys {
            prefix: prefix.to_owned(),
        }
    }

    /// `{<prefix><queue>}`: the part every key of `queue` starts with, and its hash tag.
    fn tag(&self, queue: &str) -> String {
        format!("{{{}{queue}}}", self.prefix)
    }

    /// The list holding `queue`'s messages of `priority` (mapped to its kombu step).
    pub(crate) fn queue(&self, queue: &str, priority: i64) -> String {
        match step_for(priority) {
            0 => self.tag(queue),
            step => format!("{}{SEP}{step}", self.tag(queue)),
        }
    }

    /// The lists of every priority step of `queue`, step 0 first.
    pub(crate) fn priority_keys(&self, queue: &str) -> [String; 4] {
        PRIORITY_STEPS.map(|step| self.queue(queue, i64::from(step)))
    }

    /// `queue`'s own hash `delivery_tag -> [envelope, exchange, routing_key]` of unacked deliveries.
    pub(crate) fn unacked(&self, queue: &str) -> String {
        format!("{}.unacked", self.tag(queue))
    }

    /// `queue`'s sorted set of unacked delivery tags, scored by delivery time (unix seconds).
    pub(crate) fn unacked_index(&self, queue: &str) -> String {
        format!("{}.unacked_index", self.tag(queue))
    }

    /// The lock held while `queue`'s unacked deliveries are swept.
    pub(crate) fn unacked_mutex(&self, queue: &str) -> String {
        format!("{}.unacked_mutex", self.tag(queue))
    }

    /// Where undecodable envelopes popped from `queue` are kept.
    pub(crate) fn dead(&self, queue: &str) -> String {
        format!("{}.celerity.dead", self.tag(queue))
    }
}

/// Fails with a clear error if `keys` do not all hash to one slot: Redis Cluster runs a script, a
/// `MULTI` or a multi-key command only within one slot, and refusing here means nothing is half done.
pub fn check_single_slot<K: AsRef<[u8]>>(keys: &[K]) -> Result<()> {
    let Some(first) = keys.first() else {
        return Ok(());
    };
    let slot = Slot::for_key(first);
    match keys.iter().find(|k| Slot::for_key(k) != slot) {
        None => Ok(()),
        Some(other) => Err(cross_slot(&format!(
            "`{}` and `{}` hash to different slots",
            String::from_utf8_lossy(first.as_ref()),
            String::from_utf8_lossy(other.as_ref())
        ))),
    }
}

/// The error of an operation that would cross hash slots.
pub(crate) fn cross_slot(detail: &str) -> BrokerError {
    BrokerError::Transport {
        transport: "redis-cluster",
        message: format!(
            "refused an operation across hash slots ({detail}); on Redis Cluster one operation may \
             touch the keys of one queue only (they share the hash tag `{{queue}}`); nothing was written"
        ),
    }
}

/// A redis error as ours, with the server's `CROSSSLOT` worded as [`cross_slot`].
pub(crate) fn from_redis(e: redis::RedisError) -> BrokerError {
    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::CrossSlot) {
        return cross_slot(&e.to_string());
    }
    e.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_lives_in_one_slot() {
        let k = ClusterKeys::new("p:");
        let q = "celery";
        let mut all: Vec<String> = k.priority_keys(q).into();
        all.extend([
            k.unacked(q),
            k.unacked_index(q),
            k.unacked_mutex(q),
            k.dead(q),
        ]);
        assert_eq!(all[0], "{p:celery}");
        assert_eq!(all[1], "{p:celery}\x06\x163");
        assert_eq!(k.unacked(q), "{p:celery}.unacked");
        check_single_slot(&all).unwrap();
        // Odd names keep all their keys together too: the tag ends at the first `}`.
        for odd in ["a}b", "{x}", "}", ""] {
            let keys = [
                k.queue(odd, 0),
                k.queue(odd, 9),
                k.unacked(odd),
                k.dead(odd),
            ];
            check_single_slot(&keys).unwrap();
        }
    }

    #[test]
    fn keys_of_two_queues_are_refused_together() {
        let k = ClusterKeys::new("");
        // `a` and `b` hash to different slots.
        let e = check_single_slot(&[k.queue("a", 0), k.queue("b", 0)]).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("across hash slots"), "{text}");
        assert!(text.contains("{a}") && text.contains("{b}"), "{text}");
    }
}
