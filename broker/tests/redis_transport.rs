//! Integration tests of the `redis://` transport against the real Redis at 127.0.0.1:6379.
//!
//! Every test uses its own `global_keyprefix` (with a uuid), so tests run in parallel, and deletes
//! every `<prefix>*` key when it ends (even on panic). The last test also checks interop with the
//! real kombu, in the pinned Celery venv (`scripts/celery-venv.sh`; `CELERITY_NO_PYTHON=1` skips it).

#![cfg(feature = "redis")]

mod support;

use celerity_broker::testkit::TcpProxy;

use std::collections::HashSet;
use std::mem::ManuallyDrop;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use celerity_broker::redis::RedisBroker;
use celerity_broker::{Broker, BrokerError, BrokerUrl, Consumer, Delivery, Message, Properties};
use redis::AsyncCommands;
use serde_json::{json, Map, Value};

const REDIS: &str = "redis://127.0.0.1:6379/0";
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

#[tokio::test]
async fn round_trip_publish_consume_ack() {
    let s = Space::new().await;
    let b = s.broker("").await;
    let m = message(1, 0);
    b.publish("jobs", &m).await.unwrap();
    assert_eq!(b.queue_len("jobs").await.unwrap(), 1);
    // Celery's binding, as kombu stores it.
    let mut raw = s.raw.clone();
    let member = format!("jobs{SEP}{SEP}jobs");
    for set in ["_kombu.binding.jobs", "_kombu.binding_permanent.jobs"] {
        let members: Vec<String> = raw.smembers(s.key(set)).await.unwrap();
        assert_eq!(members, std::slice::from_ref(&member), "{set}");
    }

    let mut c = b.consume(&queue("jobs"), 4).await.unwrap();
    let d = next(&mut c).await;
    assert_eq!(d.message, m);
    assert_eq!(d.queue, "jobs");
    assert!(!d.redelivered);
    assert_eq!(s.unacked().await, (1, 1));
    assert_eq!(s.llen("jobs").await, 0);
    d.keep_alive().await.unwrap();
    d.ack().await.unwrap();
    assert_eq!(s.unacked().await, (0, 0));
    c.close().await.unwrap();
    assert_eq!(b.queue_len("jobs").await.unwrap(), 0);
}

