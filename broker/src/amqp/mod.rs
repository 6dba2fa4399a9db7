//! The `amqp://` / `amqps://` transport (RabbitMQ, through lapin), wire-compatible with Celery/kombu.
//!
//! Layout:
//! - `config`: the URL → lapin URI, timeouts, queue and consumer arguments.
//! - `connection`: connecting with a timeout, error mapping (reconnects pace with [`crate::backoff`]).
//! - `topology`: Celery's declarations (direct exchange + durable queue + binding, all named `q`).
//! - `table`, `props`: JSON headers ↔ AMQP tables, [`Message`] ↔ basic properties.
//! - `publisher`: the shared confirm-mode publishing connection (mandatory publishes: an unroutable
//!   message is an error, not a silent drop).
//! - `consumer`: consumers with their own connection, prefetch via `basic.qos`, self-reconnecting;
//!   `ack_group` settles their deliveries, finished runs as one `basic.ack(multiple)`.
//! - `fanout`: broadcasts (remote control, events): a broadcasting connection, and subscriptions with
//!   their own connection and exclusive queue, self-reconnecting.

mod ack_group;
pub(crate) mod config;
pub(crate) mod connection;
mod consumer;
mod delay;
mod fanout;
pub(crate) mod link;
pub(crate) mod props;
mod publisher;
pub(crate) mod table;
mod topology;

use std::sync::Arc;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::error::{BrokerError, Result};
use crate::limits::Limits;
use crate::message::Message;
use crate::transport::{Broker, Consumer, Subscription};
use crate::url::BrokerUrl;

use config::AmqpConfig;
use consumer::AmqpConsumer;
use publisher::Publisher;

/// A RabbitMQ broker: one shared publishing connection, plus one connection per consumer (and, once
/// used, one for broadcasting and one per subscription).
pub struct AmqpBroker {
    config: Arc<AmqpConfig>,
    publisher: Arc<Publisher>,
    broadcaster: fanout::Broadcaster,
    /// Stops every consumer opened from this handle when it is closed.
    shutdown: CancellationToken,
}

impl std::fmt::Debug for AmqpBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpBroker")
            .field("url", &self.config.redacted)
            .finish()
    }
}

impl AmqpBroker {
    /// Connects to the broker a URL names (`amqp://user:pass@host:port/vhost?options`).
    ///
    /// Fails with [`BrokerError::InvalidUrl`] on a bad option and [`BrokerError::Connect`] when the
    /// broker cannot be reached or refuses us within `connect_timeout`.
    pub async fn connect(url: &BrokerUrl) -> Result<Self> {
        let config = Arc::new(AmqpConfig::from_url(url)?);
        let publisher = Arc::new(Publisher::new(config.clone()));
        publisher.start().await?;
        Ok(AmqpBroker {
            broadcaster: fanout::Broadcaster::new(config.clone()),
            config,
            publisher,
            shutdown: CancellationToken::new(),
        })
    }
}

#[async_trait]
impl Broker for AmqpBroker {
    fn transport(&self) -> &'static str {
        "amqp"
    }

    async fn declare_queue(&self, queue: &str) -> Result<()> {
        self.publisher.declare(queue).await
    }

    async fn publish(&self, queue: &str, message: &Message) -> Result<()> {
        self.publisher.publish(queue, message).await
    }

    async fn publish_batch(&self, queue: &str, messages: &[Message]) -> Result<()> {
        self.publisher.publish_batch(queue, messages).await
    }

    fn limits(&self) -> Limits {
        self.config.limits
    }

    async fn dead_letter(&self, queue: &str, message: &Message) -> Result<()> {
        self.publisher.dead_letter(queue, message).await
    }

    async fn consume(&self, queues: &[String], prefetch: usize) -> Result<Box<dyn Consumer>> {
        if queues.is_empty() {
            return Err(BrokerError::malformed("consume needs at least one queue"));
        }
        if self.shutdown.is_cancelled() {
            return Err(BrokerError::Closed);
        }
        let names = queues
            .iter()
            .map(|q| Ok((Arc::from(q.as_str()), table::short_string(q, "queue name")?)))
            .collect::<Result<Vec<_>>>()?;
        let consumer = AmqpConsumer::start(
            self.config.clone(),
            self.publisher.clone(),
            names,
            prefetch,
            self.shutdown.child_token(),
        )
        .await?;
        Ok(Box::new(consumer))
    }

    async fn purge(&self, queue: &str) -> Result<u64> {
        self.publisher.purge(queue).await
    }

    async fn queue_len(&self, queue: &str) -> Result<u64> {
        self.publisher.queue_len(queue).await
    }

    async fn close(&self) -> Result<()> {
        self.shutdown.cancel();
        self.publisher.close().await;
        self.broadcaster.close().await;
        Ok(())
    }

    /// Declares the exchange as Celery does and publishes the message to it, transient
    /// (`fanout.rs`, `topology.rs`).
    async fn broadcast(&self, exchange: &str, routing_key: &str, message: &Message) -> Result<()> {
        self.broadcaster
            .broadcast(exchange, routing_key, message)
            .await
    }

    /// Declares the exchange and an exclusive, auto-deleted queue `name` bound with `binding_key`,
    /// and consumes it without acks on a connection of its own (`fanout.rs`).
    async fn subscribe(
        &self,
        exchange: &str,
        binding_key: &str,
        name: &str,
    ) -> Result<Box<dyn Subscription>> {
        let subscription = fanout::subscribe(
            self.config.clone(),
            exchange,
            binding_key,
            name,
            &self.shutdown,
        )
        .await?;
        Ok(Box::new(subscription))
    }
}
