//! The broker seam: what every transport (`memory://`, `redis://`, `amqp://`) offers.
//!
//! A [`Broker`] publishes [`Message`]s to named queues and opens [`Consumer`]s on a set of queues with a
//! prefetch window. Each consumed message is a [`Delivery`] that ends in exactly one settle: acked,
//! rejected (requeued or dropped) or parked. A delivery dropped without one is requeued by its `Drop`
//! (from a task on the current tokio runtime), so a forgotten settle cannot hold a prefetch slot or a
//! RabbitMQ channel's unacked count forever; outside a runtime it stays unacked until its consumer
//! closes (or, on Redis, until the visibility timeout), and is then delivered again. Nothing here
//! acks on its own: acking late is the caller's choice.

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::Result;
use crate::limits::Limits;
use crate::message::Message;
use crate::wait_lock::WaitLock;

/// Moved to [`crate::topic`] (the one topic matcher); kept here so the old path still works.
pub use crate::topic::binding_matches;

/// A connected transport. Cheap to share behind an `Arc`; every method may be called concurrently.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// A short name for logs: `memory`, `redis`, `amqp`.
    fn transport(&self) -> &'static str;

    /// Makes sure `queue` exists (declares it and its exchange/binding the way Celery does).
    /// Publishing and consuming call this themselves; it is idempotent and cached.
    async fn declare_queue(&self, queue: &str) -> Result<()>;

    /// Publishes one message to `queue`. Returns once the broker holds it (publisher confirm on AMQP,
    /// the reply to LPUSH on Redis).
    async fn publish(&self, queue: &str, message: &Message) -> Result<()>;

    /// Publishes many messages to `queue` in as few round trips as the transport allows. Returns once all
    /// of them are held by the broker. On error some may have been published.
    async fn publish_batch(&self, queue: &str, messages: &[Message]) -> Result<()>;

    /// The bounds this broker applies, from its URL (`max_message_size`, `max_dead_letters`): a
    /// publish over `max_message_size` fails with [`crate::BrokerError::TooLarge`].
    fn limits(&self) -> Limits {
        Limits::default()
    }

    /// Adds `message` to the dead-letter queue `queue`, which keeps at most
    /// [`Limits::max_dead_letters`] messages: the oldest are dropped (RabbitMQ: `x-max-length` with
    /// `x-overflow: drop-head`; Redis: LPUSH and LTRIM in one MULTI). The copy is stored at
    /// priority 0, so the queue is one list. Not checked against `max_message_size`: the caller
    /// keeps only the start of an oversized body.
    async fn dead_letter(&self, queue: &str, message: &Message) -> Result<()>;

    /// Starts consuming from `queues` with at most `prefetch` deliveries unacked at once (at least 1).
    async fn consume(&self, queues: &[String], prefetch: usize) -> Result<Box<dyn Consumer>>;

    /// Deletes every ready message of `queue` (not the unacked ones). Returns how many were removed.
    async fn purge(&self, queue: &str) -> Result<u64>;

    /// Number of ready messages in `queue` (all priorities).
    async fn queue_len(&self, queue: &str) -> Result<u64>;

    /// Closes connections. Outstanding consumers stop.
    async fn close(&self) -> Result<()>;

    /// Makes the consumers this broker opens from now on take turns at waiting for work with the
    /// other processes of their pool that share `lock` (see [`WaitLock`]). Transports whose idle
    /// wait wakes only one consumer per message (RabbitMQ, `memory://`) have no use for it.
    fn share_wait_lock(&self, lock: Arc<WaitLock>) {
        let _ = lock;
    }

    /// Publishes `message` on fanout exchange `exchange` with `routing_key` (Celery's remote control
    /// `celery.pidbox` uses `""`, events `celeryev` use e.g. `task.succeeded`): every current
    /// subscriber whose binding matches gets a copy; nothing is kept for absent ones. Remote-control
    /// replies go the same way to the direct exchange `reply.celery.pidbox`, keyed by the asker's oid.
    async fn broadcast(&self, exchange: &str, routing_key: &str, message: &Message) -> Result<()>;

    /// Starts receiving what is broadcast on `exchange` with a routing key matching `binding_key`
    /// (`""` for all of a plain fanout, `#`/`*` wildcards as in AMQP topics). `name` names this
    /// subscriber: on AMQP it is its exclusive, auto-deleted queue (`<node>.celery.pidbox`); on the
    /// direct reply exchange (`reply.celery.pidbox`, binding key = the asker's oid) it is the reply
    /// queue `<oid>.reply.celery.pidbox`, on every transport.
    async fn subscribe(
        &self,
        exchange: &str,
        binding_key: &str,
        name: &str,
    ) -> Result<Box<dyn Subscription>>;
}