#[tokio::test]
async fn envelope_on_the_wire_is_kombus() {
    let s = Space::new().await;
    let b = s.broker("").await;
    let mut m = message(7, 3);
    m.properties.expiration = Some("60000".into());
    b.publish("wire", &m).await.unwrap();
    let pushed = s.lrange(&format!("wire{SEP}3")).await;
    assert_eq!(pushed.len(), 1);
    let v: Value = serde_json::from_slice(&pushed[0]).unwrap();
    let keys = |v: &Value| -> Vec<String> { v.as_object().unwrap().keys().cloned().collect() };
    assert_eq!(
        keys(&v),
        [
            "body",
            "content-encoding",
            "content-type",
            "headers",
            "properties"
        ]
    );
    assert_eq!(
        keys(&v["properties"]),
        [
            "correlation_id",
            "reply_to",
            "delivery_mode",
            "expiration",
            "delivery_info",
            "priority",
            "body_encoding",
            "delivery_tag"
        ]
    );
    assert_eq!(
        v["properties"]["delivery_info"],
        json!({"exchange": "", "routing_key": "wire"})
    );
    assert_eq!(v["properties"]["body_encoding"], "base64");
    let text = String::from_utf8(pushed[0].clone()).unwrap();
    assert!(text.starts_with(r#"{"body": "W1s3LCAiaFx1MDBlOSJdLCB7fSwgeyJjYWxsYmFja3MiOiBudWxsfV0=", "content-encoding": "utf-8", "content-type": "application/json", "headers": {"lang": "py""#), "{text}");

    // The envelope Celery 5.7 pushed, consumed by us; its bytes are kept as they are in `unacked`.
    let sample = r#"{"body": "W1syLCAzXSwgeyJ6IjogImhcdTAwZTlsbG8gXHUyNjAzIn0sIHsiY2FsbGJhY2tzIjogbnVsbCwgImVycmJhY2tzIjogbnVsbCwgImNoYWluIjogbnVsbCwgImNob3JkIjogbnVsbH1d", "content-encoding": "utf-8", "content-type": "application/json", "headers": {"lang": "py", "task": "demo.add", "id": "85621692-0899-4a99-a3c9-46d0063eef39", "shadow": null, "eta": "2026-11-23T11:23:37.319511+00:00", "expires": "2026-11-23T11:24:32.319511+00:00", "group": null, "group_index": null, "retries": 0, "timelimit": [10, 5.5], "root_id": "85621692-0899-4a99-a3c9-46d0063eef39", "parent_id": null, "argsrepr": "(2, 3)", "kwargsrepr": "{'z': 'h\u00e9llo \u2603'}", "origin": "gen10785@vm", "ignore_result": null, "replaced_task_nesting": 0, "stamped_headers": null, "stamps": {}}, "properties": {"correlation_id": "85621692-0899-4a99-a3c9-46d0063eef39", "reply_to": "a2c3a804-92fa-3a6c-9aa0-ca9fde3742cc", "delivery_mode": 2, "expiration": "60000", "delivery_info": {"exchange": "", "routing_key": "probeq"}, "priority": 3, "body_encoding": "base64", "delivery_tag": "944d3ba7-6c3f-4749-9676-91ebb81f4ec4"}}"#;
    let mut raw = s.raw.clone();
    let _: () = raw
        .lpush(s.key(&format!("probeq{SEP}3")), sample)
        .await
        .unwrap();
    let mut c = b.consume(&queue("probeq"), 1).await.unwrap();
    let d = next(&mut c).await;
    assert_eq!(d.message.task_name(), Some("demo.add"));
    assert_eq!(d.message.properties.priority, 3);
    assert_eq!(d.message.properties.expiration.as_deref(), Some("60000"));
    assert_eq!(
        d.message.body,
        br#"[[2, 3], {"z": "h\u00e9llo \u2603"}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]"#
    );
    let record: String = raw
        .hget(s.key("unacked"), "944d3ba7-6c3f-4749-9676-91ebb81f4ec4")
        .await
        .unwrap();
    assert_eq!(record, format!(r#"[{sample}, "", "probeq"]"#));
    d.ack().await.unwrap();
    assert_eq!(s.unacked().await, (0, 0));
}

#[tokio::test]
async fn priority_keys_and_priority_major_order() {
    let s = Space::new().await;
    let b = s.broker("").await;
    for (q, n, p) in [
        ("a", 1, 9),
        ("b", 2, 0),
        ("a", 3, 0),
        ("b", 4, 6),
        ("a", 5, 5),
        ("b", 6, 200),
    ] {
        b.publish(q, &message(n, p)).await.unwrap();
    }
    // Priorities map to kombu's steps: 5 -> 3, 200 -> 9.
    for (key, len) in [
        ("a".to_owned(), 1),
        (format!("a{SEP}3"), 1),
        (format!("a{SEP}9"), 1),
        ("b".to_owned(), 1),
        (format!("b{SEP}6"), 1),
        (format!("b{SEP}9"), 1),
        (format!("a{SEP}6"), 0),
    ] {
        assert_eq!(s.llen(&key).await, len, "{key:?}");
    }
    let mut c = b
        .consume(&["a".to_owned(), "b".to_owned()], 10)
        .await
        .unwrap();
    let mut order = Vec::new();
    for _ in 0..6 {
        let d = next(&mut c).await;
        order.push((d.queue.clone(), task_id(&d)));
        d.ack().await.unwrap();
    }
    let expected: Vec<(String, String)> =
        [("a", 3), ("b", 2), ("a", 5), ("b", 4), ("a", 1), ("b", 6)]
            .iter()
            .map(|(q, n)| (q.to_string(), format!("task-{n}")))
            .collect();
    assert_eq!(order, expected);
    assert_eq!(s.unacked().await, (0, 0));
}

#[tokio::test]
async fn queues_take_turns_between_fetches() {
    let s = Space::new().await;
    let b = s.broker("").await;
    let batch: Vec<Message> = (0..10).map(|n| message(n, 0)).collect();
    b.publish_batch("x", &batch).await.unwrap();
    b.publish_batch("y", &batch).await.unwrap();
    // Prefetch 1: one message per fetch, so the round-robin shows in the order.
    let mut c = b.consume(&["x".into(), "y".into()], 1).await.unwrap();
    let mut queues = String::new();
    for _ in 0..6 {
        let d = next(&mut c).await;
        queues.push_str(&d.queue);
        d.ack().await.unwrap();
    }
    assert_eq!(queues, "xyxyxy");
}

#[tokio::test]
async fn batch_publish_consumed_exactly_once_by_two_consumers() {
    const N: usize = 5000;
    let s = Space::new().await;
    let b = Arc::new(s.broker("").await);
    let batch: Vec<Message> = (0..N).map(|n| message(n, (n % 10) as u8)).collect();
    b.publish_batch("bulk", &batch).await.unwrap();
    assert_eq!(b.queue_len("bulk").await.unwrap(), N as u64);

    let seen = Arc::new(Mutex::new(Vec::with_capacity(N)));
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let (b, seen) = (b.clone(), seen.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = b.consume(&queue("bulk"), 100).await.unwrap();
            let mut mine = 0;
            while seen.lock().unwrap().len() < N {
                let Ok(d) = tokio::time::timeout(Duration::from_millis(200), c.next()).await else {
                    continue;
                };
                let d = d.unwrap().unwrap();
                seen.lock().unwrap().push(task_id(&d));
                d.ack().await.unwrap();
                mine += 1;
            }
            c.close().await.unwrap();
            mine
        }));
    }
    let mut counts = Vec::new();
    for t in tasks {
        counts.push(
            tokio::time::timeout(Duration::from_secs(60), t)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let seen = seen.lock().unwrap().clone();
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(seen.len(), N, "deliveries");
    assert_eq!(unique.len(), N, "distinct messages");
    println!("per consumer: {counts:?}");
    assert_eq!(b.queue_len("bulk").await.unwrap(), 0);
    assert_eq!(s.unacked().await, (0, 0));
}

#[tokio::test]
async fn prefetch_window_is_respected() {
    let s = Space::new().await;
    let b = s.broker("").await;
    for n in 0..3 {
        b.publish("win", &message(n, 0)).await.unwrap();
    }
    let mut c = b.consume(&queue("win"), 2).await.unwrap();
    let d1 = next(&mut c).await;
    let _d2 = next(&mut c).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), c.next())
            .await
            .is_err(),
        "a third delivery came through a prefetch window of 2"
    );
    assert_eq!(s.unacked().await, (2, 2));
    assert_eq!(s.llen("win").await, 1);
    d1.ack().await.unwrap();
    let d3 = next(&mut c).await;
    assert_eq!(task_id(&d3), "task-2");
    // Widening the window lets more through; there is nothing left, so it waits.
    c.set_prefetch(5).await.unwrap();
    assert!(tokio::time::timeout(Duration::from_millis(100), c.next())
        .await
        .is_err());
    c.close().await.unwrap();
}

