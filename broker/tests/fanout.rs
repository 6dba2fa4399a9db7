//! Integration tests of broadcast / subscribe (Celery's remote control and events) on the real Redis
//! (127.0.0.1:6379) and RabbitMQ (127.0.0.1:5672), and interop with the real Celery/kombu 5.7 of the
//! pinned venv (`CELERITY_NO_PYTHON=1` skips those).
//!
//! Each test runs once per transport. On Redis a test gets its own `global_keyprefix`, which also
//! names its pub/sub channels, and its keys are deleted at the end. On RabbitMQ a test uses its own
//! `celtest-<uuid>.pidbox` exchange (deleted at the end) and exclusive queues that go with their
//! connection; where a test must use a shared exchange (`celeryev`, `celery.pidbox`), it marks its
//! messages and skips everyone else's.

#![cfg(any(feature = "redis", feature = "amqp"))]

use std::sync::Arc;
use std::time::Duration;

use celerity_broker::message::{PERSISTENT, TRANSIENT};
use celerity_broker::testkit::{celery_python, TcpProxy};
use celerity_broker::transport::Subscription;
use celerity_broker::{connect_broker, pyjson, Broker, BrokerError, Message, Properties};
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
        let (transport, prefix, exchange) = (self.transport, self.prefix(), self.pidbox());
        // A runtime of its own: this may run inside a test's runtime, which is not to be blocked on.
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let _ = (&prefix, &exchange);
                match transport {
                    #[cfg(feature = "redis")]
                    Transport::Redis => {
                        celerity_broker::testkit::delete_redis_prefix(&prefix).await
                    }
                    #[cfg(feature = "amqp")]
                    Transport::Amqp => delete_exchange(&exchange).await,
                }
            })
        });
        let _ = cleanup.join();
    }
}

