//! Parking messages that are not due yet on RabbitMQ, so a far-off ETA never sits unacked in a
//! worker (where RabbitMQ's `consumer_timeout` would kill the channel).
//!
//! There is one delay level per hop length in [`LEVELS`]: a durable fanout exchange
//! `celerity.delay.<seconds>` and a durable queue of the same name whose every message lives exactly
//! that long (`x-message-ttl`) and is then dead-lettered through the default exchange with the
//! routing key it was published with — the name of the task queue it came from. A parked message
//! takes the longest hop that does not pass its ETA; when it is back, the worker parks it again or,
//! once it is near, holds it. Every message of a level queue has the same lifetime, so the queue
//! stays in order and no message waits behind a longer one: a message is never early, and late only
//! by RabbitMQ's expiry granularity.
//!
//! With `queue_type=quorum` the levels are quorum queues too, named `celerity.delay.quorum.<seconds>`
//! (a queue's type cannot change, and a classic level lives on one node: in a cluster a parked job
//! would be unreachable, and after a crash of that node maybe gone, while its node is down). They
//! are declared as kombu declares Celery's native delayed delivery levels for quorum queues
//! (`kombu/transport/native_delayed_delivery.py`): `x-overflow: reject-publish` and
//! `x-dead-letter-strategy: at-least-once`, so an expired hop is removed only once its task queue
//! holds it. Celery's own levels (`celery_delayed_<n>`, a topic exchange chain) serve only queues bound
//! to topic or fanout exchanges, and Celery's task queue `q` is bound to a direct exchange: a
//! Python worker holds such an ETA task in memory, a Celerity worker parks it here.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, ExchangeKind};

/// Hop lengths in seconds, longest first.
pub(crate) const LEVELS: [u64; 5] = [3600, 300, 60, 10, 1];

/// The exchange and queue of a delay level (of quorum levels if `quorum`).
pub(crate) fn level_name(seconds: u64, quorum: bool) -> String {
    if quorum {
        format!("celerity.delay.quorum.{seconds}")
    } else {
        format!("celerity.delay.{seconds}")
    }
}

/// A level queue's arguments: the hop's lifetime, the way back, and the quorum settings.
pub(crate) fn level_args(seconds: u64, quorum: bool) -> FieldTable {
    let mut args = FieldTable::default();
    let ttl_ms = i64::try_from(seconds.saturating_mul(1000)).unwrap_or(i64::MAX);
    args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl_ms));
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    if quorum {
        for (key, value) in [
            ("x-queue-type", "quorum"),
            ("x-overflow", "reject-publish"),
            ("x-dead-letter-strategy", "at-least-once"),
        ] {
            args.insert(key.into(), AMQPValue::LongString(value.into()));
        }
    }
    args
}

/// The longest hop that does not pass a wait of `remaining` seconds; `None` under a second.
pub(crate) fn hop_for(remaining_secs: f64) -> Option<u64> {
    LEVELS.iter().copied().find(|l| *l as f64 <= remaining_secs)
}

/// Declares a level's exchange, queue and binding (idempotent).
pub(crate) async fn declare_level(
    channel: &Channel,
    seconds: u64,
    quorum: bool,
) -> lapin::Result<()> {
    let name = ShortString::from(level_name(seconds, quorum));
    channel
        .exchange_declare(
            name.clone(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            name.clone(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            level_args(seconds, quorum),
        )
        .await?;
    channel
        .queue_bind(
            name.clone(),
            name,
            ShortString::default(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hops_never_pass_the_eta() {
        assert_eq!(hop_for(7200.0), Some(3600));
        assert_eq!(hop_for(3599.0), Some(300));
        assert_eq!(hop_for(61.0), Some(60));
        assert_eq!(hop_for(10.0), Some(10));
        assert_eq!(hop_for(9.9), Some(1));
        assert_eq!(hop_for(0.5), None);
    }

    #[test]
    fn quorum_levels_are_quorum_queues_with_at_least_once_dead_lettering() {
        assert_eq!(level_name(60, false), "celerity.delay.60");
        assert_eq!(level_name(60, true), "celerity.delay.quorum.60");
        let classic = level_args(60, false);
        assert_eq!(
            classic.inner().get("x-message-ttl"),
            Some(&AMQPValue::LongLongInt(60_000))
        );
        assert!(!classic.contains_key("x-queue-type"));
        let quorum = level_args(60, true);
        let text = |k: &str| match quorum.inner().get(k) {
            Some(AMQPValue::LongString(s)) => s.to_string(),
            other => format!("{other:?}"),
        };
        assert_eq!(text("x-queue-type"), "quorum");
        assert_eq!(text("x-overflow"), "reject-publish");
        assert_eq!(text("x-dead-letter-strategy"), "at-least-once");
    }
}
