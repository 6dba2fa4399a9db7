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

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, ExchangeKind};

/// Hop lengths in seconds, longest first.
pub(crate) const LEVELS: [u64; 5] = [3600, 300, 60, 10, 1];

/// The exchange and queue of a delay level.
pub(crate) fn level_name(seconds: u64) -> String {
    format!("celerity.delay.{seconds}")
}

/// The longest hop that does not pass a wait of `remaining` seconds; `None` under a second.
pub(crate) fn hop_for(remaining_secs: f64) -> Option<u64> {
    LEVELS.iter().copied().find(|l| *l as f64 <= remaining_secs)
}

/// Declares a level's exchange, queue and binding (idempotent).
pub(crate) async fn declare_level(channel: &Channel, seconds: u64) -> lapin::Result<()> {
    let name = ShortString::from(level_name(seconds));
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
    let mut args = FieldTable::default();
    args.insert(
        "x-message-ttl".into(),
        AMQPValue::LongLongInt((seconds * 1000) as i64),
    );
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    channel
        .queue_declare(
            name.clone(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
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
}