#[cfg(feature = "amqp")]
async fn delete_exchange(name: &str) {
    use lapin::options::ExchangeDeleteOptions;
    let url = "amqp://guest:guest@127.0.0.1:5672/%2f";
    let Ok(conn) = lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await
    else {
        return;
    };
    if let Ok(ch) = conn.create_channel().await {
        let _ = ch
            .exchange_delete(name.into(), ExchangeDeleteOptions::default())
            .await;
    }
    let _ = conn.close(200, "test cleanup".into()).await;
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

// ---------------------------------------------------------------------------------------------
// The checks, run on each transport.

async fn two_subscribers_both_receive(env: Env) {
    let b = env.broker().await;
    let ex = env.pidbox();
    let mut a = b
        .subscribe(&ex, "", &env.node_queue("a", &ex))
        .await
        .unwrap();
    let mut c = b
        .subscribe(&ex, "", &env.node_queue("c", &ex))
        .await
        .unwrap();
    b.broadcast(&ex, "", &env.message(1)).await.unwrap();
    b.broadcast(&ex, "", &env.message(2)).await.unwrap();
    for sub in [&mut a, &mut c] {
        assert_eq!(n_of(&env.recv(sub).await), 1);
        assert_eq!(n_of(&env.recv(sub).await), 2);
    }
    b.close().await.unwrap();
}

async fn binding_keys_select_routing_keys(env: Env) {
    let b = env.broker().await;
    let ex = "celeryev";
    let name = |what: &str| format!("celeryev.{what}-{}", env.uid);
    let mut tasks = b.subscribe(ex, "task.#", &name("tasks")).await.unwrap();
    let mut workers = b.subscribe(ex, "worker.#", &name("workers")).await.unwrap();
    let mut all = b.subscribe(ex, "#", &name("all")).await.unwrap();
    let mut bare = b.subscribe(ex, "", &name("bare")).await.unwrap();
    for (n, key) in [
        (1, "task.succeeded"),
        (2, "worker.heartbeat"),
        (3, "task.failed"),
        (4, "worker.offline"),
        (5, ""),
    ] {
        b.broadcast(ex, key, &env.message(n)).await.unwrap();
    }
    // Broadcasts arrive in order, so a number skipped is one not delivered.
    assert_eq!(n_of(&env.recv(&mut tasks).await), 1);
    assert_eq!(n_of(&env.recv(&mut tasks).await), 3);
    assert_eq!(n_of(&env.recv(&mut workers).await), 2);
    assert_eq!(n_of(&env.recv(&mut workers).await), 4);
    for n in 1..=4 {
        assert_eq!(n_of(&env.recv(&mut all).await), n);
    }
    // An empty binding key gets only what is broadcast with an empty routing key (as kombu's
    // bare channel on Redis, as a topic binding on RabbitMQ).
    assert_eq!(n_of(&env.recv(&mut bare).await), 5);
    b.broadcast(ex, "task.sent", &env.message(6)).await.unwrap();
    assert_eq!(n_of(&env.recv(&mut tasks).await), 6);
    b.close().await.unwrap();
}

async fn messages_round_trip(env: Env) {
    let b = env.broker().await;
    let ex = env.pidbox();
    let mut sub = b
        .subscribe(&ex, "", &env.node_queue("rt", &ex))
        .await
        .unwrap();
    let mut m = env.message(1);
    m.properties.correlation_id = Some("corr-1".into());
    m.properties.reply_to = Some("8f1c2d3e-reply".into());
    m.properties.expiration = Some("60000".into());
    m.headers.insert(
        "nested".into(),
        json!({"list": [1, "two", null, true, 2.5], "text": "héllo ☃"}),
    );
    m.body = [&b"\x00\xff binary \xfe"[..], "héllo".as_bytes()].concat();
    b.broadcast(&ex, "", &m).await.unwrap();
    let got = env.recv(&mut sub).await;
    assert_eq!(got, m);

    // Broadcasts are transient whatever the message says; the rest is kept.
    let mut persistent = env.message(2);
    persistent.properties.delivery_mode = PERSISTENT;
    b.broadcast(&ex, "", &persistent).await.unwrap();
    let got = env.recv(&mut sub).await;
    assert_eq!(got.properties.delivery_mode, TRANSIENT);
    persistent.properties.delivery_mode = TRANSIENT;
    assert_eq!(got, persistent);
    b.close().await.unwrap();
}

async fn subscription_survives_a_cut(env: Env) {
    let direct = env.broker().await;
    let proxy = TcpProxy::start(env.upstream()).await;
    let via = connect_broker(&env.url(Some(proxy.port()))).await.unwrap();
    let ex = env.pidbox();
    let mut sub = via
        .subscribe(&ex, "", &env.node_queue("cut", &ex))
        .await
        .unwrap();
    direct.broadcast(&ex, "", &env.message(0)).await.unwrap();
    assert_eq!(n_of(&env.recv(&mut sub).await), 0);

    proxy.cut();
    // Let the cut land, so whatever arrives from now on came over a new connection.
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Broadcasts sent while the subscriber is away are missed: keep sending until one arrives.
    let sender = {
        let (direct, ex, uid) = (direct.clone(), ex.clone(), env.uid.clone());
        tokio::spawn(async move {
            for n in 1.. {
                direct.broadcast(&ex, "", &message(&uid, n)).await.unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let got = n_of(&env.recv(&mut sub).await);
    assert!(got >= 1, "a broadcast sent after the cut arrives");
    // And it goes on receiving, in order.
    let next = n_of(&env.recv(&mut sub).await);
    assert!(next > got);
    sender.abort();
    via.close().await.unwrap();
    direct.close().await.unwrap();
}

async fn close_ends_subscriptions(env: Env) {
    let b = env.broker().await;
    let ex = env.pidbox();
    let mut sub = b
        .subscribe(&ex, "", &env.node_queue("close", &ex))
        .await
        .unwrap();
    let waiting = tokio::spawn(async move { sub.next().await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    b.close().await.unwrap();
    let ended = tokio::time::timeout(PATIENCE, waiting)
        .await
        .expect("next() returns once the broker is closed")
        .unwrap();
    assert!(matches!(ended, Ok(None)), "{ended:?}");
    assert!(matches!(
        b.broadcast(&ex, "", &env.message(1)).await,
        Err(BrokerError::Closed)
    ));
    assert!(matches!(
        b.subscribe(&ex, "", &env.node_queue("late", &ex)).await,
        Err(BrokerError::Closed)
    ));
}

/// Remote-control replies go to the direct exchange `reply.celery.pidbox` keyed by the asker's oid:
/// only the reply queue bound with that key gets one (on Redis a list found through kombu's binding
/// set, not pub/sub); closing the subscription removes its binding.
async fn replies_reach_only_the_asker(env: Env) {
    const REPLY: &str = "reply.celery.pidbox";
    let b = env.broker().await;
    let (oid_a, oid_b) = (
        format!("celtest-{}-a", env.uid),
        format!("celtest-{}-b", env.uid),
    );
    let mut a = b
        .subscribe(REPLY, &oid_a, &format!("{oid_a}.{REPLY}"))
        .await
        .unwrap();
    let mut other = b
        .subscribe(REPLY, &oid_b, &format!("{oid_b}.{REPLY}"))
        .await
        .unwrap();
    b.broadcast(REPLY, &oid_a, &env.message(1)).await.unwrap();
    b.broadcast(REPLY, &oid_b, &env.message(2)).await.unwrap();
    assert_eq!(n_of(&env.recv(&mut a).await), 1);
    // The first reply `other` gets is its own: the one for `a` never reached it.
    assert_eq!(n_of(&env.recv(&mut other).await), 2);
    a.close().await;
    #[cfg(feature = "redis")]
    if env.transport == Transport::Redis {
        use redis::AsyncCommands as _;
        let client = redis::Client::open("redis://127.0.0.1:6379/0").unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let members: Vec<String> = c
            .smembers(format!("{}_kombu.binding.{REPLY}", env.prefix()))
            .await
            .unwrap();
        assert!(
            members.iter().all(|m| !m.starts_with(&oid_a)),
            "{members:?}"
        );
        assert!(members.iter().any(|m| m.starts_with(&oid_b)), "{members:?}");
    }
    // A reply nobody waits for any more is dropped, not an error.
    b.broadcast(REPLY, &oid_a, &env.message(3)).await.unwrap();
    other.close().await;
    b.close().await.unwrap();
}

/// Python Celery's `app.control.revoke(id, terminate=True)` reaches our pidbox subscription.
async fn celery_revoke_reaches_us(env: Env) {
    let Some(python) = celery_python() else {
        return;
    };
    let b = env.broker().await;
    let node = format!("celtest-{}@test", env.uid);
    let mut sub = b
        .subscribe("celery.pidbox", "", &format!("{node}.celery.pidbox"))
        .await
        .unwrap();
    let task_id = format!("task-{}", env.uid);
    let script = r#"
import sys
from celery import Celery
url, prefix, task_id = sys.argv[1:4]
app = Celery(broker=url)
if prefix:
    app.conf.broker_transport_options = {'global_keyprefix': prefix}
app.control.revoke(task_id, terminate=True)
"#;
    let (url, prefix) = env.python_broker();
    let out = tokio::process::Command::new(&python)
        .args(["-c", script, &url, &prefix, &task_id])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "python: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = recv_where(&mut sub, |m| {
        serde_json::from_slice::<Value>(&m.body)
            .is_ok_and(|v| v["arguments"]["task_id"] == json!(task_id))
    })
    .await;
    let body: Value = serde_json::from_slice(&m.body).unwrap();
    assert_eq!(body["method"], "revoke");
    assert_eq!(body["arguments"]["task_id"], json!(task_id));
    assert_eq!(body["arguments"]["terminate"], json!(true));
    assert_eq!(body["destination"], Value::Null);
    assert!(body.get("reply_to").is_none(), "a cast wants no reply");
    assert_eq!(m.properties.content_type, "application/json");
    assert!(m.headers.contains_key("clock"));
    b.close().await.unwrap();
}

/// Our broadcast reaches a kombu `Node` listening the way a Celery worker's pidbox does.
async fn kombu_node_receives_ours(env: Env) {
    let Some(python) = celery_python() else {
        return;
    };
    let script = r#"
import json, sys
from celery import Celery
url, prefix, namespace, node = sys.argv[1:5]
app = Celery(broker=url)
app.conf.control_exchange = namespace
if prefix:
    app.conf.broker_transport_options = {'global_keyprefix': prefix}
got = []
def on_message(body, message):
    got.append({'body': body, 'headers': message.headers, 'content_type': message.content_type,
                'delivery_info': {k: message.delivery_info.get(k) for k in ('exchange', 'routing_key')}})
with app.connection_for_write() as conn:
    # As celery.worker.pidbox.Pidbox.start does it.
    pidbox = app.control.mailbox(conn).Node(node, channel=conn.channel())
    consumer = pidbox.listen(callback=on_message)
    print('ready', flush=True)
    while not got:
        conn.drain_events(timeout=10)
    consumer.cancel()
print(json.dumps(got[0]), flush=True)
"#;
    let (url, prefix) = env.python_broker();
    let node = format!("celtest-{}@test", env.uid);
    let mut child = tokio::process::Command::new(&python)
        .args(["-c", script, &url, &prefix, &env.namespace(), &node])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(PATIENCE, lines.next_line())
        .await
        .expect("python got ready")
        .unwrap();
    assert_eq!(ready.as_deref(), Some("ready"));

    // kombu subscribes on Redis only when it starts draining: send until it has one.
    let b = env.broker().await;
    let ex = env.pidbox();
    let received = async {
        let sending = async {
            loop {
                b.broadcast(&ex, "", &env.message(7)).await.unwrap();
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        tokio::select! {
            line = lines.next_line() => line.unwrap().expect("python printed what it got"),
            () = sending => unreachable!(),
        }
    };
    let line = tokio::time::timeout(PATIENCE, received)
        .await
        .expect("kombu received the broadcast");
    let status = child.wait().await.unwrap();
    assert!(status.success(), "python failed");
    let got: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        got["body"],
        json!({"method": "ping", "arguments": {"n": 7}, "destination": null,
               "pattern": null, "matcher": null})
    );
    assert_eq!(got["headers"]["test"], json!(env.uid));
    assert_eq!(got["headers"]["clock"], json!(7));
    assert_eq!(got["content_type"], "application/json");
    assert_eq!(got["delivery_info"]["exchange"], json!(ex));
    b.close().await.unwrap();
}

impl Env {
    /// The broker URL and `global_keyprefix` for Python (kombu takes the prefix as a transport option).
    fn python_broker(&self) -> (String, String) {
        match self.transport {
            #[cfg(feature = "redis")]
            Transport::Redis => ("redis://127.0.0.1:6379/0".into(), self.prefix()),
            #[cfg(feature = "amqp")]
            Transport::Amqp => ("amqp://guest:guest@127.0.0.1:5672//".into(), String::new()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Redis.

#[cfg(feature = "redis")]
mod redis_fanout {
    use super::*;
    use futures_util::StreamExt as _;

    fn env() -> Env {
        Env::new(Transport::Redis)
    }

    #[tokio::test]
    async fn two_subscribers_both_receive() {
        super::two_subscribers_both_receive(env()).await
    }

    #[tokio::test]
    async fn binding_keys_select_routing_keys() {
        super::binding_keys_select_routing_keys(env()).await
    }

    #[tokio::test]
    async fn messages_round_trip() {
        super::messages_round_trip(env()).await
    }

    #[tokio::test]
    async fn subscription_survives_a_cut() {
        super::subscription_survives_a_cut(env()).await
    }

    #[tokio::test]
    async fn close_ends_subscriptions() {
        super::close_ends_subscriptions(env()).await
    }

    #[tokio::test]
    async fn celery_revoke_reaches_us() {
        super::celery_revoke_reaches_us(env()).await
    }

    #[tokio::test]
    async fn kombu_node_receives_ours() {
        super::kombu_node_receives_ours(env()).await
    }

    #[tokio::test]
    async fn replies_reach_only_the_asker() {
        super::replies_reach_only_the_asker(env()).await
    }

    /// The channels and payloads on the wire are kombu's: `<prefix>/<db>.<exchange>[/<key>]`, the
    /// kombu envelope; what kombu publishes there reaches our subscribers; junk is skipped.
    #[tokio::test]
    async fn channels_and_envelopes_are_kombus() {
        let env = env();
        let p = env.prefix();
        let client = redis::Client::open("redis://127.0.0.1:6379/0").unwrap();
        let mut raw = client.get_async_pubsub().await.unwrap();
        raw.subscribe(&[
            format!("{p}/3.celery.pidbox"),
            format!("{p}/3.celeryev/task.succeeded"),
        ])
        .await
        .unwrap();
        // A broker on db 3 names its channels `/3.`.
        let url = format!("redis://127.0.0.1:6379/3?global_keyprefix={p}");
        let db3 = connect_broker(&url).await.unwrap();
        db3.broadcast("celery.pidbox", "", &env.message(1))
            .await
            .unwrap();
        db3.broadcast("celeryev", "task.succeeded", &env.message(2))
            .await
            .unwrap();
        let mut stream = raw.on_message();
        for (n, channel, exchange, key) in [
            (1, "/3.celery.pidbox", "celery.pidbox", ""),
            (
                2,
                "/3.celeryev/task.succeeded",
                "celeryev",
                "task.succeeded",
            ),
        ] {
            let msg = tokio::time::timeout(PATIENCE, stream.next())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(msg.get_channel_name(), format!("{p}{channel}"));
            let v: Value = serde_json::from_slice(msg.get_payload_bytes()).unwrap();
            let props = &v["properties"];
            assert_eq!(
                props["delivery_info"],
                json!({"exchange": exchange, "routing_key": key})
            );
            assert_eq!(props["body_encoding"], "base64");
            assert_eq!(props["delivery_mode"], 1);
            assert!(uuid::Uuid::parse_str(props["delivery_tag"].as_str().unwrap()).is_ok());
            assert_eq!(v["headers"]["clock"], json!(n));
            assert_eq!(v["content-type"], "application/json");
        }
        drop(stream);
        db3.close().await.unwrap();

        // What kombu publishes (its envelope, its channels) reaches subscribers bound as Celery's are:
        // "" for the pidbox, "#" for events. A payload that is no envelope is skipped.
        let b = env.broker().await;
        let mut pidbox = b
            .subscribe("celery.pidbox", "", "node@x.celery.pidbox")
            .await
            .unwrap();
        let mut events = b.subscribe("celeryev", "#", "celeryev.x").await.unwrap();
        let kombu_envelope = |body: &str, exchange: &str, key: &str| {
            pyjson::to_vec(&json!({
                "body": body, "content-encoding": "utf-8", "content-type": "application/json",
                "headers": {"clock": 3, "expires": 0, "test": env.uid},
                "properties": {"delivery_mode": 1,
                    "delivery_info": {"exchange": exchange, "routing_key": key},
                    "priority": 0, "body_encoding": "base64",
                    "delivery_tag": "0b4b4f0e-8d5b-4a53-9c39-7e4c7e2b1f00"}
            }))
        };
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let publish = |channel: String, payload: Vec<u8>| {
            let mut conn = conn.clone();
            async move {
                let _: i64 = redis::cmd("PUBLISH")
                    .arg(channel)
                    .arg(payload)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
            }
        };
        publish(format!("{p}/0.celery.pidbox"), b"not an envelope".to_vec()).await;
        // {"method": "ping", "arguments": {"n": 3}}
        let ping = "eyJtZXRob2QiOiAicGluZyIsICJhcmd1bWVudHMiOiB7Im4iOiAzfX0=";
        publish(
            format!("{p}/0.celery.pidbox"),
            kombu_envelope(ping, "celery.pidbox", ""),
        )
        .await;
        publish(
            format!("{p}/0.celeryev/task.succeeded"),
            kombu_envelope(ping, "celeryev", "task.succeeded"),
        )
        .await;
        for sub in [&mut pidbox, &mut events] {
            let m = env.recv(sub).await;
            assert_eq!(n_of(&m), 3);
            assert_eq!(m.properties.delivery_mode, TRANSIENT);
        }
        let _: () = redis::cmd("PING").query_async(&mut conn).await.unwrap();
        b.close().await.unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// RabbitMQ.

#[cfg(feature = "amqp")]
mod amqp_fanout {
    use super::*;

    fn env() -> Env {
        Env::new(Transport::Amqp)
    }

    #[tokio::test]
    async fn two_subscribers_both_receive() {
        super::two_subscribers_both_receive(env()).await
    }

    #[tokio::test]
    async fn binding_keys_select_routing_keys() {
        super::binding_keys_select_routing_keys(env()).await
    }

    #[tokio::test]
    async fn messages_round_trip() {
        super::messages_round_trip(env()).await
    }

    #[tokio::test]
    async fn subscription_survives_a_cut() {
        super::subscription_survives_a_cut(env()).await
    }

    #[tokio::test]
    async fn close_ends_subscriptions() {
        super::close_ends_subscriptions(env()).await
    }

    #[tokio::test]
    async fn celery_revoke_reaches_us() {
        super::celery_revoke_reaches_us(env()).await
    }

    #[tokio::test]
    async fn kombu_node_receives_ours() {
        super::kombu_node_receives_ours(env()).await
    }

    #[tokio::test]
    async fn replies_reach_only_the_asker() {
        super::replies_reach_only_the_asker(env()).await
    }
}
