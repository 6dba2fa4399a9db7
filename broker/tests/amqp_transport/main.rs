//! The `amqp://` transport against the real RabbitMQ at 127.0.0.1:5672 (guest/guest), one module
//! per behaviour: delivery, acks and prefetch (`delivery`), what Celery sees and sends
//! (`celery_compat`), lost connections, deleted queues and closing (`connections`), and RabbitMQ's
//! consumer timeout (`consumer_timeout`, on a private node), and `amqps://` with a test CA (`tls`, on
//! a private node with a TLS listener), and a three-node cluster of the test's own with quorum queues
//! losing the queue's leader mid-load (`cluster`).
//!
//! Every test uses its own queue names (with a uuid) and deletes its queues and exchanges at the end,
//! even when it fails (a drop guard). The forced-disconnect test uses `rabbitmqctl`; the interop tests
//! use the pinned Python Celery venv (`scripts/celery-venv.sh`); `CELERITY_NO_PYTHON=1` skips them.

#![cfg(feature = "amqp")]

use std::collections::HashSet;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use celerity_testsupport::{celery_python, Cleanup};

use celerity_broker::{
    connect_broker, Broker, BrokerError, Consumer, Delivery, Message, Properties,
};
use lapin::options::{
    BasicPublishOptions, ExchangeDeclareOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use serde_json::{json, Value};

const URL: &str = "amqp://guest:guest@127.0.0.1:5672//";
const ADMIN_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Unique queue names, deleted (with their exchanges) when dropped.
struct Queues {
    names: Vec<String>,
    _cleanup: Cleanup,
}

impl Queues {
    fn new(tag: &str, n: usize) -> Self {
        let id = uuid::Uuid::new_v4().simple();
        let names: Vec<String> = (0..n)
            .map(|i| format!("celerity-test-{tag}-{id}-{i}"))
            .collect();
        let cleanup = names
            .iter()
            .fold(Cleanup::new(), |c, q| c.amqp_queue(q.as_str()));
        Queues {
            names,
            _cleanup: cleanup,
        }
    }
    fn name(&self, i: usize) -> &str {
        &self.names[i]
    }
}

async fn admin() -> Connection {
    Connection::connect(ADMIN_URL, ConnectionProperties::default())
        .await
        .expect("RabbitMQ must run on 127.0.0.1:5672")
}

async fn broker(query: &str) -> Arc<dyn Broker> {
    connect_broker(&format!("{URL}{query}")).await.unwrap()
}

fn msg(n: usize) -> Message {
    let mut m = Message::default();
    m.headers.insert("n".into(), json!(n));
    m.body = format!("[[{n}], {{}}, {{}}]").into_bytes();
    m
}

fn n_of(d: &Delivery) -> u64 {
    d.message.headers["n"].as_u64().unwrap()
}

/// The next delivery, or `None` if nothing arrives within `secs`.
async fn next_within(c: &mut Box<dyn Consumer>, secs: f64) -> Option<Delivery> {
    match tokio::time::timeout(Duration::from_secs_f64(secs), c.next()).await {
        Err(_) => None,
        Ok(r) => Some(r.unwrap().expect("consumer ended")),
    }
}

/// Polls `queue_len` until it equals `want` (requeues happen asynchronously in the broker).
async fn wait_len(b: &Arc<dyn Broker>, q: &str, want: u64) -> u64 {
    let mut got = 0;
    for _ in 0..100 {
        got = b.queue_len(q).await.unwrap();
        if got == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    got
}

fn python() -> Option<std::path::PathBuf> {
    celery_python()
}

mod celery_compat;
mod cluster;
mod connections;
mod consumer_timeout;
mod delivery;
mod tls;
