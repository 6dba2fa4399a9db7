//! Every Redis key name the transport uses, in kombu's layout, with the `global_keyprefix` applied.
//!
//! Nothing outside this module formats a key (save `cluster/keys.rs`, the `redis+cluster://` layout). The names are kombu 5.x's: queues are lists named after
//! the queue (one per priority step), bindings are sets `_kombu.binding.<exchange>`, and the ack
//! emulation uses the hash `unacked`, the sorted set `unacked_index` and the lock `unacked_mutex`.
//! Our own additions are only the dead-letter lists (`<queue>.celerity.dead`, `celerity.dead`).
//! Broadcasts use pub/sub channels named the kombu way (`/<db>.<exchange>[/<routing_key>]`).

/// kombu's separator inside priority keys and binding members (bytes 0x06 0x16).
pub(crate) const SEP: &str = "\x06\x16";

/// kombu's `priority_steps`: one list per step; step 0 is the bare queue name and is served first.
pub(crate) const PRIORITY_STEPS: [u8; 4] = [0, 3, 6, 9];

/// The step a message priority goes to: priorities are clamped to 0..=9, then rounded down to a step.
pub(crate) fn step_for(priority: i64) -> u8 {
    let p = priority.clamp(0, 9) as u8;
    PRIORITY_STEPS
        .iter()
        .copied()
        .rfind(|s| *s <= p)
        .unwrap_or(0)
}

/// The member kombu stores in a binding set: `<routing_key>␆␖<pattern>␆␖<queue>`.
pub(crate) fn binding_member(routing_key: &str, pattern: &str, queue: &str) -> String {
    format!("{routing_key}{SEP}{pattern}{SEP}{queue}")
}

/// Key names for one `global_keyprefix`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Keys {
    prefix: String,
}

impl Keys {
    pub(crate) fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.to_owned(),
        }
    }

    /// The list that holds `queue`'s messages of `priority` (mapped to its step).
    pub(crate) fn queue(&self, queue: &str, priority: i64) -> String {
        match step_for(priority) {
            0 => format!("{}{queue}", self.prefix),
            step => format!("{}{queue}{SEP}{step}", self.prefix),
        }
    }

    /// The lists of every priority step of `queue`, in serving order (step 0 first).
    pub(crate) fn priority_keys(&self, queue: &str) -> [String; 4] {
        PRIORITY_STEPS.map(|step| self.queue(queue, i64::from(step)))
    }

    /// The set of bindings of `exchange`.
    pub(crate) fn binding(&self, exchange: &str) -> String {
        format!("{}_kombu.binding.{exchange}", self.prefix)
    }

    /// The set marking `exchange`'s bindings as permanent (kombu 5.7's binding sweep keeps these).
    pub(crate) fn binding_permanent(&self, exchange: &str) -> String {
        format!("{}_kombu.binding_permanent.{exchange}", self.prefix)
    }

    /// Sorted set of exchanges whose binding table may be swept after its score (unix ms), kombu
    /// 5.7's deadline for tables that only queues with `x-expires` (reply queues) are bound in.
    pub(crate) fn binding_deadlines(&self) -> String {
        format!("{}_kombu.binding_deadlines", self.prefix)
    }

    /// Hash `delivery_tag -> [envelope, exchange, routing_key]` of delivered, unacked messages.
    pub(crate) fn unacked(&self) -> String {
        format!("{}unacked", self.prefix)
    }

    /// Sorted set `delivery_tag` scored by delivery time (unix seconds).
    pub(crate) fn unacked_index(&self) -> String {
        format!("{}unacked_index", self.prefix)
    }

    /// The lock held during a restore sweep.
    pub(crate) fn unacked_mutex(&self) -> String {
        format!("{}unacked_mutex", self.prefix)
    }

    /// Where undecodable envelopes popped from `queue` are kept (our addition; kombu has none).
    pub(crate) fn dead(&self, queue: &str) -> String {
        format!("{}{queue}.celerity.dead", self.prefix)
    }

    /// Sorted set of messages parked until they are due (`"<list>\n<envelope>"` scored by due time;
    /// our addition, so far-off ETAs wait in Redis instead of unacked in a worker).
    pub(crate) fn scheduled(&self) -> String {
        format!("{}celerity.scheduled", self.prefix)
    }

    /// Where unacked records that cannot be parsed or routed back are kept (our addition).
    pub(crate) fn dead_unroutable(&self) -> String {
        format!("{}celerity.dead", self.prefix)
    }

    /// The pub/sub channel of a broadcast on `exchange` with `routing_key` in Redis db `db`: kombu's
    /// `_get_publish_topic` with its `keyprefix_fanout` `/{db}.`, and the global prefix kombu's
    /// prefixed client puts before PUBLISH's channel (`<prefix>/0.celery.pidbox`,
    /// `<prefix>/0.celeryev/task.succeeded`).
    pub(crate) fn fanout_channel(&self, db: i64, exchange: &str, routing_key: &str) -> String {
        if routing_key.is_empty() {
            format!("{}/{db}.{exchange}", self.prefix)
        } else {
            format!("{}/{db}.{exchange}/{routing_key}", self.prefix)
        }
    }

    /// The PSUBSCRIBE pattern of a subscriber bound with `binding_key` (kombu's
    /// `_get_subscribe_topic`): the binding key with `#` turned into `*` after the exchange's
    /// channel, or the bare channel for an empty key. Unlike kombu, glob characters in the prefix and
    /// the exchange name are escaped, so they match only themselves; for ordinary names the pattern
    /// is kombu's, byte for byte.
    pub(crate) fn fanout_pattern(&self, db: i64, exchange: &str, binding_key: &str) -> String {
        let base = glob_escape(&self.fanout_channel(db, exchange, ""));
        if binding_key.is_empty() {
            base
        } else {
            format!("{base}/{}", binding_key.replace('#', "*"))
        }
    }
}

