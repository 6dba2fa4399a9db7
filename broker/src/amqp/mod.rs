//! The `amqp://` / `amqps://` transport (RabbitMQ, through lapin), wire-compatible with Celery/kombu.
//!
//! Layout:
//! - `config`: the URL → lapin URI, timeouts and queue arguments.
//! - `connection`: connecting with a timeout, error mapping, reconnect backoff.
//! - `topology`: Celery's declarations (direct exchange + durable queue + binding, all named `q`).
//! - `table`, `props`: JSON headers ↔ AMQP tables, [`Message`] ↔ basic properties.
//! - `publisher`: the shared confirm-mode publishing connection.
//! - `consumer`: consumers with their own connection, prefetch via `basic.qos`, self-reconnecting.

mod config;
mod connection;
mod consumer;
mod props;
mod publisher;
mod table;
mod topology;

use std::sync::Arc;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::error::{BrokerError, Result};
use crate::message::Message;
use crate::transport::{Broker, Consumer};
use crate::url::BrokerUrl;

use config::AmqpConfig;
use consumer::AmqpConsumer;
use publisher::Publisher;

/// A RabbitMQ broker: one shared publishing connection, plus one connection per consumer.
pub struct AmqpBroker {
    config: Arc<AmqpConfig>,
    publisher: Publisher,
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
        let publisher = Publisher::new(config.clone());
        publisher.start().await?;
        Ok(AmqpBroker {
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
        Ok(())
    }

    async fn broadcast(
        &self,
        _exchange: &str,
        _routing_key: &str,
        _message: &crate::message::Message,
    ) -> Result<()> {
        Err(crate::error::BrokerError::NotCompiled("amqp fanout"))
    }

    async fn subscribe(
        &self,
        _exchange: &str,
        _binding_key: &str,
        _name: &str,
    ) -> Result<Box<dyn crate::transport::Subscription>> {
        Err(crate::error::BrokerError::NotCompiled("amqp fanout"))
    }
}
