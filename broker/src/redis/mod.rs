//! The `redis://` transport in kombu's layout (being written).

use async_trait::async_trait;

use crate::error::{BrokerError, Result};
use crate::message::Message;
use crate::transport::{Broker, Consumer};
use crate::url::BrokerUrl;

/// A connection to the broker.
pub struct RedisBroker;

impl RedisBroker {
    /// Connects.
    pub async fn connect(_url: &BrokerUrl) -> Result<Self> {
        Err(BrokerError::NotCompiled("redis"))
    }
}

#[async_trait]
impl Broker for RedisBroker {
    fn transport(&self) -> &'static str {
        "redis"
    }
    async fn declare_queue(&self, _queue: &str) -> Result<()> {
        Err(BrokerError::NotCompiled("redis"))
    }
    async fn publish(&self, _queue: &str, _message: &Message) -> Result<()> {
        Err(BrokerError::NotCompiled("redis"))
    }
    async fn publish_batch(&self, _queue: &str, _messages: &[Message]) -> Result<()> {
        Err(BrokerError::NotCompiled("redis"))
    }
    async fn consume(&self, _queues: &[String], _prefetch: usize) -> Result<Box<dyn Consumer>> {
        Err(BrokerError::NotCompiled("redis"))
    }
    async fn purge(&self, _queue: &str) -> Result<u64> {
        Err(BrokerError::NotCompiled("redis"))
    }
    async fn queue_len(&self, _queue: &str) -> Result<u64> {
        Err(BrokerError::NotCompiled("redis"))
    }
    async fn close(&self) -> Result<()> {
        Ok(())
    }
}