/// Messages broadcast on a fanout exchange. Nothing is acked: a copy missed is gone.
#[async_trait]
pub trait Subscription: Send {
    /// The next message; `Ok(None)` once the subscription or its broker is closed. Connection
    /// trouble is retried inside (messages broadcast meanwhile are missed, as with Celery).
    async fn next(&mut self) -> Result<Option<Message>>;

    /// Ends the subscription and waits until what it holds on the broker is released (a Redis
    /// reply queue's binding and list). Dropping it releases them too, but in the background —
    /// which a process about to exit may never run.
    async fn close(&mut self) {}
}

/// A stream of deliveries from one or more queues.
#[async_trait]
pub trait Consumer: Send {
    /// Waits for the next delivery. It waits while `prefetch` deliveries are unacked. Returns
    /// `Ok(None)` once the consumer is closed. Connection trouble is retried inside where the transport
    /// can; an error returned here means the consumer cannot go on.
    async fn next(&mut self) -> Result<Option<Delivery>>;

    /// Changes the prefetch window (takes effect for later deliveries).
    async fn set_prefetch(&mut self, prefetch: usize) -> Result<()>;

    /// Stops consuming. Deliveries that were handed out and are still unacked go back to their queue
    /// (they will be delivered again). Acking one of them after this is harmless.
    async fn close(&mut self) -> Result<()>;
}

/// The transport-specific half of a delivery: how to ack or reject it.
#[async_trait]
pub trait AckHandle: Send + Sync + 'static {
    /// Removes the message for good.
    async fn ack(self: Box<Self>) -> Result<()>;
    /// Gives the message back to its queue (`requeue`), or drops it.
    async fn reject(self: Box<Self>, requeue: bool) -> Result<()>;
    /// Tells the broker the message is still being worked on (renews a visibility lease where the
    /// transport has one, as Redis does). A no-op elsewhere.
    async fn keep_alive(&self) -> Result<()> {
        Ok(())
    }
    /// How long the broker keeps this delivery for us without news (Redis: the visibility timeout);
    /// `None` when it keeps it as long as our connection lives. A holder renews it with
    /// [`AckHandle::keep_alive`] well within this.
    fn lease(&self) -> Option<std::time::Duration> {
        None
    }
    /// True if [`AckHandle::park`] can keep the message on the broker until `due`.
    fn can_park(&self, due: std::time::SystemTime) -> bool {
        let _ = due;
        false
    }
    /// Hands the message (delivered from `queue`) to a broker-side schedule until `due` and settles
    /// the delivery; the broker puts it back on its queue when due, or in hops towards it. Only
    /// called when [`AckHandle::can_park`] is true.
    async fn park(
        self: Box<Self>,
        message: &Message,
        queue: &str,
        due: std::time::SystemTime,
    ) -> Result<()> {
        let _ = (message, queue, due);
        Err(crate::error::BrokerError::Transport {
            transport: "broker",
            message: "this transport cannot park messages".into(),
        })
    }
}

/// One message handed to a consumer, not yet acked.
pub struct Delivery {
    /// The message as published.
    pub message: Message,
    /// The queue it came from.
    pub queue: String,
    /// True if the broker says it was delivered before.
    pub redelivered: bool,
    /// Taken by the one settle; still here when dropped means nobody settled it.
    handle: Option<Box<dyn AckHandle>>,
    /// Holds a slot of the consumer's prefetch window until this delivery is settled or dropped.
    _permit: Option<OwnedSemaphorePermit>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("queue", &self.queue)
            .field("redelivered", &self.redelivered)
            .field("task_id", &self.message.task_id())
            .finish()
    }
}

