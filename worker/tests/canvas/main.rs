//! Workflows (chain, group, chord) run by our worker, on memory://, Redis, and RabbitMQ with results
//! on Redis: flat ones (`flat`) and nested ones (`nested`).
//!
//! This file holds what both share: a worker with the demo tasks, and the three places each runs on,
//! each with a queue and Redis key prefix of its own that `cleanup` deletes.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};

use celerity_broker::backend::memory::MemoryBackend;
use celerity_broker::memory::MemoryBroker;
use celerity_broker::{connect_backend, connect_broker, Broker, ResultBackend};
use celerity_client::Signature;
use celerity_testsupport::{delete_amqp_queue, delete_redis_prefix, unique, InProcessWorker};
use celerity_testsupport::{AMQP, REDIS};

mod flat;
mod nested;

pub const WAIT: Option<Duration> = Some(Duration::from_secs(30));

/// A signature with positional arguments given as a JSON array.
pub fn s(task: &str, args: Value) -> Signature {
    Signature::new(
        task,
        args.as_array().cloned().unwrap_or_default(),
        Map::new(),
    )
}

/// Our worker with the demo tasks, running in this process.
pub struct Worker(InProcessWorker);

impl Worker {
    /// Starts one on `queue`, `concurrency` jobs at once.
    pub fn spawn(
        broker: &Arc<dyn Broker>,
        backend: &Arc<dyn ResultBackend>,
        queue: &str,
        concurrency: usize,
    ) -> Worker {
        Worker(InProcessWorker::demo(
            broker.clone(),
            Some(backend.clone()),
            queue,
            concurrency,
        ))
    }

    /// Warm shutdown; panics if the worker failed.
    pub async fn stop(self) {
        self.0.stop().await;
    }
}

/// A broker, a result backend and a queue to run a suite on.
pub struct Place {
    pub broker: Arc<dyn Broker>,
    pub backend: Arc<dyn ResultBackend>,
    pub queue: String,
    prefix: Option<String>,
    amqp: bool,
}

impl Place {
    pub fn memory(tag: &str) -> Place {
        let name = unique(tag);
        Place {
            broker: Arc::new(MemoryBroker::named(&name)),
            backend: Arc::new(MemoryBackend::named(&name)),
            queue: "jobs".into(),
            prefix: None,
            amqp: false,
        }
    }

    pub async fn redis(tag: &str) -> Place {
        let queue = unique(tag);
        let prefix = format!("{queue}:");
        let url = format!("{REDIS}?global_keyprefix={prefix}");
        Place {
            broker: connect_broker(&url).await.unwrap(),
            backend: connect_backend(&url).await.unwrap(),
            queue,
            prefix: Some(prefix),
            amqp: false,
        }
    }

    pub async fn rabbitmq_with_redis_results(tag: &str) -> Place {
        let queue = unique(tag);
        let prefix = format!("{queue}:");
        Place {
            broker: connect_broker(AMQP).await.unwrap(),
            backend: connect_backend(&format!("{REDIS}?global_keyprefix={prefix}"))
                .await
                .unwrap(),
            queue,
            prefix: Some(prefix),
            amqp: true,
        }
    }

    /// Deletes the queue (RabbitMQ) and the Redis keys the run made.
    pub async fn cleanup(self) {
        if self.amqp {
            delete_amqp_queue(&self.queue).await;
        }
        if let Some(prefix) = &self.prefix {
            delete_redis_prefix(prefix).await;
        }
    }
}
