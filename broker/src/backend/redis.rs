//! The `redis://` result backend in Celery's format (being written).

use std::time::Duration;

use async_trait::async_trait;

use super::{ResultBackend, TaskMeta};
use crate::error::{BrokerError, Result};
use crate::url::BrokerUrl;

/// A connection to a Redis result backend.
pub struct RedisBackend;

impl RedisBackend {
    /// Connects.
    pub async fn connect(_url: &BrokerUrl) -> Result<Self> {
        Err(BrokerError::NotCompiled("redis"))
    }
}

#[async_trait]
impl ResultBackend for RedisBackend {
    fn backend(&self) -> &'static str {
        "redis"
    }
    async fn store(&self, _meta: &TaskMeta) -> Result<()> {
        Err(BrokerError::NotCompiled("redis"))
    }
    async fn get(&self, _task_id: &str) -> Result<TaskMeta> {
        Err(BrokerError::NotCompiled("redis"))
    }
    async fn wait(&self, _task_id: &str, _timeout: Option<Duration>) -> Result<TaskMeta> {
        Err(BrokerError::NotCompiled("redis"))
    }
    async fn forget(&self, _task_id: &str) -> Result<()> {
        Err(BrokerError::NotCompiled("redis"))
    }
    async fn close(&self) -> Result<()> {
        Ok(())
    }
}
