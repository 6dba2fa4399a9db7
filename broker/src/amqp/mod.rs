//! The `amqp://` transport (being written).

use async_trait::async_trait;

use crate::error::{BrokerError, Result};
use crate::message::Message;
use crate::transport::{Broker, Consumer};
use crate::url::BrokerUrl;

/// A connection to the broker.
pub struct AmqpBroker;

impl AmqpBroker {
    /// Connects.
    pub async fn connect(_url: &BrokerUrl) -> Result<Self> {
        Err(BrokerError::NotCompiled("amqp"))
    }
}

#[async_trait]
impl Broker for AmqpBroker {
    fn transport(&self) -> &'static str {
        "amqp"
    }
    async fn declare_queue(&self, _queue: &str) -> Result<()> {
        Err(BrokerError::NotCompiled("amqp"))
    }
    async fn publish(&self, _queue: &str, _message: &Message) -> Result<()> {
        Err(BrokerError::NotCompiled("amqp"))
    }
    async fn publish_batch(&self, _queue: &str, _messages: &[Message]) -> Result<()> {
        Err(BrokerError::NotCompiled("amqp"))
    }
    async fn consume(&self, _queues: &[String], _prefetch: usize) -> Result<Box<dyn Consumer>> {
        Err(BrokerError::NotCompiled("amqp"))
    }
    async fn purge(&self, _queue: &str) -> Result<u64> {
        Err(BrokerError::NotCompiled("amqp"))
    }
    async fn queue_len(&self, _queue: &str) -> Result<u64> {
        Err(BrokerError::NotCompiled("amqp"))
    }
    async fn close(&self) -> Result<()> {
        Ok(())
    }
}