#[tokio::test]
async fn reject_with_and_without_requeue() {
    let s = Space::new().await;
    let b = s.broker("").await;
    b.publish("rej", &message(1, 0)).await.unwrap();
    b.publish("rej", &message(2, 0)).await.unwrap();
    let mut c = b.consume(&queue("rej"), 1).await.unwrap();
    let d = next(&mut c).await;
    assert_eq!(task_id(&d), "task-1");
    d.reject(true).await.unwrap();
    assert_eq!(s.unacked().await, (0, 0));
    // kombu requeues at the back: task-2 comes first, then task-1 marked redelivered.
    let d = next(&mut c).await;
    assert_eq!((task_id(&d), d.redelivered), ("task-2".into(), false));
    d.ack().await.unwrap();
    let d = next(&mut c).await;
    assert_eq!((task_id(&d), d.redelivered), ("task-1".into(), true));
    assert_eq!(d.message.headers["redelivered"], json!(true));
    d.reject(false).await.unwrap();
    assert_eq!(s.unacked().await, (0, 0));
    assert_eq!(b.queue_len("rej").await.unwrap(), 0);
    c.close().await.unwrap();
}

#[tokio::test]
async fn visibility_timeout_restores_unacked() {
    let s = Space::new().await;
    // A long restore_interval: only the explicit sweep below runs.
    let b = s
        .broker("&visibility_timeout=0.2&restore_interval=3600")
        .await;
    b.publish("vis", &message(1, 0)).await.unwrap();
    b.publish("vis", &message(2, 0)).await.unwrap();
    let mut c1 = b.consume(&queue("vis"), 1).await.unwrap();
    let stale = next(&mut c1).await;
    assert_eq!(task_id(&stale), "task-1");
    assert_eq!(b.restore_visible().await.unwrap(), 0, "not stale yet");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(b.restore_visible().await.unwrap(), 1);
    assert_eq!(s.unacked().await, (0, 0));
    // Back at the front (RPUSH), flagged as kombu does.
    let list = s.lrange("vis").await;
    let restored: Value = serde_json::from_slice(list.last().unwrap()).unwrap();
    assert_eq!(restored["headers"]["redelivered"], json!(true));
    assert_eq!(
        restored["properties"]["delivery_info"]["redelivered"],
        json!(true)
    );
    assert_eq!(restored["headers"]["id"], json!("task-1"));

    let b2 = s.broker("&restore_interval=3600").await;
    let mut c2 = b2.consume(&queue("vis"), 1).await.unwrap();
    let again = next(&mut c2).await;
    assert_eq!(
        (task_id(&again), again.redelivered),
        ("task-1".into(), true)
    );
    // The first consumer's late ack must not touch the new delivery of the same tag.
    stale.ack().await.unwrap();
    assert_eq!(s.unacked().await, (1, 1));
    again.ack().await.unwrap();
    assert_eq!(s.unacked().await, (0, 0));
    c1.close().await.unwrap();
    c2.close().await.unwrap();
}

#[tokio::test]
async fn keep_alive_renews_the_lease() {
    let s = Space::new().await;
    let b = s
        .broker("&visibility_timeout=0.3&restore_interval=3600")
        .await;
    b.publish("lease", &message(1, 0)).await.unwrap();
    let mut c = b.consume(&queue("lease"), 1).await.unwrap();
    let d = next(&mut c).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    d.keep_alive().await.unwrap();
    assert_eq!(
        b.restore_visible().await.unwrap(),
        0,
        "renewed lease restored"
    );
    d.ack().await.unwrap();
    assert_eq!(s.unacked().await, (0, 0));
    c.close().await.unwrap();
}

