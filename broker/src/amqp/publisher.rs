//! The shared publishing side: one connection and one confirm-mode channel for every producer of an
//! [`AmqpBroker`](super::AmqpBroker), opened lazily and replaced when it dies.
//!
//! Publishes go to the default exchange `""` with routing key = queue name (what Celery does for
//! direct queues) and return after the broker's confirm. They are `mandatory`: a message the broker
//! cannot route (its queue was deleted after we declared it) comes back as a `basic.return` before
//! the confirm, and the publish fails with [`BrokerError::Unroutable`] instead of being confirmed and
//! dropped; the queue is then declared again by the next publish. A batch is pipelined: every message is put
//! on the wire before any confirm is awaited. An operation that fails because the connection went
//! away reconnects and is retried once; for a batch only the messages without a confirm are resent
//! (so a message may be stored twice, never lost silently). Declared queues are remembered per
//! connection so publishing does not redeclare every time.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, QueuePurgeOptions};
use lapin::types::{AMQPValue, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, PublisherConfirm};

use super::config::AmqpConfig;
use super::connection::lapin_err;
use super::link::{Link, LinkSlot};
use super::props::to_properties;
use super::table::short_string;
use super::topology::{declare_task_queue, is_not_found, is_precondition_failed, ready_count};
use crate::error::{BrokerError, Result};
use crate::message::Message;

/// How many publishes are started before the oldest sends are awaited (bounds memory in a batch).
const SEND_WINDOW: usize = 1024;
/// Bound on closing a connection or channel we are done with.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) struct Publisher {
    config: Arc<AmqpConfig>,
    link: LinkSlot,
    /// Set once the warning that the dead-letter queue is unbounded was logged.
    warned_unbounded: AtomicBool,
}

/// Publish options: `mandatory`, so an unroutable message comes back instead of being dropped.
const MANDATORY: BasicPublishOptions = BasicPublishOptions {
    mandatory: true,
    immediate: false,
};

/// What a confirm says about a publish to `queue`.
fn confirmed(c: Confirmation, queue: &str) -> Result<()> {
    match c {
        Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
            Err(BrokerError::Unroutable {
                queue: queue.to_owned(),
                reason: format!("{} {}", returned.reply_code, returned.reply_text),
            })
        }
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        Confirmation::Nack(None) => Err(BrokerError::Nacked {
            queue: queue.to_owned(),
        }),
    }
}

/// After a failed publish to `name` on `link`: an unroutable message means `name` is gone, so it is
/// declared again next time.
fn forget_if_unroutable<T>(link: &Link, name: &str, outcome: Result<T>) -> Result<T> {
    if let Err(BrokerError::Unroutable { .. }) = &outcome {
        link.forget_declared(name);
    }
    outcome
}

impl Publisher {
    pub fn new(config: Arc<AmqpConfig>) -> Self {
        Publisher {
            link: LinkSlot::new(config.clone(), "publisher", true),
            config,
            warned_unbounded: AtomicBool::new(false),
        }
    }

    /// Connects now (so a bad URL or an unreachable broker fails at connect time).
    pub async fn start(&self) -> Result<()> {
        self.link.get().await.map(drop)
    }

