//! AMQP topic matching, the one copy: whether a routing key matches a binding key. Used by the
//! `memory://` broadcasts (subscriptions' binding keys) and by the Redis restore (kombu's `_lookup`
//! over an exchange's stored bindings).
//!
//! Words are split on `.`; `*` matches exactly one word, `#` zero or more; any other word matches
//! itself. A pattern without wildcards therefore matches only the identical key.

/// Whether `key` matches the topic `pattern` (AMQP rules; `""` matches only `""`).
pub fn topic_matches(pattern: &str, key: &str) -> bool {
    fn go(p: &[&str], k: &[&str]) -> bool {
        match p.split_first() {
            None => k.is_empty(),
            Some((&"#", rest)) => (0..=k.len()).any(|i| go(rest, &k[i..])),
            Some((&w, rest)) => k
                .split_first()
                .is_some_and(|(&kw, krest)| (w == "*" || w == kw) && go(rest, krest)),
        }
    }
    let p: Vec<&str> = pattern.split('.').collect();
    let k: Vec<&str> = key.split('.').collect();
    go(&p, &k)
}

/// Whether a broadcast with routing key `key` reaches a subscription bound with `binding`: `""`
/// (a plain fanout subscription) matches everything, anything else by [`topic_matches`].
pub fn binding_matches(binding: &str, key: &str) -> bool {
    binding.is_empty() || topic_matches(binding, key)
}

#[cfg(test)]
mod tests {
    use super::{binding_matches, topic_matches};

    #[test]
    fn topic_wildcards() {
        assert!(topic_matches("#", "a.b"));
        assert!(topic_matches("#", ""));
        assert!(topic_matches("a.*", "a.b"));
        assert!(!topic_matches("a.*", "a.b.c"));
        assert!(!topic_matches("a.*", "a"));
        assert!(topic_matches("a.#", "a"));
        assert!(topic_matches("a.#", "a.b.c"));
        assert!(topic_matches("*.b.#", "x.b.c.d"));
        assert!(topic_matches("a.#.d", "a.b.c.d"));
        assert!(!topic_matches("a.#.d", "a.b.c"));
    }

    #[test]
    fn plain_patterns_match_only_the_same_key() {
        assert!(topic_matches("a.b", "a.b"));
        assert!(!topic_matches("a.b", "a.c"));
        assert!(!topic_matches("a.b", "a.b.c"));
        assert!(topic_matches("", ""));
        assert!(
            !topic_matches("", "a"),
            "an empty binding is not a wildcard here"
        );
    }

    #[test]
    fn bindings_match_like_amqp_topics() {
        assert!(binding_matches("", "anything"));
        assert!(binding_matches("#", "task.succeeded"));
        assert!(binding_matches("task.*", "task.succeeded"));
        assert!(!binding_matches("task.*", "worker.heartbeat"));
        assert!(binding_matches("task.#", "task.a.b"));
        assert!(binding_matches("task.succeeded", "task.succeeded"));
        assert!(!binding_matches("task.succeeded", "task.failed"));
    }
}
