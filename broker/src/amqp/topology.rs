//! Declarations, exactly as Celery declares a task queue (`celery/app/amqp.py`, `kombu/entity.py`).
//!
//! For queue `q`: a durable, non-auto-delete `direct` exchange `q`; a durable, non-exclusive,
//! non-auto-delete queue `q` with the configured arguments (`x-max-priority`, `x-queue-type`); a
//! binding of `q` to `q` with routing key `q`. RabbitMQ refuses (406 PRECONDITION_FAILED) a
//! re-declaration with other flags or arguments, so these must match what Python declares.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{FieldTable, ShortString};
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