    /// Runs `op` on the current link; on a connection error, reconnects and runs it once more.
    async fn retry_once<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T>
    where
        F: FnMut(Arc<Link>) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let link = self.link.get().await?;
        match op(link.clone()).await {
            Err(e) if e.is_connection() && !self.link.is_closed() => {
                tracing::warn!(error = %e, "amqp: {what} hit a lost connection; reconnecting and retrying once");
                self.link.discard(&link).await;
                op(self.link.get().await?).await
            }
            Err(e @ BrokerError::Nacked { .. }) if !self.link.is_closed() => {
                tracing::warn!(error = %e, "amqp: {what} was nacked; retrying once on a new channel");
                self.link.renew_channel(&link).await;
                op(self.link.get().await?).await
            }
            other => other,
        }
    }

    async fn ensure_declared(&self, link: &Link, queue: &ShortString) -> Result<()> {
        if link.is_declared(queue.as_str()) {
            return Ok(());
        }
        declare_task_queue(&link.channel, queue, &self.config.queue_args)
            .await
            .map_err(lapin_err)?;
        link.mark_declared(queue.as_str());
        Ok(())
    }

    pub async fn declare(&self, queue: &str) -> Result<()> {
        let name = short_string(queue, "queue name")?;
        self.retry_once("declare", |link| {
            let name = &name;
            async move { self.ensure_declared(&link, name).await }
        })
        .await
    }

    pub async fn publish(&self, queue: &str, message: &Message) -> Result<()> {
        self.config.limits.check_publish(queue, message)?;
        let name = short_string(queue, "queue name")?;
        let props = to_properties(message)?;
        self.retry_once("publish", |link| {
            let (name, props) = (&name, &props);
            async move {
                self.ensure_declared(&link, name).await?;
                send_one(&link, name, &message.body, props).await
            }
        })
        .await
    }

    /// Publishes `message` to the dead-letter queue `queue`, declared bounded (see
    /// [`Publisher::ensure_bounded`]), at priority 0.
    pub async fn dead_letter(&self, queue: &str, message: &Message) -> Result<()> {
        let name = short_string(queue, "queue name")?;
        let mut kept = message.clone();
        kept.properties.priority = 0;
        let props = to_properties(&kept)?;
        self.retry_once("dead-letter", |link| {
            let (name, props, body) = (&name, &props, &kept.body);
            async move {
                self.ensure_bounded(&link, name).await?;
                send_one(&link, name, body, props).await
            }
        })
        .await
    }

    /// Declares dead-letter queue `queue` with `x-max-length` = `max_dead_letters` and
    /// `x-overflow: drop-head` (the oldest go), on a channel of its own. A queue that already exists
    /// with other arguments makes RabbitMQ refuse (406 PRECONDITION_FAILED, closing that channel):
    /// it is then used as it is, after a passive declare, with one warning that it is unbounded.
    async fn ensure_bounded(&self, link: &Link, queue: &ShortString) -> Result<()> {
        if link.is_declared(queue.as_str()) {
            return Ok(());
        }
        let mut args = self.config.queue_args.clone();
        let keep = i32::try_from(self.config.limits.max_dead_letters).unwrap_or(i32::MAX);
        args.insert(ShortString::from("x-max-length"), AMQPValue::LongInt(keep));
        args.insert(
            ShortString::from("x-overflow"),
            AMQPValue::LongString("drop-head".into()),
        );
        let channel = link.conn.create_channel().await.map_err(lapin_err)?;
        let declared = declare_task_queue(&channel, queue, &args).await;
        close_quietly(&channel).await;
        match declared {
            Ok(()) => {}
            Err(e) if is_precondition_failed(&e) => {
                let channel = link.conn.create_channel().await.map_err(lapin_err)?;
                let exists = ready_count(&channel, queue).await;
                close_quietly(&channel).await;
                if exists.map_err(lapin_err)?.is_none() {
                    return Err(lapin_err(e));
                }
                if !self.warned_unbounded.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        queue = queue.as_str(),
                        max_dead_letters = keep,
                        "amqp: the dead-letter queue already exists with other arguments (declared before it was \
                         bounded?); using it as it is, UNBOUNDED: delete it, or pick another with \
                         --dead-letter-queue, to have it declared with x-max-length"
                    );
                }
            }
            Err(e) => return Err(lapin_err(e)),
        }
        link.mark_declared(queue.as_str());
        Ok(())
    }

    pub async fn publish_batch(&self, queue: &str, messages: &[Message]) -> Result<()> {
        if messages.is_empty() {
            return Ok(());
        }
        for m in messages {
            self.config.limits.check_publish(queue, m)?;
        }
        let name = short_string(queue, "queue name")?;
        let props = messages
            .iter()
            .map(to_properties)
            .collect::<Result<Vec<_>>>()?;
        let mut todo: Vec<usize> = (0..messages.len()).collect();
        let mut retried = false;
        loop {
            let link = self.link.get().await?;
            let outcome = match self.ensure_declared(&link, &name).await {
                Ok(()) => send_all(&link.channel, &name, messages, &props, &todo).await,
                Err(e) => Err((todo.clone(), e)),
            };
            if let Err((_, BrokerError::Unroutable { .. })) = &outcome {
                link.forget_declared(name.as_str());
            }
            match outcome {
                Ok(()) => return Ok(()),
                Err((failed, e)) if e.is_connection() && !retried && !self.link.is_closed() => {
                    tracing::warn!(error = %e, unconfirmed = failed.len(), "amqp: batch publish hit a lost connection; reconnecting and resending the unconfirmed messages once");
                    self.link.discard(&link).await;
                    todo = failed;
                    retried = true;
                }
                Err((failed, e @ BrokerError::Nacked { .. }))
                    if !retried && !self.link.is_closed() =>
                {
                    tracing::warn!(error = %e, unconfirmed = failed.len(), "amqp: batch publish was nacked; resending the unconfirmed messages once on a new channel");
                    self.link.renew_channel(&link).await;
                    todo = failed;
                    retried = true;
                }
                Err((_, e)) => return Err(e),
            }
        }
    }

    /// Publishes `message` to delay level `seconds` (see `delay`), to come back to `queue` when the
    /// hop is over. Returns once the broker holds it.
    pub async fn publish_delayed(
        &self,
        queue: &str,
        message: &Message,
        seconds: u64,
    ) -> Result<()> {
        let rk = short_string(queue, "queue name")?;
        let level = super::delay::level_name(seconds, self.config.quorum);
        let exchange = short_string(&level, "delay exchange")?;
        // The hop's own lifetime is the queue's; a per-message `expiration` would cut it short.
        let mut hop = message.clone();
        hop.properties.expiration = None;
        let props = to_properties(&hop)?;
        self.retry_once("park", |link| {
            let (rk, exchange, props, level) = (&rk, &exchange, &props, &level);
            let body = &message.body;
            async move {
                if !link.is_declared(level) {
                    super::delay::declare_level(&link.channel, seconds, self.config.quorum)
                        .await
                        .map_err(lapin_err)?;
                    link.mark_declared(level);
                }
                let confirm = link
                    .channel
                    .basic_publish(exchange.clone(), rk.clone(), MANDATORY, body, props.clone())
                    .await
                    .map_err(lapin_err)?;
                // Unroutable here means the level's queue is gone: declare the level again next time.
                let c = confirm.await.map_err(lapin_err)?;
                forget_if_unroutable(&link, level, confirmed(c, level))
            }
        })
        .await
    }

    /// Ready messages removed from `queue` (0 if it does not exist).
    pub async fn purge(&self, queue: &str) -> Result<u64> {
        let name = short_string(queue, "queue name")?;
        self.retry_once("purge", |link| {
            let name = &name;
            async move {
                let channel = link.conn.create_channel().await.map_err(lapin_err)?;
                let res = channel
                    .queue_purge(name.clone(), QueuePurgeOptions::default())
                    .await;
                close_quietly(&channel).await;
                match res {
                    Ok(n) => Ok(u64::from(n)),
                    Err(e) if is_not_found(&e) => Ok(0),
                    Err(e) => Err(lapin_err(e)),
                }
            }
        })
        .await
    }

    /// Ready messages in `queue` (0 if it does not exist).
    pub async fn queue_len(&self, queue: &str) -> Result<u64> {
        let name = short_string(queue, "queue name")?;
        self.retry_once("queue_len", |link| {
            let name = &name;
            async move {
                let channel = link.conn.create_channel().await.map_err(lapin_err)?;
                let res = ready_count(&channel, name).await;
                close_quietly(&channel).await;
                Ok(u64::from(res.map_err(lapin_err)?.unwrap_or(0)))
            }
        })
        .await
    }

    pub async fn close(&self) {
        self.link.close().await;
    }
}