#[tokio::test]
async fn a_consumer_killed_mid_flight_loses_nothing() {
    const N: usize = 300;
    let s = Space::new().await;
    let b = Arc::new(s.broker("&restore_interval=3600").await);
    let batch: Vec<Message> = (0..N).map(|n| message(n, (n % 10) as u8)).collect();
    b.publish_batch("kill", &batch).await.unwrap();

    // Consumers that take messages and are killed at arbitrary points: nothing runs their cleanup
    // (ManuallyDrop, forgotten deliveries), as if the process died.
    for round in 0..12u64 {
        let b = b.clone();
        let task = tokio::spawn(async move {
            let mut c = ManuallyDrop::new(b.consume(&queue("kill"), 16).await.unwrap());
            loop {
                if let Ok(Some(d)) = c.next().await {
                    std::mem::forget(d);
                }
            }
        });
        tokio::time::sleep(Duration::from_micros(300 * round)).await;
        task.abort();
        let _ = task.await;
    }
    // A process killed while its consumer waits on an empty queue holds nothing either. Its fetch is
    // queued behind the wait on a connection of its own, so the kill must close that connection, as
    // a dying process does: the consumer runs on a runtime of its own, which is then dropped with
    // everything on it, the consumer's cleanup never running.
    let idle_space = "kill.idle";
    let b_idle = b.clone();
    tokio::task::spawn_blocking(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut c = ManuallyDrop::new(b_idle.consume(&queue(idle_space), 4).await.unwrap());
            let waited = tokio::time::timeout(Duration::from_millis(300), c.next()).await;
            assert!(waited.is_err(), "nothing to take: still waiting");
        });
        drop(rt);
    })
    .await
    .unwrap();
    // Redis sees the closed sockets before this push (same machine, and a margin).
    tokio::time::sleep(Duration::from_millis(200)).await;
    b.publish(idle_space, &message(9999, 0)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(b.queue_len(idle_space).await.unwrap(), 1);

    let (h, z) = s.unacked().await;
    let ready = b.queue_len("kill").await.unwrap() as usize;
    println!("after the kills: {h} unacked, {ready} ready");
    assert_eq!(h, z);
    assert_eq!(
        h + ready,
        N,
        "every message is either ready or recorded as unacked"
    );
    b.close().await.unwrap();

    // A consumer killed during its start-up sweep leaves `unacked_mutex` held until it expires
    // (300 s, as in kombu); stand in for that expiry.
    let _: () = s.raw.clone().del(s.key("unacked_mutex")).await.unwrap();
    // Another worker's sweep (visibility timeout 0) brings everything back: each message exactly once.
    let rescuer = s
        .broker("&visibility_timeout=0&restore_interval=3600")
        .await;
    assert_eq!(rescuer.restore_visible().await.unwrap(), h);
    assert_eq!(rescuer.queue_len("kill").await.unwrap() as usize, N);
    let mut c = rescuer.consume(&queue("kill"), 64).await.unwrap();
    let mut seen = HashSet::new();
    for _ in 0..N {
        let d = next(&mut c).await;
        assert!(seen.insert(task_id(&d)), "duplicate {}", task_id(&d));
        d.ack().await.unwrap();
    }
    assert_eq!(seen.len(), N);
    assert_eq!(s.unacked().await, (0, 0));
    c.close().await.unwrap();
}

#[tokio::test]
async fn next_is_cancel_safe() {
    use futures_util::FutureExt as _;
    const N: usize = 60;
    let s = Space::new().await;
    let b = s.broker("&restore_interval=3600").await;
    let batch: Vec<Message> = (0..N).map(|n| message(n, 0)).collect();
    b.publish_batch("cxl", &batch).await.unwrap();
    // Prefetch 4: many small fetches. Polling `next()` once starts a fetch and then drops the future
    // while the fetch is in flight; nothing it fetched may be stranded.
    let mut c = b.consume(&queue("cxl"), 4).await.unwrap();
    let mut seen = Vec::new();
    let mut cut_short = 0;
    let mut round = 0;
    while seen.len() < N {
        round += 1;
        let d = match c.next().now_or_never() {
            Some(d) => d.unwrap().unwrap(),
            None => {
                cut_short += 1;
                if round % 2 == 0 {
                    continue;
                }
                next(&mut c).await
            }
        };
        seen.push(task_id(&d));
        d.ack().await.unwrap();
    }
    println!("{cut_short} calls to next() were cut short");
    assert!(cut_short > 5, "the test did not cancel any fetch");
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), N);
    assert_eq!(s.unacked().await, (0, 0), "nothing stranded as unacked");
    c.close().await.unwrap();
}

#[tokio::test]
async fn close_gives_back_unacked_in_order() {
    let s = Space::new().await;
    let b = s.broker("&restore_interval=3600").await;
    for n in 1..=3 {
        b.publish("cls", &message(n, 0)).await.unwrap();
    }
    let mut c = b.consume(&queue("cls"), 3).await.unwrap();
    let d1 = next(&mut c).await;
    let _d2 = next(&mut c).await;
    // The third is fetched in the same batch and buffered: it is outstanding too.
    assert_eq!(s.unacked().await, (3, 3));
    c.close().await.unwrap();
    assert!(c.next().await.unwrap().is_none());
    assert_eq!(s.unacked().await, (0, 0));
    assert_eq!(b.queue_len("cls").await.unwrap(), 3);

    let mut c2 = b.consume(&queue("cls"), 3).await.unwrap();
    let mut order = Vec::new();
    let mut again = Vec::new();
    for _ in 0..3 {
        let d = next(&mut c2).await;
        order.push((task_id(&d), d.redelivered));
        again.push(d);
    }
    assert_eq!(
        order,
        [
            ("task-1".into(), true),
            ("task-2".into(), true),
            ("task-3".into(), true)
        ]
    );
    // Acking a delivery of the closed consumer is harmless.
    d1.ack().await.unwrap();
    assert_eq!(s.unacked().await, (3, 3));
    for d in again {
        d.ack().await.unwrap();
    }
    assert_eq!(s.unacked().await, (0, 0));
    c2.close().await.unwrap();
}

