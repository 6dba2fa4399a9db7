//! Integration tests of the `redis://` transport against the real Redis at 127.0.0.1:6379, one
//! module per behaviour: plain delivery (`delivery`), what happens to unacked messages (`unacked`),
//! what lies in Redis and interop with the real kombu (`wire`), idle waiting and lost connections
//! (`connections`), the wait lock a pool's consumers share (`pool_waiting`), and `rediss://` with a
//! test CA against TLS-only servers of the test's own (`tls`).
//!
//! Every test uses its own `global_keyprefix` (with a uuid), so tests run in parallel, and deletes
//! every `<prefix>*` key when it ends (even on panic). The kombu interop test runs in the pinned
//! Celery venv (`scripts/celery-venv.sh`; `CELERITY_NO_PYTHON=1` skips it).

#![cfg(feature = "redis")]

use celerity_testsupport::{TcpProxy, REDIS};

use std::collections::HashSet;
use std::mem::ManuallyDrop;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use celerity_broker::redis::RedisBroker;
use celerity_broker::{Broker, BrokerError, BrokerUrl, Consumer, Delivery, Message, Properties};
use redis::AsyncCommands;
use serde_json::{json, Map, Value};

const SEP: &str = "\x06\x16";
/// A generous bound so a broken test fails instead of hanging (not a speed assertion).
const PATIENCE: Duration = Duration::from_secs(10);

/// One test's key space: a broker with a unique prefix, and a raw connection to look at Redis.
struct Space {
    prefix: String,
    raw: redis::aio::MultiplexedConnection,
}

impl Space {
    async fn new() -> Self {
        let prefix = format!("celtest:{}:", uuid::Uuid::new_v4().simple());
        let client = redis::Client::open(REDIS).unwrap();
        let raw = client.get_multiplexed_async_connection().await.unwrap();
        Space { prefix, raw }
    }

    /// A broker on this key space, with extra URL options (`&a=b…`).
    async fn broker(&self, options: &str) -> RedisBroker {
        let url = format!("{REDIS}?global_keyprefix={}{options}", self.prefix);
        RedisBroker::connect(&BrokerUrl::parse(&url).unwrap())
            .await
            .unwrap()
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    async fn llen(&self, name: &str) -> usize {
        self.raw.clone().llen(self.key(name)).await.unwrap()
    }

    async fn lrange(&self, name: &str) -> Vec<Vec<u8>> {
        self.raw
            .clone()
            .lrange(self.key(name), 0, -1)
            .await
            .unwrap()
    }

    /// (HLEN unacked, ZCARD unacked_index)
    async fn unacked(&self) -> (usize, usize) {
        let mut c = self.raw.clone();
        let h: usize = c.hlen(self.key("unacked")).await.unwrap();
        let z: usize = c.zcard(self.key("unacked_index")).await.unwrap();
        (h, z)
    }
}

impl Drop for Space {
    fn drop(&mut self) {
        // Synchronous, so it also runs when the test panics.
        let Ok(mut c) = redis::Client::open(REDIS).and_then(|c| c.get_connection()) else {
            return;
        };
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", self.prefix))
            .query(&mut c)
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: redis::RedisResult<()> = redis::cmd("DEL").arg(keys).query(&mut c);
        }
    }
}

fn message(n: usize, priority: u8) -> Message {
    let mut headers = Map::new();
    headers.insert("lang".into(), json!("py"));
    headers.insert("task".into(), json!("tests.add"));
    headers.insert("id".into(), json!(format!("task-{n}")));
    headers.insert("timelimit".into(), json!([null, 5.5]));
    Message {
        properties: Properties {
            correlation_id: Some(format!("task-{n}")),
            reply_to: Some(String::new()),
            priority,
            ..Properties::default()
        },
        headers,
        body: format!(r#"[[{n}, "h\u00e9"], {{}}, {{"callbacks": null}}]"#).into_bytes(),
    }
}

fn task_id(d: &Delivery) -> String {
    d.message.task_id().unwrap_or_default().to_owned()
}

async fn next(c: &mut Box<dyn Consumer>) -> Delivery {
    tokio::time::timeout(PATIENCE, c.next())
        .await
        .expect("no delivery in time")
        .unwrap()
        .expect("consumer closed")
}

fn queue(name: &str) -> Vec<String> {
    vec![name.to_owned()]
}

mod connections;
mod delivery;
mod pool_waiting;
mod tls;
mod unacked;
mod wire;
