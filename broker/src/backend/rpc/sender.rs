//! The worker's side: each state of a job is published as a message to the queue the job's sender
//! named in `reply_to`, as Celery's `RPCBackend.store_result` does.
//!
//! The message goes to the default exchange (`""`) with routing key = `reply_to`, property
//! `correlation_id` = the job's correlation id, content type `application/json`, delivery mode 2
//! when `persistent` (Celery's `result_persistent`, default off: 1). The body is the result
//! document ([`TaskMeta::to_json`]).
//!
//! Publishing waits for the broker's confirm, so a job is acked only once its result is held by
//! RabbitMQ. The publish is `mandatory`: a reply queue that does not exist (its client went away
//! and the auto-delete queue went with it) comes back unrouted; Celery's publish drops such a result
//! silently, we drop it with a warning (retrying could never succeed). A state without a
//! `reply_to` (a job sent without one) has nowhere to go: dropped, as Celery does, logged at debug.

use std::sync::Arc;

use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Confirmation};

use crate::amqp::config::AmqpConfig;
use crate::amqp::connection::lapin_err;
use crate::amqp::link::{Link, LinkSlot};
use crate::amqp::table::short_string;
use crate::backend::TaskMeta;
use crate::error::{BrokerError, Result};
use crate::message::{CONTENT_ENCODING_UTF8, CONTENT_TYPE_JSON, PERSISTENT, TRANSIENT};

const MANDATORY: BasicPublishOptions = BasicPublishOptions {
    mandatory: true,
    immediate: false,
};

/// Publishes result messages on one confirm-mode channel, reopened when it dies.
pub(crate) struct Sender {
    link: LinkSlot,
    delivery_mode: u8,
}

/// One result ready to publish.
struct Reply {
    queue: ShortString,
    props: BasicProperties,
    body: Vec<u8>,
    task_id: String,
}

impl Sender {
    pub(crate) fn new(config: Arc<AmqpConfig>, persistent: bool) -> Self {
        Sender {
            link: LinkSlot::new(config, "result-sender", true),
            delivery_mode: if persistent { PERSISTENT } else { TRANSIENT },
        }
    }

    /// Connects now (so a bad URL or an unreachable RabbitMQ fails at connect time).
    pub(crate) async fn start(&self) -> Result<()> {
        self.link.get().await.map(drop)
    }

    fn reply(&self, meta: &TaskMeta) -> Result<Option<Reply>> {
        let Some(to) = meta.reply.as_ref().filter(|r| !r.queue.is_empty()) else {
            tracing::debug!(task_id = %meta.task_id, status = %meta.status,
                "rpc: the job named no reply_to; its result is not sent (as in Celery)");
            return Ok(None);
        };
        let props = BasicProperties::default()
            .with_content_type(CONTENT_TYPE_JSON.into())
            .with_content_encoding(CONTENT_ENCODING_UTF8.into())
            .with_delivery_mode(self.delivery_mode)
            .with_priority(0)
            .with_correlation_id(short_string(&to.correlation_id, "correlation_id")?);
        Ok(Some(Reply {
            queue: short_string(&to.queue, "reply_to")?,
            props,
            body: meta.to_json(),
            task_id: meta.task_id.clone(),
        }))
    }

    /// Publishes every state that has a reply address, pipelined, and waits for all confirms. On a
    /// lost connection, reconnects and publishes the whole lot once more (a client may then see a
    /// state twice, which it ignores; never none).
    pub(crate) async fn send(&self, metas: &[&TaskMeta]) -> Result<()> {
        let mut replies = Vec::with_capacity(metas.len());
        for m in metas {
            if let Some(r) = self.reply(m)? {
                replies.push(r);
            }
        }
        if replies.is_empty() {
            return Ok(());
        }
        let link = self.link.get().await?;
        match send_all(&link, &replies).await {
            Err(e) if e.is_connection() && !self.link.is_closed() => {
                tracing::warn!(error = %e, "rpc: sending results hit a lost connection; reconnecting and sending again once");
                self.link.discard(&link).await;
                let fresh = self.link.get().await?;
                send_all(&fresh, &replies).await
            }
            other => other,
        }
    }

    pub(crate) async fn close(&self) {
        self.link.close().await;
    }
}

async fn send_all(link: &Link, replies: &[Reply]) -> Result<()> {
    let mut confirms = Vec::with_capacity(replies.len());
    for r in replies {
        let confirm = link
            .channel
            .basic_publish(
                ShortString::default(),
                r.queue.clone(),
                MANDATORY,
                &r.body,
                r.props.clone(),
            )
            .await
            .map_err(lapin_err)?;
        confirms.push((r, confirm));
    }
    for (r, confirm) in confirms {
        match confirm.await.map_err(lapin_err)? {
            Confirmation::Ack(None) | Confirmation::NotRequested => {}
            Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
                tracing::warn!(task_id = %r.task_id, reply_to = %r.queue, code = returned.reply_code,
                    "rpc: the reply queue does not exist (its client is gone?); the result is dropped, as Celery drops it");
            }
            Confirmation::Nack(None) => {
                return Err(BrokerError::Transport {
                    transport: "amqp",
                    message: format!(
                        "the broker nacked the result of task {} (it could not store it)",
                        r.task_id
                    ),
                })
            }
        }
    }
    Ok(())
}
