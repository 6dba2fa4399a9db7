//! What the two workflow suites share: a worker with the demo tasks, and the three places each
//! suite runs on (memory://; Redis; RabbitMQ with results on Redis), each with a queue and Redis key
//! prefix of its own that `cleanup` deletes.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};

use celerity_broker::backend::memory::MemoryBackend;
use celerity_broker::memory::MemoryBroker;
use celerity_broker::testkit::{delete_amqp_queue, delete_redis_prefix};
use celerity_broker::{connect_backend, connect_broker, Broker, ResultBackend};
use celerity_client::Signature;
use celerity_worker::{demo, run, Registry, Shutdown, WorkerConfig};

const REDIS: &str = "redis://127.0.0.1:6379/0";
const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const WAIT: Option<Duration> = Some(Duration::from_secs(30));

/// `<tag>-<uuid>`.
pub fn unique(tag: &str) -> String {
    format!("{tag}-{}", uuid::Uuid::new_v4().simple())
}

/// A signature with positional arguments given as a JSON array.
pub fn s(task: &str, args: Value) -> Signature {
    Signature::new(
        task,
        args.as_array().cloned().unwrap_or_default(),
        Map::new(),
    )
}

/// Our worker with the demo tasks, running in this process.
pub struct Worker {
    shutdown: Shutdown,
    handle: tokio::task::JoinHandle<celerity_worker::error::Result<celerity_worker::Summary>>,
}

impl Worker {
    /// Starts one on `queue`, `concurrency` jobs at once.
    pub fn spawn(
        broker: &Arc<dyn Broker>,
        backend: &Arc<dyn ResultBackend>,
        queue: &str,
        concurrency: usize,
    ) -> Worker {
        let mut registry = Registry::new();
        demo::register(&mut registry);
        let shutdown = Shutdown::default();
        let config = WorkerConfig {
            queues: vec![queue.to_owned()],
            concurrency,
            grace: Duration::from_secs(5),
            ..WorkerConfig::default()
        };
        let handle = tokio::spawn(run(
            registry,
            broker.clone(),
            Some(backend.clone()),
            config,
            shutdown.clone(),
        ));
        Worker { shutdown, handle }
    }

    /// Warm shutdown; panics if the worker failed.
    pub async fn stop(self) {
        self.shutdown.warm.cancel();
        self.handle.await.unwrap().unwrap();
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