/// Publishes one message to `queue` through the default exchange and waits for its confirm.
async fn send_one(
    link: &Link,
    queue: &ShortString,
    body: &[u8],
    props: &BasicProperties,
) -> Result<()> {
    let confirm = link
        .channel
        .basic_publish(
            ShortString::default(),
            queue.clone(),
            MANDATORY,
            body,
            props.clone(),
        )
        .await
        .map_err(lapin_err)?;
    let c = confirm.await.map_err(lapin_err)?;
    forget_if_unroutable(link, queue.as_str(), confirmed(c, queue.as_str()))
}

/// Closes a short-lived channel if the broker has not already closed it.
async fn close_quietly(channel: &Channel) {
    if channel.status().connected() {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, channel.close(200, "OK".into())).await;
    }
}

type SendFuture<'a> = Pin<Box<dyn Future<Output = lapin::Result<PublisherConfirm>> + Send + 'a>>;

/// Publishes `messages[i]` for every `i` in `todo`, in that order, then awaits all confirms. On failure
/// returns the indices that were not confirmed and the first error.
async fn send_all(
    channel: &Channel,
    queue: &ShortString,
    messages: &[Message],
    props: &[BasicProperties],
    todo: &[usize],
) -> std::result::Result<(), (Vec<usize>, BrokerError)> {
    let mut confirms: Vec<(usize, PublisherConfirm)> = Vec::with_capacity(todo.len());
    let mut failed: Vec<usize> = Vec::new();
    let mut first_err: Option<BrokerError> = None;
    for chunk in todo.chunks(SEND_WINDOW) {
        let mut sends: Vec<(usize, SendFuture<'_>)> = Vec::with_capacity(chunk.len());
        for &i in chunk {
            let mut send: SendFuture<'_> = Box::pin(channel.basic_publish(
                ShortString::default(),
                queue.clone(),
                MANDATORY,
                &messages[i].body,
                props[i].clone(),
            ));
            // The first poll queues the frames, so the wire order is the order of `todo`.
            if let Poll::Ready(r) =
                std::future::poll_fn(|cx| Poll::Ready(send.as_mut().poll(cx))).await
            {
                send = Box::pin(std::future::ready(r));
            }
            sends.push((i, send));
        }
        for (i, send) in sends {
            match send.await {
                Ok(confirm) => confirms.push((i, confirm)),
                Err(e) => {
                    failed.push(i);
                    first_err.get_or_insert(lapin_err(e));
                }
            }
        }
    }
    for (i, confirm) in confirms {
        match confirm
            .await
            .map_err(lapin_err)
            .and_then(|c| confirmed(c, queue.as_str()))
        {
            Ok(()) => {}
            Err(e) => {
                failed.push(i);
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        None => Ok(()),
        Some(e) => {
            failed.sort_unstable();
            Err((failed, e))
        }
    }
}