/// Escapes Redis glob characters (`*`, `?`, `[`, `]`, `\`) so a pattern matches `text` literally.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_map_to_kombu_steps() {
        let steps: Vec<u8> = (-3..=12).map(step_for).collect();
        assert_eq!(steps, [0, 0, 0, 0, 0, 0, 3, 3, 3, 6, 6, 6, 9, 9, 9, 9]);
    }

    #[test]
    fn key_names_match_kombu() {
        let k = Keys::new("p1:");
        assert_eq!(
            k.priority_keys("celery"),
            [
                "p1:celery",
                "p1:celery\x06\x163",
                "p1:celery\x06\x166",
                "p1:celery\x06\x169"
            ]
        );
        assert_eq!(k.queue("q", 5), "p1:q\x06\x163");
        assert_eq!(k.binding("celery"), "p1:_kombu.binding.celery");
        assert_eq!(
            k.binding_permanent("celery"),
            "p1:_kombu.binding_permanent.celery"
        );
        assert_eq!(k.unacked(), "p1:unacked");
        assert_eq!(k.unacked_index(), "p1:unacked_index");
        assert_eq!(k.unacked_mutex(), "p1:unacked_mutex");
        assert_eq!(k.dead("q"), "p1:q.celerity.dead");
        assert_eq!(
            binding_member("celery", "", "celery"),
            "celery\x06\x16\x06\x16celery"
        );
        assert_eq!(Keys::new("").queue("celery", 0), "celery");
    }

    #[test]
    fn fanout_channels_match_kombu() {
        let k = Keys::new("p1:");
        assert_eq!(
            k.fanout_channel(0, "celery.pidbox", ""),
            "p1:/0.celery.pidbox"
        );
        assert_eq!(
            k.fanout_channel(3, "celeryev", "task.succeeded"),
            "p1:/3.celeryev/task.succeeded"
        );
        assert_eq!(
            k.fanout_pattern(0, "celery.pidbox", ""),
            "p1:/0.celery.pidbox"
        );
        assert_eq!(k.fanout_pattern(0, "celeryev", "#"), "p1:/0.celeryev/*");
        assert_eq!(
            k.fanout_pattern(0, "celeryev", "task.#"),
            "p1:/0.celeryev/task.*"
        );
        assert_eq!(Keys::new("").fanout_pattern(1, "a*b", ""), "/1.a\\*b");
    }
}
