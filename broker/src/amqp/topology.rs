//! Declarations, exactly as Celery declares a task queue (`celery/app/amqp.py`, `kombu/entity.py`).
//!
//! For queue `q`: a durable, non-auto-delete `direct` exchange `q`; a durable, non-exclusive,
//! non-auto-delete queue `q` with the configured arguments (`x-max-priority`, `x-queue-type`); a
//! binding of `q` to `q` with routing key `q`. RabbitMQ refuses (406 PRECONDITION_FAILED) a
//! re-declaration with other flags or arguments, so these must match what Python declares.
//!
//! Broadcast exchanges and their subscriber queues are declared as Celery declares its own, picked by
//! exchange name ([`fanout_spec`]):
//!
//! | exchange               | type   | durable | subscriber queue `x-message-ttl` / `x-expires` |
//! |------------------------|--------|---------|-----------------------------------------------|
//! | `celeryev`             | topic  | yes     | 5000 / 60000 (`event_queue_ttl`/`_expires`)   |
//! | `reply.<ns>.pidbox`    | direct | no      | 300000 / 10000 (`control_queue_ttl`/`_expires`)|
//! | `<ns>.pidbox`          | fanout | no      | 300000 / 10000 (`control_queue_ttl`/`_expires`)|
//! | anything else          | fanout | no      | none                                          |
//!
//! None of these exchanges is auto-deleted. Subscriber queues are exclusive, auto-deleted and not
//! durable, as Celery's `<node>.celery.pidbox` and `celeryev.<uuid>` queues.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, ErrorKind, ExchangeKind};

/// Declares the exchange, the queue and their binding.
pub(crate) async fn declare_task_queue(
    channel: &Channel,
    queue: &ShortString,
    arguments: &FieldTable,
) -> lapin::Result<()> {
    channel
        .exchange_declare(
            queue.clone(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                auto_delete: false,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            queue.clone(),
            QueueDeclareOptions {
                durable: true,
                exclusive: false,
                auto_delete: false,
                ..QueueDeclareOptions::default()
            },
            arguments.clone(),
        )
        .await?;
    channel
        .queue_bind(
            queue.clone(),
            queue.clone(),
            queue.clone(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
}

/// Ready messages in `queue` by a passive declare; `None` if the queue does not exist. A missing
/// queue makes the broker close the channel, so pass a channel that is not shared.
pub(crate) async fn ready_count(
    channel: &Channel,
    queue: &ShortString,
) -> lapin::Result<Option<u32>> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    match channel
        .queue_declare(queue.clone(), passive, FieldTable::default())
        .await
    {
        Ok(q) => Ok(Some(q.message_count())),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// True for the broker's 404 NOT_FOUND (a queue or exchange that does not exist).
pub(crate) fn is_not_found(e: &lapin::Error) -> bool {
    matches!(e.kind(), ErrorKind::ProtocolError(p)
        if matches!(p.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)))
}

/// True for the broker's 406 PRECONDITION_FAILED (a queue declared again with other arguments).
pub(crate) fn is_precondition_failed(e: &lapin::Error) -> bool {
    matches!(e.kind(), ErrorKind::ProtocolError(p)
        if matches!(p.kind(), AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)))
}

/// How a broadcast exchange and its subscriber queues are declared (see the module doc).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct FanoutSpec {
    pub kind: ExchangeKind,
    pub durable: bool,
    /// `x-message-ttl` of subscriber queues, in milliseconds.
    pub queue_ttl_ms: Option<i32>,
    /// `x-expires` of subscriber queues, in milliseconds.
    pub queue_expires_ms: Option<i32>,
}

/// The declaration Celery uses for `exchange` (see the table in the module doc).
pub(crate) fn fanout_spec(exchange: &str) -> FanoutSpec {
    let pidbox = exchange.ends_with(".pidbox");
    let (kind, durable) = if exchange == "celeryev" {
        (ExchangeKind::Topic, true)
    } else if pidbox && exchange.starts_with("reply.") {
        (ExchangeKind::Direct, false)
    } else {
        (ExchangeKind::Fanout, false)
    };
    let (queue_ttl_ms, queue_expires_ms) = if exchange == "celeryev" {
        (Some(5_000), Some(60_000))
    } else if pidbox {
        (Some(300_000), Some(10_000))
    } else {
        (None, None)
    };
    FanoutSpec {
        kind,
        durable,
        queue_ttl_ms,
        queue_expires_ms,
    }
}

/// Declares a broadcast exchange as [`fanout_spec`] says.
pub(crate) async fn declare_fanout_exchange(
    channel: &Channel,
    exchange: &ShortString,
    spec: &FanoutSpec,
) -> lapin::Result<()> {
    channel
        .exchange_declare(
            exchange.clone(),
            spec.kind.clone(),
            ExchangeDeclareOptions {
                durable: spec.durable,
                auto_delete: false,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
}

/// Declares the exchange, then a subscriber's exclusive, auto-deleted queue `queue` with the spec's
/// arguments, bound to it with `binding_key`.
pub(crate) async fn declare_subscriber_queue(
    channel: &Channel,
    exchange: &ShortString,
    binding_key: &ShortString,
    queue: &ShortString,
    spec: &FanoutSpec,
) -> lapin::Result<()> {
    declare_fanout_exchange(channel, exchange, spec).await?;
    let mut arguments = FieldTable::default();
    if let Some(ttl) = spec.queue_ttl_ms {
        arguments.insert("x-message-ttl".into(), AMQPValue::LongInt(ttl));
    }
    if let Some(expires) = spec.queue_expires_ms {
        arguments.insert("x-expires".into(), AMQPValue::LongInt(expires));
    }
    channel
        .queue_declare(
            queue.clone(),
            QueueDeclareOptions {
                durable: false,
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await?;
    channel
        .queue_bind(
            queue.clone(),
            exchange.clone(),
            binding_key.clone(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fanout_specs_follow_celery() {
        let pidbox = fanout_spec("celery.pidbox");
        assert_eq!(pidbox.kind, ExchangeKind::Fanout);
        assert!(!pidbox.durable);
        assert_eq!(
            (pidbox.queue_ttl_ms, pidbox.queue_expires_ms),
            (Some(300_000), Some(10_000))
        );
        let events = fanout_spec("celeryev");
        assert_eq!(events.kind, ExchangeKind::Topic);
        assert!(events.durable);
        assert_eq!(
            (events.queue_ttl_ms, events.queue_expires_ms),
            (Some(5_000), Some(60_000))
        );
        let reply = fanout_spec("reply.celery.pidbox");
        assert_eq!((reply.kind, reply.durable), (ExchangeKind::Direct, false));
        assert_eq!(fanout_spec("myapp.pidbox").kind, ExchangeKind::Fanout);
        let other = fanout_spec("anything");
        assert_eq!((other.kind, other.durable), (ExchangeKind::Fanout, false));
        assert_eq!((other.queue_ttl_ms, other.queue_expires_ms), (None, None));
    }
}