impl Delivery {
    /// Built by transports.
    pub fn new(
        message: Message,
        queue: String,
        redelivered: bool,
        handle: Box<dyn AckHandle>,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Self {
        Delivery {
            message,
            queue,
            redelivered,
            handle: Some(handle),
            _permit: permit,
        }
    }

    /// Acknowledges the message: the broker forgets it.
    pub async fn ack(mut self) -> Result<()> {
        self.settle()?.ack().await
    }

    /// Rejects the message; with `requeue` it goes back to its queue to be delivered again.
    pub async fn reject(mut self, requeue: bool) -> Result<()> {
        self.settle()?.reject(requeue).await
    }

    /// How often a holder of this delivery should renew its lease ([`Delivery::keep_alive`]): a third
    /// of the broker's lease, at least a second; `None` if it needs no renewing.
    pub fn renew_every(&self) -> Option<std::time::Duration> {
        self.handle
            .as_ref()?
            .lease()
            .map(|l| (l / 3).max(std::time::Duration::from_secs(1)))
    }

    /// True if the transport can keep this message until `due` ([`Delivery::park`]).
    pub fn can_park(&self, due: std::time::SystemTime) -> bool {
        self.handle.as_ref().is_some_and(|h| h.can_park(due))
    }

    /// Moves the message to the broker's schedule until `due`: it leaves this worker (nothing held
    /// unacked in memory) and comes back to its queue when due (on RabbitMQ, possibly in hops: a
    /// message back early is parked again).
    pub async fn park(mut self, due: std::time::SystemTime) -> Result<()> {
        let handle = self.settle()?;
        handle.park(&self.message, &self.queue, due).await
    }

    /// Renews the delivery's visibility lease (Redis); keeps a long job from being delivered twice.
    pub async fn keep_alive(&self) -> Result<()> {
        match &self.handle {
            Some(h) => h.keep_alive().await,
            None => Ok(()),
        }
    }

    /// The handle, taken for the one settle.
    fn settle(&mut self) -> Result<Box<dyn AckHandle>> {
        self.handle.take().ok_or(crate::error::BrokerError::Closed)
    }
}

impl Drop for Delivery {
    /// A delivery nobody settled goes back to its queue (see the module doc).
    fn drop(&mut self) {
        let Some(handle) = self.handle.take() else {
            return;
        };
        let id = self.message.task_id().map(str::to_owned);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                tracing::warn!(queue = self.queue, id = ?id, "a delivery was dropped without a settle; requeueing it");
                let queue = std::mem::take(&mut self.queue);
                runtime.spawn(async move {
                    if let Err(e) = handle.reject(true).await {
                        tracing::warn!(queue, id = ?id, error = %e, "could not requeue a dropped delivery; the broker will deliver it again");
                    }
                });
            }
            Err(_) => {
                tracing::warn!(queue = self.queue, id = ?id, "a delivery was dropped without a settle outside a runtime; the broker will deliver it again");
            }
        }
    }
}

/// A shared broker handle.
pub type SharedBroker = Arc<dyn Broker>;

/// A prefetch window kept on our side, for transports whose server has none (memory, Redis): at most
/// `size` deliveries unsettled at once. Each delivery holds one permit until it is acked, rejected or
/// dropped.
#[derive(Debug)]
pub struct PrefetchWindow {
    permits: Arc<Semaphore>,
    size: usize,
}

impl PrefetchWindow {
    /// A window of `size` (at least 1).
    pub fn new(size: usize) -> Self {
        let size = size.max(1);
        PrefetchWindow {
            permits: Arc::new(Semaphore::new(size)),
            size,
        }
    }

    /// The permits deliveries take.
    pub fn permits(&self) -> &Arc<Semaphore> {
        &self.permits
    }

    /// Changes the size. Growing takes effect at once; shrinking takes slots away as deliveries
    /// settle, without blocking the caller.
    pub fn resize(&mut self, size: usize) {
        let size = size.max(1);
        if size > self.size {
            self.permits.add_permits(size - self.size);
        } else if size < self.size {
            let shrink = u32::try_from(self.size - size).unwrap_or(u32::MAX);
            let permits = self.permits.clone();
            tokio::spawn(async move {
                if let Ok(p) = permits.acquire_many_owned(shrink).await {
                    p.forget();
                }
            });
        }
        self.size = size;
    }
}
