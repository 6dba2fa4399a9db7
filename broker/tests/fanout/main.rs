//! Integration tests of broadcast / subscribe (Celery's remote control and events) on the real Redis
//! (127.0.0.1:6379) and RabbitMQ (127.0.0.1:5672), and interop with the real Celery/kombu 5.7 of the
//! pinned venv (`CELERITY_NO_PYTHON=1` skips those).
//!
//! The checks (`broadcast`: fan-out, binding keys, round trips, cuts, close, replies;
//! `celery_interop`: Celery's revoke and a kombu node) run once per transport, from `redis_fanout`
//! and `amqp_fanout`, which also hold each transport's own checks.
//!
//! On Redis a test gets its own `global_keyprefix`, which also names its pub/sub channels, and its
//! keys are deleted at the end. On RabbitMQ a test uses its own `celtest-<uuid>.pidbox` exchange
//! (deleted at the end) and exclusive queues that go with their connection; where a test must use a
//! shared exchange (`celeryev`, `celery.pidbox`), it marks its messages and skips everyone else's.

#![cfg(any(feature = "redis", feature = "amqp"))]

use std::sync::Arc;
use std::time::Duration;

use celerity_broker::message::{PERSISTENT, TRANSIENT};
use celerity_broker::transport::Subscription;
use celerity_broker::{connect_broker, pyjson, Broker, BrokerError, Message, Properties};
use celerity_testsupport::{celery_python, Cleanup, TcpProxy, PY_AMQP, REDIS};
use serde_json::{json, Map, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

/// A generous bound so a broken test fails instead of hanging (not a speed assertion).
const PATIENCE: Duration = Duration::from_secs(15);

#[derive(Clone, Copy, PartialEq, Debug)]
enum Transport {
    #[cfg(feature = "redis")]
    Redis,
    #[cfg(feature = "amqp")]
    Amqp,
}

/// One test's names on one transport; cleans up when dropped (even on panic).
struct Env {
    transport: Transport,
    uid: String,
}

impl Env {
    fn new(transport: Transport) -> Self {
        Env {
            transport,
            uid: uuid::Uuid::new_v4().simple().to_string(),
        }
    }

    /// The Redis `global_keyprefix` of this test.
    fn prefix(&self) -> String {
        format!("celtest:{}:", self.uid)
    }

    /// The broker URL, through a proxy on `port` if given.
    fn url(&self, port: Option<u16>) -> String {
        match self.transport {
            #[cfg(feature = "redis")]
            Transport::Redis => format!(
                "redis://127.0.0.1:{}/0?global_keyprefix={}",
                port.unwrap_or(6379),
                self.prefix()
            ),
            #[cfg(feature = "amqp")]
            Transport::Amqp => format!("amqp://guest:guest@127.0.0.1:{}/%2f", port.unwrap_or(5672)),
        }
    }

    fn upstream(&self) -> &'static str {
        match self.transport {
            #[cfg(feature = "redis")]
            Transport::Redis => "127.0.0.1:6379",
            #[cfg(feature = "amqp")]
            Transport::Amqp => "127.0.0.1:5672",
        }
    }

    async fn broker(&self) -> Arc<dyn Broker> {
        connect_broker(&self.url(None)).await.unwrap()
    }

    /// The control namespace: on Redis the prefix already isolates the channels, so Celery's own.
    fn namespace(&self) -> String {
        match self.transport {
            #[cfg(feature = "redis")]
            Transport::Redis => "celery".to_owned(),
            #[cfg(feature = "amqp")]
            Transport::Amqp => format!("celtest-{}", self.uid),
        }
    }

    /// This test's remote-control exchange (`<namespace>.pidbox`).
    fn pidbox(&self) -> String {
        format!("{}.pidbox", self.namespace())
    }

    /// A subscriber name as Celery forms a pidbox queue name (`<node>.<exchange>`).
    fn node_queue(&self, node: &str, exchange: &str) -> String {
        format!("{node}-{}@test.{exchange}", self.uid)
    }

    /// A control-style message of this test, numbered `n`.
    fn message(&self, n: u64) -> Message {
        message(&self.uid, n)
    }

    /// The next message of this test on `sub` (others' broadcasts on a shared exchange are skipped).
    async fn recv(&self, sub: &mut Box<dyn Subscription>) -> Message {
        recv_where(sub, |m| m.headers.get("test") == Some(&json!(self.uid))).await
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // Deletes on a runtime of its own: this may run inside a test's runtime, which is not to be
        // blocked on.
        let cleanup = match self.transport {
            #[cfg(feature = "redis")]
            Transport::Redis => Cleanup::new().redis_prefix(self.prefix()),
            #[cfg(feature = "amqp")]
            Transport::Amqp => Cleanup::new().amqp_exchange(self.pidbox()),
        };
        drop(cleanup);
    }
}

/// A control-style message marked with `uid`, numbered `n`.
fn message(uid: &str, n: u64) -> Message {
    Message {
        properties: Properties {
            delivery_mode: TRANSIENT,
            ..Properties::default()
        },
        headers: object(json!({"clock": n, "expires": 0, "test": uid})),
        body: pyjson::to_vec(&json!({
            "method": "ping", "arguments": {"n": n}, "destination": null,
            "pattern": null, "matcher": null
        })),
    }
}

fn object(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

fn n_of(m: &Message) -> u64 {
    let body: Value = serde_json::from_slice(&m.body).unwrap();
    body["arguments"]["n"].as_u64().unwrap()
}

/// The next message on `sub` that `want` accepts, within [`PATIENCE`].
async fn recv_where(sub: &mut Box<dyn Subscription>, want: impl Fn(&Message) -> bool) -> Message {
    let wait = async {
        loop {
            let m = sub.next().await.unwrap().expect("subscription ended");
            if want(&m) {
                return m;
            }
        }
    };
    tokio::time::timeout(PATIENCE, wait)
        .await
        .expect("no broadcast arrived")
}

impl Env {
    /// The broker URL and `global_keyprefix` for Python (kombu takes the prefix as a transport option).
    fn python_broker(&self) -> (String, String) {
        match self.transport {
            #[cfg(feature = "redis")]
            Transport::Redis => (REDIS.into(), self.prefix()),
            #[cfg(feature = "amqp")]
            Transport::Amqp => (PY_AMQP.into(), String::new()),
        }
    }
}

mod broadcast;
mod celery_interop;
use broadcast::*;
use celery_interop::*;

#[cfg(feature = "amqp")]
mod amqp_fanout;
#[cfg(feature = "redis")]
mod redis_fanout;
