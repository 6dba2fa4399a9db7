//! The worker against the real Redis and RabbitMQ (results on Redis), one module per behaviour:
//! jobs, failures, retries, shutdown and revokes (`jobs`), lost connections and a restarted Redis
//! (`reconnect`), far-off ETAs, a global rate limit and the Redis lease (`scheduling`), and the
//! URL's bounds on message size and dead letters, with oversized control requests (`bounds`).

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map};

use celerity_broker::{connect_backend, connect_broker, Broker, State};
use celerity_client::{Client, ClientError, SendOptions};
use celerity_testsupport::{
    delete_amqp_queue, delete_redis_prefix, demo_registry, InProcessWorker, OutageBackend,
    TcpProxy, AMQP, REDIS,
};
use celerity_worker::{demo, run, Registry, Shutdown, WorkerConfig};

/// Waits until the job has left the ready queue (a worker took it).
async fn wait_for_state_or_running(broker: &Arc<dyn Broker>, queue: &str) {
    for _ in 0..100 {
        if broker.queue_len(queue).await.unwrap() == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the worker never took the job");
}

/// Starts a worker with the demo tasks.
fn spawn_worker(
    broker: &Arc<dyn Broker>,
    backend: &Arc<dyn celerity_broker::ResultBackend>,
    config: WorkerConfig,
) -> InProcessWorker {
    InProcessWorker::spawn(
        demo_registry(),
        broker.clone(),
        Some(backend.clone()),
        config,
    )
}

fn unique() -> String {
    celerity_testsupport::unique("wtest")
}

mod bounds;
mod jobs;
mod reconnect;
mod scheduling;