#[tokio::test]
async fn dropped_consumer_gives_back_unacked() {
    let s = Space::new().await;
    let b = s.broker("&restore_interval=3600").await;
    b.publish("drp", &message(1, 0)).await.unwrap();
    let mut c = b.consume(&queue("drp"), 1).await.unwrap();
    let _d = next(&mut c).await;
    drop(c);
    let deadline = Instant::now() + PATIENCE;
    while b.queue_len("drp").await.unwrap() == 0 {
        assert!(Instant::now() < deadline, "not given back");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(s.unacked().await, (0, 0));
}

#[tokio::test]
async fn broker_close_stops_consumers() {
    let s = Space::new().await;
    let b = s.broker("&restore_interval=3600").await;
    b.publish("bc", &message(1, 0)).await.unwrap();
    let mut c = b.consume(&queue("bc"), 1).await.unwrap();
    let _d = next(&mut c).await;
    b.close().await.unwrap();
    let after = tokio::time::timeout(PATIENCE, c.next()).await.unwrap();
    assert!(after.unwrap().is_none());
    assert_eq!(s.unacked().await, (0, 0), "given back on close");
    assert!(matches!(
        b.publish("bc", &message(2, 0)).await,
        Err(BrokerError::Closed)
    ));
}

#[tokio::test]
async fn purge_and_queue_len() {
    let s = Space::new().await;
    let b = s.broker("").await;
    assert_eq!(b.queue_len("pq").await.unwrap(), 0);
    assert_eq!(b.purge("pq").await.unwrap(), 0);
    let batch: Vec<Message> = (0..10).map(|n| message(n, n as u8)).collect();
    b.publish_batch("pq", &batch).await.unwrap();
    b.publish("other", &message(0, 0)).await.unwrap();
    assert_eq!(b.queue_len("pq").await.unwrap(), 10);
    assert_eq!(b.purge("pq").await.unwrap(), 10);
    assert_eq!(b.queue_len("pq").await.unwrap(), 0);
    assert_eq!(b.queue_len("other").await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_consumer_picks_up_later_messages() {
    let s = Space::new().await;
    let b = Arc::new(s.broker("").await);
    let mut c = b.consume(&queue("idle"), 1).await.unwrap();
    let waiting = tokio::spawn(async move {
        let d = tokio::time::timeout(PATIENCE, c.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        (c, d)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    b.publish("idle", &message(1, 0)).await.unwrap();
    let (mut c, d) = waiting.await.unwrap();
    assert_eq!(task_id(&d), "task-1");
    assert_eq!(s.unacked().await, (1, 1));
    d.ack().await.unwrap();

    // Latency while idle, for information only (not asserted): from the start of publish(), and from
    // its return (the message is in Redis by then), to the delivery; a PING round trip for scale.
    let (mut from_start, mut from_pushed, mut ping) = (Vec::new(), Vec::new(), Vec::new());
    for n in 0..20 {
        let t = Instant::now();
        let _: String = redis::cmd("PING")
            .query_async(&mut s.raw.clone())
            .await
            .unwrap();
        ping.push(t.elapsed().as_micros());
        let b = b.clone();
        let publisher = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let t = Instant::now();
            b.publish("idle", &message(n, 6)).await.unwrap();
            (t, Instant::now())
        });
        let d = next(&mut c).await;
        let got = Instant::now();
        let (started, pushed) = publisher.await.unwrap();
        from_start.push(got.saturating_duration_since(started).as_micros());
        from_pushed.push(got.saturating_duration_since(pushed).as_micros());
        d.ack().await.unwrap();
    }
    let median = |v: &mut Vec<u128>| {
        v.sort_unstable();
        v[v.len() / 2]
    };
    println!(
        "idle pickup latency, median: {} µs from publish start, {} µs from publish return (PING {} µs)",
        median(&mut from_start),
        median(&mut from_pushed),
        median(&mut ping)
    );
    assert_eq!(s.unacked().await, (0, 0));
    c.close().await.unwrap();
}

/// An idle consumer's fetch waits in Redis, queued behind its blocking wait: it takes (and records)
/// a message even while no one polls the consumer, a cancelled `next()` leaves it to the next call,
/// and closing ends the wait without taking anything more.
#[tokio::test]
async fn idle_wait_survives_a_cancelled_next_and_ends_on_close() {
    let s = Space::new().await;
    let b = s.broker("&restore_interval=3600").await;
    let mut c = b.consume(&queue("idle"), 4).await.unwrap();
    let waited = tokio::time::timeout(Duration::from_millis(200), c.next()).await;
    assert!(waited.is_err(), "nothing to take yet");
    b.publish("idle", &message(1, 0)).await.unwrap();
    let deadline = Instant::now() + PATIENCE;
    while s.unacked().await != (1, 1) {
        assert!(
            Instant::now() < deadline,
            "the waiting fetch never took the message"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let d = next(&mut c).await;
    assert_eq!(task_id(&d), "task-1");
    d.ack().await.unwrap();
    let waited = tokio::time::timeout(Duration::from_millis(200), c.next()).await;
    assert!(waited.is_err(), "waiting again");
    c.close().await.unwrap();
    b.publish("idle", &message(2, 0)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        b.queue_len("idle").await.unwrap(),
        1,
        "a closed consumer takes nothing"
    );
    assert_eq!(s.unacked().await, (0, 0));
}

#[tokio::test]
async fn malformed_envelopes_are_dead_lettered() {
    let s = Space::new().await;
    let b = s.broker("").await;
    let mut raw = s.raw.clone();
    let garbage: &[u8] = b"not json \xff";
    let undecodable =
        br#"{"body": "x", "properties": {"body_encoding": "rot13", "delivery_tag": "bad-1"}}"#;
    let _: () = raw.lpush(s.key("mal"), garbage).await.unwrap();
    let _: () = raw.lpush(s.key("mal"), &undecodable[..]).await.unwrap();
    b.publish("mal", &message(1, 0)).await.unwrap();
    let mut c = b.consume(&queue("mal"), 4).await.unwrap();
    let d = next(&mut c).await;
    assert_eq!(task_id(&d), "task-1");
    // Both bad ones are kept, byte for byte, in the dead-letter list; only the good one is unacked.
    // (The one that fails to decode in Rust is moved there in the background.)
    let deadline = Instant::now() + PATIENCE;
    while s.llen("mal.celerity.dead").await < 2 {
        assert!(Instant::now() < deadline, "not dead-lettered");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut dead = s.lrange("mal.celerity.dead").await;
    dead.sort();
    let mut expected = vec![garbage.to_vec(), undecodable.to_vec()];
    expected.sort();
    assert_eq!(dead, expected);
    assert_eq!(s.unacked().await, (1, 1));
    d.ack().await.unwrap();
    assert_eq!(s.unacked().await, (0, 0));
    // The consumer goes on.
    b.publish("mal", &message(2, 0)).await.unwrap();
    assert_eq!(task_id(&next(&mut c).await), "task-2");
    c.close().await.unwrap();
}

#[tokio::test]
async fn bad_urls_and_unreachable_servers() {
    let url = BrokerUrl::parse("redis://127.0.0.1:1/0").unwrap();
    let r = tokio::time::timeout(Duration::from_secs(20), RedisBroker::connect(&url))
        .await
        .expect("connect hung");
    match r {
        Err(BrokerError::Connect { url, reason }) => {
            assert!(url.contains("127.0.0.1:1"));
            assert!(!reason.is_empty());
        }
        other => panic!("expected Connect, got {other:?}"),
    }
    // A TLS handshake that fails: a Connect error (also when no rustls crypto provider is compiled
    // in). The server accepts and hangs up at once.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            drop(sock);
        }
    });
    let tls = BrokerUrl::parse(&format!("rediss://127.0.0.1:{port}/0")).unwrap();
    let r = tokio::time::timeout(Duration::from_secs(20), RedisBroker::connect(&tls))
        .await
        .expect("connect hung");
    assert!(
        matches!(r, Err(BrokerError::Connect { .. })),
        "rediss: {r:?}"
    );
    for bad in [
        "redis://127.0.0.1:6379/0?visibilty_timeout=5",
        "redis://127.0.0.1:6379/0?visibility_timeout=-1",
        "redis://127.0.0.1:6379/0?restore_interval=abc",
    ] {
        let r = RedisBroker::connect(&BrokerUrl::parse(bad).unwrap()).await;
        assert!(
            matches!(r, Err(BrokerError::InvalidUrl { .. })),
            "{bad}: {r:?}"
        );
    }
    // Through the generic entry point too.
    assert!(celerity_broker::connect_broker(
        "redis://127.0.0.1:6379/0?global_keyprefix=celtest:x:"
    )
    .await
    .is_ok());
}

#[tokio::test]
async fn consumer_survives_a_connection_drop() {
    let s = Space::new().await;
    let direct = s.broker("&restore_interval=3600").await;
    let proxy = TcpProxy::start("127.0.0.1:6379").await;
    let url = format!(
        "redis://127.0.0.1:{}/0?global_keyprefix={}&restore_interval=3600",
        proxy.port(),
        s.prefix
    );
    let b = RedisBroker::connect(&BrokerUrl::parse(&url).unwrap())
        .await
        .unwrap();
    let mut c = b.consume(&queue("flaky"), 2).await.unwrap();
    direct.publish("flaky", &message(1, 0)).await.unwrap();
    next(&mut c).await.ack().await.unwrap();

    // Cut while the consumer is idle (waiters blocked, shared connection up).
    let waiting = tokio::spawn(async move {
        let d = next(&mut c).await;
        (c, d)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(200)).await;
    direct.publish("flaky", &message(2, 0)).await.unwrap();
    let (mut c, d) = waiting.await.unwrap();
    assert_eq!(task_id(&d), "task-2");
    // Cut between delivery and ack: the ack is retried over a new connection.
    proxy.cut();
    d.ack().await.unwrap();
    assert_eq!(s.unacked().await, (0, 0));
    direct.publish("flaky", &message(3, 0)).await.unwrap();
    let d = next(&mut c).await;
    assert_eq!(task_id(&d), "task-3");
    d.ack().await.unwrap();
    assert_eq!(s.unacked().await, (0, 0));
    c.close().await.unwrap();
}

/// Interop with the real kombu 5.7 (Python) from the pinned venv.
#[tokio::test]
async fn python_kombu_interop() {
    let Some(python) = support::celery_python() else {
        return;
    };
    let s = Space::new().await;
    let b = s.broker("").await;
    b.publish("interop", &message(42, 3)).await.unwrap();
    let script = r#"
import json, sys
from kombu import Connection, Exchange, Queue, Producer
prefix = sys.argv[1]
with Connection('redis://127.0.0.1:6379/0', transport_options={'global_keyprefix': prefix}) as conn:
    q = Queue('interop', Exchange('interop', type='direct'), routing_key='interop')
    got = []
    def on(body, message):
        got.append({'body': message.body.decode() if isinstance(message.body, bytes) else message.body,
                    'headers': message.headers, 'priority': message.properties.get('priority'),
                    'correlation_id': message.properties.get('correlation_id'),
                    'content_type': message.content_type})
        message.ack()
    with conn.Consumer(q, callbacks=[on], accept=['json']):
        conn.drain_events(timeout=5)
    Producer(conn).publish({'from': 'python'}, exchange='', routing_key='frompy', serializer='json',
                           headers={'task': 'py.task', 'id': 'py-1'}, priority=6, correlation_id='py-1')
    print(json.dumps(got))
"#;
    let out = tokio::process::Command::new(&python)
        .arg("-c")
        .arg(script)
        .arg(&s.prefix)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        got[0]["body"],
        json!(r#"[[42, "h\u00e9"], {}, {"callbacks": null}]"#)
    );
    assert_eq!(got[0]["headers"]["id"], json!("task-42"));
    assert_eq!(got[0]["priority"], json!(3));
    assert_eq!(got[0]["correlation_id"], json!("task-42"));
    assert_eq!(got[0]["content_type"], json!("application/json"));
    // kombu acked it from the structures we share.
    assert_eq!(s.unacked().await, (0, 0));
    assert_eq!(b.queue_len("interop").await.unwrap(), 0);

    // And what kombu published, we consume.
    let mut c = b.consume(&queue("frompy"), 1).await.unwrap();
    let d = next(&mut c).await;
    assert_eq!(d.message.body, br#"{"from": "python"}"#);
    assert_eq!(d.message.task_id(), Some("py-1"));
    assert_eq!(d.message.properties.priority, 6);
    assert_eq!(d.message.properties.content_type, "application/json");
    d.ack().await.unwrap();
    assert_eq!(s.unacked().await, (0, 0));
    c.close().await.unwrap();

    // Each side's restore sweep brings back what the other left unacked.
    let sweep = r#"
import os, sys
from kombu import Connection
prefix, mode = sys.argv[1], sys.argv[2]
conn = Connection('redis://127.0.0.1:6379/0',
                  transport_options={'global_keyprefix': prefix, 'visibility_timeout': 0})
ch = conn.default_channel
if mode == 'restore':
    ch.qos.restore_visible(num=100)
    print('restored')
else:
    m = ch.basic_get('frompy2', no_ack=False)
    print(m.headers['id'], flush=True)
    os._exit(0)  # die holding the unacked message
"#;
    let run_python = |mode: &'static str| {
        let prefix = s.prefix.clone();
        let python = python.clone();
        async move {
            let out = tokio::process::Command::new(&python)
                .arg("-c")
                .arg(sweep)
                .arg(prefix)
                .arg(mode)
                .output()
                .await
                .unwrap();
            assert!(
                out.status.success(),
                "python failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        }
    };
    // Ours, restored by kombu.
    b.publish("ours", &message(5, 0)).await.unwrap();
    let mut c = b.consume(&queue("ours"), 1).await.unwrap();
    let held = next(&mut c).await;
    assert_eq!(run_python("restore").await, "restored");
    assert_eq!(s.unacked().await, (0, 0));
    held.ack().await.unwrap(); // too late: harmless
    let d = next(&mut c).await;
    assert_eq!((task_id(&d), d.redelivered), ("task-5".into(), true));
    d.ack().await.unwrap();
    c.close().await.unwrap();
    // kombu's, restored by us.
    b.publish("frompy2", &message(6, 0)).await.unwrap();
    assert_eq!(run_python("take").await, "task-6");
    assert_eq!(s.unacked().await, (1, 1));
    let rescuer = s
        .broker("&visibility_timeout=0&restore_interval=3600")
        .await;
    assert_eq!(rescuer.restore_visible().await.unwrap(), 1);
    let mut c = rescuer.consume(&queue("frompy2"), 1).await.unwrap();
    let d = next(&mut c).await;
    assert_eq!((task_id(&d), d.redelivered), ("task-6".into(), true));
    d.ack().await.unwrap();
    assert_eq!(s.unacked().await, (0, 0));
    c.close().await.unwrap();
}

/// A parked delivery leaves `unacked` (no visibility timeout can hand it out early, no worker holds
/// it) for `celerity.scheduled`, and a consumer's forwarder puts it back on its queue when due.
#[tokio::test]
async fn parked_messages_wait_in_redis_and_come_back_when_due() {
    let s = Space::new().await;
    let b = s.broker("").await;
    b.publish("later", &message(7, 0)).await.unwrap();
    let mut c = b.consume(&queue("later"), 4).await.unwrap();
    let d = next(&mut c).await;
    let due = std::time::SystemTime::now() + Duration::from_millis(1500);
    assert!(d.can_park(due));
    d.park(due).await.unwrap();
    assert_eq!(s.unacked().await, (0, 0));
    let mut raw = s.raw.clone();
    let parked: usize = raw
        .zcard(s.key("celerity.scheduled").as_str())
        .await
        .unwrap();
    assert_eq!(parked, 1);
    assert_eq!(b.queue_len("later").await.unwrap(), 0);
    // Not before it is due...
    assert!(
        tokio::time::timeout(Duration::from_millis(1000), c.next())
            .await
            .is_err(),
        "came back early"
    );
    // ...and then it is delivered again.
    let again = next(&mut c).await;
    assert!(std::time::SystemTime::now() >= due);
    assert_eq!(task_id(&again), "task-7");
    again.ack().await.unwrap();
    let parked: usize = raw
        .zcard(s.key("celerity.scheduled").as_str())
        .await
        .unwrap();
    assert_eq!(parked, 0);
    c.close().await.unwrap();
}

/// Handles on one wait lock, each its own open file description, as each process of a pool has.
fn wait_locks(n: usize) -> Vec<Arc<celerity_broker::WaitLock>> {
    use std::os::fd::AsRawFd;
    let path = std::env::temp_dir().join(format!("celtest-wait-{}", uuid::Uuid::new_v4()));
    let file = std::fs::File::create(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    (0..n)
        .map(|_| celerity_broker::WaitLock::reopen_inherited(file.as_raw_fd()).unwrap())
        .collect()
}

/// Polls `cond` until it holds (a bound so a broken test fails instead of hanging).
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {PATIENCE:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Two consumers of a pool (own brokers, one wait lock): only one waits on Redis at a time; the
/// holder gets the message, and once its prefetch window is full the other one takes over the wait
/// and gets the next.
#[tokio::test]
async fn pool_consumers_take_turns_waiting() {
    let s = Space::new().await;
    let locks = wait_locks(2);
    let (l0, l1) = (locks[0].clone(), locks[1].clone());
    let (b0, b1) = (s.broker("").await, s.broker("").await);
    b0.share_wait_lock(l0.clone());
    b1.share_wait_lock(l1.clone());
    let c0 = b0.consume(&queue("turns"), 1).await.unwrap();
    let mut c1 = b1.consume(&queue("turns"), 1).await.unwrap();
    let spawn_next = |mut c: Box<dyn Consumer>| {
        tokio::spawn(async move {
            let d = tokio::time::timeout(PATIENCE, c.next()).await;
            (c, d)
        })
    };
    let w0 = spawn_next(c0);
    eventually("the first consumer waits holding the lock", || l0.is_held()).await;
    let w1 = spawn_next(c1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !l1.is_held(),
        "both consumers of the pool hold the wait lock"
    );

    b0.publish("turns", &message(1, 0)).await.unwrap();
    let (c0, d) = w0.await.unwrap();
    let first = d.expect("the holder got nothing").unwrap().unwrap();
    assert_eq!(task_id(&first), "task-1");
    // c0's window (1) is full while `first` is unacked: its next fetch cannot start, so it lets go
    // and the other consumer takes over the wait.
    let w0 = spawn_next(c0);
    eventually("the sibling takes over the wait", || l1.is_held()).await;
    assert!(!l0.is_held());
    b0.publish("turns", &message(2, 0)).await.unwrap();
    let (c, d) = w1.await.unwrap();
    c1 = c;
    let second = d.expect("the sibling got nothing").unwrap().unwrap();
    assert_eq!(task_id(&second), "task-2");

    first.ack().await.unwrap();
    second.ack().await.unwrap();
    w0.abort();
    let _ = w0.await;
    c1.close().await.unwrap();
    assert!(!l1.is_held(), "a closed consumer kept the wait lock");
    assert_eq!(s.unacked().await, (0, 0));
    let _ = (b0.close().await, b1.close().await);
}

/// A consumer whose pool's wait lock is held elsewhere for good (a stuck sibling) still finds the
/// work by looking for itself.
#[tokio::test]
async fn a_consumer_without_its_turn_still_finds_work() {
    let s = Space::new().await;
    let locks = wait_locks(2);
    let b = s.broker("").await;
    b.share_wait_lock(locks[0].clone());
    let stuck = locks[1].clone();
    assert!(stuck.try_take());
    let mut c = b.consume(&queue("stuck"), 4).await.unwrap();
    b.publish("stuck", &message(7, 0)).await.unwrap();
    let d = next(&mut c).await;
    assert_eq!(task_id(&d), "task-7");
    d.ack().await.unwrap();
    // And later ones too, while the lock stays taken.
    let later = tokio::spawn({
        let b = s.broker("").await;
        async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            b.publish("stuck", &message(8, 0)).await.unwrap();
        }
    });
    let d = next(&mut c).await;
    assert_eq!(task_id(&d), "task-8");
    d.ack().await.unwrap();
    later.await.unwrap();
    assert!(stuck.is_held() && !locks[0].is_held());
    c.close().await.unwrap();
    assert_eq!(s.unacked().await, (0, 0));
}
