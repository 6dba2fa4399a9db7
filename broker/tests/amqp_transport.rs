//! The `amqp://` transport against the real RabbitMQ at 127.0.0.1:5672 (guest/guest).
//!
//! Every test uses its own queue names (with a uuid) and deletes its queues and exchanges at the end,
//! even when it fails (a drop guard). The forced-disconnect test uses `rabbitmqctl`; the interop tests
//! use the pinned Python Celery venv (`scripts/celery-venv.sh`); `CELERITY_NO_PYTHON=1` skips them.

#![cfg(feature = "amqp")]

mod support;

use std::collections::HashSet;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use celerity_broker::{
    connect_broker, Broker, BrokerError, Consumer, Delivery, Message, Properties,
};
use lapin::options::{
    BasicPublishOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use serde_json::{json, Value};

const URL: &str = "amqp://guest:guest@127.0.0.1:5672//";
const ADMIN_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Unique queue names, deleted (with their exchanges) when dropped.
struct Queues(Vec<String>);

impl Queues {
    fn new(tag: &str, n: usize) -> Self {
        let id = uuid::Uuid::new_v4().simple();
        Queues(
            (0..n)
                .map(|i| format!("celerity-test-{tag}-{id}-{i}"))
                .collect(),
        )
    }
    fn name(&self, i: usize) -> &str {
        &self.0[i]
    }
}

impl Drop for Queues {
    fn drop(&mut self) {
        let names = std::mem::take(&mut self.0);
        // Its own thread and runtime, so it also runs while a failed test unwinds.
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let conn = admin().await;
                let ch = conn.create_channel().await.unwrap();
                for q in &names {
                    let _ = ch
                        .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                        .await;
                    let _ = ch
                        .exchange_delete(q.as_str().into(), ExchangeDeleteOptions::default())
                        .await;
                }
                let _ = conn.close(200, "OK".into()).await;
            });
        });
        let _ = cleanup.join();
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

#[tokio::test]
async fn round_trip_preserves_the_message() {
    let qs = Queues::new("roundtrip", 1);
    let b = broker("").await;
    let sent = Message {
        properties: Properties {
            content_type: "application/json".into(),
            content_encoding: "utf-8".into(),
            correlation_id: Some("d5c6f2a1-3b4e-4c8d-9f10-2a3b4c5d6e7f".into()),
            reply_to: Some("8f1c2d3e-4a5b-3c6d-8e7f-90a1b2c3d4e5".into()),
            delivery_mode: 2,
            priority: 0,
            expiration: Some("600000".into()),
        },
        headers: json!({
            "lang": "py", "task": "proj.tasks.add", "id": "d5c6f2a1-3b4e-4c8d-9f10-2a3b4c5d6e7f",
            "eta": null, "retries": 3, "timelimit": [10, 5.5], "neg": -42, "big": 9_007_199_254_740_993i64,
            "stamps": {"a": {"b": [1, null, "x"]}, "empty": {}}, "ignore_result": false,
            "argsrepr": "('héllo', '✓ 日本')", "nested": [[], [{}], [[1.25]]]
        })
        .as_object()
        .unwrap()
        .clone(),
        body: vec![0, 159, 146, 150, b'{', 255],
    };
    b.publish(qs.name(0), &sent).await.unwrap();
    let mut c = b.consume(&[qs.name(0).to_owned()], 4).await.unwrap();
    let d = next_within(&mut c, 10.0).await.expect("the message");
    assert_eq!(d.message, sent);
    assert_eq!(d.queue, qs.name(0));
    assert!(!d.redelivered);
    d.ack().await.unwrap();
    c.close().await.unwrap();
    assert_eq!(b.queue_len(qs.name(0)).await.unwrap(), 0);
    b.close().await.unwrap();
}

#[tokio::test]
async fn declares_the_topology_celery_declares() {
    let qs = Queues::new("topology", 1);
    let q = qs.name(0);
    let b = broker("").await;
    b.declare_queue(q).await.unwrap();

    let conn = admin().await;
    let ch = conn.create_channel().await.unwrap();
    let durable_exchange = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let durable_queue = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    // Celery's exact flags are accepted (RabbitMQ refuses any difference with 406)...
    ch.exchange_declare(
        q.into(),
        ExchangeKind::Direct,
        durable_exchange,
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_declare(q.into(), durable_queue, FieldTable::default())
        .await
        .unwrap();
    // ...and different ones are refused: the exchange is direct and the queue durable.
    let as_topic = ch
        .exchange_declare(
            q.into(),
            ExchangeKind::Topic,
            durable_exchange,
            FieldTable::default(),
        )
        .await;
    assert!(as_topic.is_err(), "the exchange must be direct");
    let ch = conn.create_channel().await.unwrap();
    let transient = ch
        .queue_declare(
            q.into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert!(transient.is_err(), "the queue must be durable");

    // The binding: publishing to exchange `q` with key `q` lands in queue `q`.
    let ch = conn.create_channel().await.unwrap();
    ch.basic_publish(
        q.into(),
        q.into(),
        BasicPublishOptions::default(),
        b"via the exchange",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    assert_eq!(wait_len(&b, q, 1).await, 1);
    conn.close(200, "OK".into()).await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test]
async fn batch_of_5000_is_consumed_exactly_once_by_two_consumers() {
    const N: usize = 5000;
    let qs = Queues::new("batch", 1);
    let q = qs.name(0).to_owned();
    let b = broker("").await;
    b.declare_queue(&q).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, u64)>();
    let got = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for who in 0..2 {
        let mut c = b.consume(std::slice::from_ref(&q), 50).await.unwrap();
        let (tx, got) = (tx.clone(), got.clone());
        tasks.push(tokio::spawn(async move {
            while got.load(Ordering::SeqCst) < N {
                let Some(d) = next_within(&mut c, 0.5).await else {
                    continue;
                };
                tx.send((who, n_of(&d))).unwrap();
                d.ack().await.unwrap();
                got.fetch_add(1, Ordering::SeqCst);
            }
            c.close().await.unwrap();
        }));
    }
    drop(tx);
    let batch: Vec<Message> = (0..N).map(msg).collect();
    b.publish_batch(&q, &batch).await.unwrap();

    let mut seen = HashSet::new();
    let mut per_consumer = [0usize; 2];
    let collect = async {
        while let Some((who, n)) = rx.recv().await {
            assert!(seen.insert(n), "message {n} delivered twice");
            per_consumer[who] += 1;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), collect)
        .await
        .expect("all consumers finish");
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(seen.len(), N);
    assert_eq!(seen, (0..N as u64).collect::<HashSet<_>>());
    assert!(
        per_consumer.iter().all(|&k| k > 0),
        "both consumers take part: {per_consumer:?}"
    );
    assert_eq!(b.queue_len(&q).await.unwrap(), 0);
    b.close().await.unwrap();
}

#[tokio::test]
async fn prefetch_window_holds_back_the_third_delivery_until_an_ack() {
    let qs = Queues::new("prefetch", 1);
    let q = qs.name(0).to_owned();
    let b = broker("").await;
    b.publish_batch(&q, &[msg(0), msg(1), msg(2)])
        .await
        .unwrap();
    let mut c = b.consume(std::slice::from_ref(&q), 2).await.unwrap();
    let first = next_within(&mut c, 10.0).await.expect("first");
    let second = next_within(&mut c, 10.0).await.expect("second");
    assert_eq!((n_of(&first), n_of(&second)), (0, 1));
    assert!(
        next_within(&mut c, 0.5).await.is_none(),
        "a third delivery while two are unacked"
    );
    first.ack().await.unwrap();
    let third = next_within(&mut c, 10.0).await.expect("third after an ack");
    assert_eq!(n_of(&third), 2);

    // A wider window applies to the running consumer, and nothing already delivered is lost.
    b.publish_batch(&q, &[msg(3), msg(4)]).await.unwrap();
    c.set_prefetch(4).await.unwrap();
    let mut more = Vec::new();
    while let Some(d) = next_within(&mut c, 2.0).await {
        more.push(n_of(&d));
        if more.len() == 2 {
            break;
        }
    }
    assert_eq!(more, [3, 4], "two more fit in a window of 4");
    c.close().await.unwrap();
    drop((second, third));
    b.close().await.unwrap();
}

#[tokio::test]
async fn prefetch_window_spans_all_queues_of_a_consumer() {
    let qs = Queues::new("multi", 2);
    let b = broker("").await;
    for i in 0..2 {
        b.publish_batch(qs.name(i), &[msg(10 * i), msg(10 * i + 1)])
            .await
            .unwrap();
    }
    let mut c = b.consume(&qs.0, 2).await.unwrap();
    let first = next_within(&mut c, 10.0).await.expect("first");
    let _second = next_within(&mut c, 10.0).await.expect("second");
    assert!(
        next_within(&mut c, 0.5).await.is_none(),
        "the window of 2 covers both queues together"
    );
    first.ack().await.unwrap();
    let third = next_within(&mut c, 10.0).await.expect("third after an ack");
    assert!(qs.0.contains(&third.queue));
    c.close().await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test]
async fn reject_requeues_or_drops() {
    let qs = Queues::new("reject", 1);
    let q = qs.name(0).to_owned();
    let b = broker("").await;
    b.publish(&q, &msg(7)).await.unwrap();
    let mut c = b.consume(std::slice::from_ref(&q), 1).await.unwrap();
    let d = next_within(&mut c, 10.0).await.unwrap();
    assert!(!d.redelivered);
    d.reject(true).await.unwrap();
    let again = next_within(&mut c, 10.0).await.expect("requeued");
    assert!(again.redelivered);
    assert_eq!(n_of(&again), 7);
    again.reject(false).await.unwrap();
    assert!(next_within(&mut c, 0.5).await.is_none(), "dropped for good");
    assert_eq!(b.queue_len(&q).await.unwrap(), 0);
    c.close().await.unwrap();
    b.close().await.unwrap();
}

/// Acks sent together (`basic.ack` with `multiple`) settle exactly the deliveries acked: a delivery
/// held back in the middle, rejects among the acks, two queues merged on one channel.
#[tokio::test]
async fn grouped_acks_settle_exactly_what_was_acked() {
    use futures_util::FutureExt as _;
    let qs = Queues::new("grouped", 2);
    let names = [qs.name(0).to_owned(), qs.name(1).to_owned()];
    let b = broker("").await;
    for n in 0..40 {
        b.publish(&names[n % 2], &msg(n)).await.unwrap();
    }
    let mut c = b.consume(&names, 64).await.unwrap();
    let mut held = None;
    let mut settles = Vec::new();
    for _ in 0..40 {
        let d = next_within(&mut c, 10.0).await.expect("all 40 delivered");
        match n_of(&d) {
            5 => held = Some(d),
            n if n % 7 == 3 => settles.push(d.reject(true).boxed()),
            _ => settles.push(d.ack().boxed()),
        }
    }
    for r in futures_util::future::join_all(settles).await {
        r.unwrap();
    }
    let mut back = Vec::new();
    for _ in 0..6 {
        let d = next_within(&mut c, 10.0).await.expect("the rejected ones");
        assert!(d.redelivered);
        back.push(n_of(&d));
        d.ack().await.unwrap();
    }
    back.sort_unstable();
    assert_eq!(back, [3, 10, 17, 24, 31, 38]);
    assert!(
        next_within(&mut c, 0.5).await.is_none(),
        "nothing else comes back"
    );
    // Closing with one delivery unacked gives back that one only.
    c.close().await.unwrap();
    drop(held);
    let left = wait_len(&b, &names[0], 0).await + wait_len(&b, &names[1], 1).await;
    assert_eq!(left, 1);
    let mut c = b.consume(&names, 64).await.unwrap();
    let d = next_within(&mut c, 10.0).await.expect("the held one");
    assert_eq!((n_of(&d), d.redelivered), (5, true));
    d.ack().await.unwrap();
    c.close().await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test]
async fn close_gives_unacked_deliveries_back() {
    let qs = Queues::new("close", 1);
    let q = qs.name(0).to_owned();
    let b = broker("").await;
    b.publish_batch(&q, &[msg(1), msg(2)]).await.unwrap();
    let mut c = b.consume(std::slice::from_ref(&q), 10).await.unwrap();
    let d1 = next_within(&mut c, 10.0).await.unwrap();
    let _d2 = next_within(&mut c, 10.0).await.unwrap();
    c.close().await.unwrap();
    assert!(c.next().await.unwrap().is_none(), "closed consumer ends");
    assert!(
        d1.ack().await.is_err(),
        "acking on a closed channel fails harmlessly"
    );
    assert_eq!(wait_len(&b, &q, 2).await, 2);

    let mut c2 = b.consume(std::slice::from_ref(&q), 10).await.unwrap();
    let mut ns = Vec::new();
    for _ in 0..2 {
        let d = next_within(&mut c2, 10.0).await.unwrap();
        assert!(d.redelivered);
        ns.push(n_of(&d));
        d.ack().await.unwrap();
    }
    ns.sort_unstable();
    assert_eq!(ns, [1, 2]);
    c2.close().await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test]
async fn purge_and_queue_len() {
    let qs = Queues::new("purge", 2);
    let (q, missing) = (qs.name(0), qs.name(1));
    let b = broker("").await;
    assert_eq!(b.queue_len(missing).await.unwrap(), 0);
    assert_eq!(b.purge(missing).await.unwrap(), 0);
    b.publish_batch(q, &[msg(1), msg(2), msg(3)]).await.unwrap();
    assert_eq!(b.queue_len(q).await.unwrap(), 3);
    assert_eq!(b.purge(q).await.unwrap(), 3);
    assert_eq!(b.queue_len(q).await.unwrap(), 0);
    // The publish channel is unharmed by the 404s above.
    b.publish(q, &msg(4)).await.unwrap();
    assert_eq!(b.queue_len(q).await.unwrap(), 1);
    b.close().await.unwrap();
}

#[tokio::test]
async fn max_priority_serves_higher_priority_first() {
    let qs = Queues::new("priority", 1);
    let q = qs.name(0).to_owned();
    let b = broker("?max_priority=10").await;
    let batch: Vec<Message> = [1u8, 9, 5]
        .iter()
        .map(|&p| {
            let mut m = msg(usize::from(p));
            m.properties.priority = p;
            m
        })
        .collect();
    b.publish_batch(&q, &batch).await.unwrap();

    // Declared with x-max-priority 10, as Celery's `task_queue_max_priority=10` does.
    let conn = admin().await;
    let ch = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-max-priority".into(), AMQPValue::LongInt(10));
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(q.as_str().into(), durable, args)
        .await
        .unwrap();
    conn.close(200, "OK".into()).await.unwrap();

    let mut c = b.consume(std::slice::from_ref(&q), 1).await.unwrap();
    let mut order = Vec::new();
    for _ in 0..3 {
        let d = next_within(&mut c, 10.0).await.unwrap();
        order.push(d.message.properties.priority);
        d.ack().await.unwrap();
    }
    assert_eq!(order, [9, 5, 1]);
    c.close().await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test]
async fn quorum_queues_are_declared_and_consumed() {
    let qs = Queues::new("quorum", 2);
    let b = broker("?queue_type=quorum").await;
    b.publish(qs.name(0), &msg(1)).await.unwrap();
    b.publish(qs.name(1), &msg(2)).await.unwrap();

    let conn = admin().await;
    let ch = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(qs.name(0).into(), durable, args)
        .await
        .expect("declared as a quorum queue");
    conn.close(200, "OK".into()).await.unwrap();

    // Two quorum queues in one consumer: no channel-wide prefetch (quorum queues refuse it).
    let mut c = b.consume(&qs.0, 4).await.unwrap();
    let mut ns = Vec::new();
    for _ in 0..2 {
        let d = next_within(&mut c, 10.0).await.expect("a delivery");
        ns.push(n_of(&d));
        d.ack().await.unwrap();
    }
    ns.sort_unstable();
    assert_eq!(ns, [1, 2]);
    c.close().await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test]
async fn unreachable_or_refusing_broker_is_a_connect_error() {
    let cases = [
        "amqp://guest:guest@127.0.0.1:1//?connect_timeout=2".to_owned(),
        "amqp://guest:wrong-password@127.0.0.1:5672//".to_owned(),
        format!(
            "amqp://guest:guest@127.0.0.1:5672/no-such-vhost-{}",
            uuid::Uuid::new_v4()
        ),
        // Nothing answers there: the timeout must fire.
        "amqp://guest:guest@10.255.255.1:5672//?connect_timeout=0.5".to_owned(),
    ];
    for url in cases {
        let res = tokio::time::timeout(Duration::from_secs(10), connect_broker(&url))
            .await
            .unwrap_or_else(|_| panic!("{url} hung"));
        match res {
            Err(BrokerError::Connect { url: shown, reason }) => {
                assert!(
                    !shown.contains("wrong-password"),
                    "password leaked: {shown}"
                );
                assert!(!reason.is_empty());
            }
            Err(other) => panic!("{url}: expected a Connect error, got {other}"),
            Ok(_) => panic!("{url}: connected?"),
        }
    }
    assert!(matches!(
        connect_broker("amqp://127.0.0.1//?prefetch=3").await,
        Err(BrokerError::InvalidUrl { .. })
    ));
}

/// Runs `rabbitmqctl` and returns its output rows as columns.
fn rabbitmqctl(args: &[&str]) -> Vec<Vec<String>> {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl");
    assert!(out.status.success(), "rabbitmqctl {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split('\t').map(str::to_owned).collect())
        .collect()
}

/// Closes (server side) every connection open in `vhost`, retrying the listing for a while (under load
/// `rabbitmqctl` can miss a connection that was opened a moment ago). Returns how many were closed.
fn force_close_vhost_connections(vhost: &str) -> usize {
    for _ in 0..50 {
        let conns: Vec<String> = rabbitmqctl(&["list_connections", "-q", "pid", "vhost"])
            .into_iter()
            .filter(|row| row.get(1).map(String::as_str) == Some(vhost))
            .filter_map(|row| row.first().cloned())
            .collect();
        if !conns.is_empty() {
            for conn in &conns {
                rabbitmqctl(&["close_connection", conn, "celerity test: forced close"]);
            }
            return conns.len();
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    0
}

#[tokio::test]
async fn consumer_survives_a_server_side_connection_close() {
    if !have_rabbitmqctl() {
        return;
    }
    // A private vhost, so the connections to close are ours and no other test's.
    let vhost = tokio::task::spawn_blocking(Vhost::new).await.unwrap();
    let q = "tasks".to_owned();
    let b = connect_broker(&format!("amqp://guest:guest@127.0.0.1:5672/{}", vhost.0))
        .await
        .unwrap();
    let mut c = b.consume(std::slice::from_ref(&q), 5).await.unwrap();
    b.publish(&q, &msg(1)).await.unwrap();
    let before = next_within(&mut c, 10.0).await.unwrap();

    let vh = vhost.0.clone();
    let closed = tokio::task::spawn_blocking(move || force_close_vhost_connections(&vh))
        .await
        .unwrap();
    assert!(closed >= 1, "our connection is listed");
    assert!(
        before.ack().await.is_err(),
        "an ack on the dead channel fails harmlessly"
    );
    b.publish(&q, &msg(2)).await.unwrap();
    // The unacked message 1 comes back (redelivered) along with message 2.
    let mut got = Vec::new();
    while got.len() < 2 {
        let d = next_within(&mut c, 30.0)
            .await
            .expect("a delivery after reconnecting");
        got.push((n_of(&d), d.redelivered));
        d.ack().await.unwrap();
    }
    got.sort_unstable();
    assert_eq!(got, [(1, true), (2, false)]);
    c.close().await.unwrap();
    b.close().await.unwrap();
    tokio::task::spawn_blocking(move || drop(vhost))
        .await
        .unwrap();
}

/// A private vhost (so its connections can be told apart), deleted with everything in it when dropped.
struct Vhost(String);

impl Vhost {
    fn new() -> Self {
        let name = format!("celerity-test-{}", uuid::Uuid::new_v4().simple());
        rabbitmqctl(&["add_vhost", &name]);
        rabbitmqctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]);
        Vhost(name)
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_vhost", &self.0])
            .output();
    }
}

fn have_rabbitmqctl() -> bool {
    let ok = Command::new("rabbitmqctl").arg("--help").output().is_ok();
    if !ok {
        eprintln!("SKIPPED: rabbitmqctl is not available");
    }
    ok
}

#[tokio::test]
async fn publisher_reconnects_after_a_server_side_close() {
    if !have_rabbitmqctl() {
        return;
    }
    let vhost = tokio::task::spawn_blocking(Vhost::new).await.unwrap();
    let b = connect_broker(&format!("amqp://guest:guest@127.0.0.1:5672/{}", vhost.0))
        .await
        .unwrap();
    let q = "tasks";
    b.publish(q, &msg(1)).await.unwrap();

    let vh = vhost.0.clone();
    let closed = tokio::task::spawn_blocking(move || force_close_vhost_connections(&vh))
        .await
        .unwrap();
    assert_eq!(closed, 1, "just the publisher connection");

    b.publish(q, &msg(2)).await.unwrap();
    let batch: Vec<Message> = (3..103).map(msg).collect();
    b.publish_batch(q, &batch).await.unwrap();
    assert_eq!(b.queue_len(q).await.unwrap(), 102);
    b.close().await.unwrap();
    tokio::task::spawn_blocking(move || drop(vhost))
        .await
        .unwrap();
}

#[tokio::test]
async fn consumer_comes_back_when_its_queue_is_deleted() {
    let qs = Queues::new("deleted", 1);
    let q = qs.name(0).to_owned();
    let b = broker("").await;
    let mut c = b.consume(std::slice::from_ref(&q), 5).await.unwrap();
    let conn = admin().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    // The broker cancels our consumer; it re-declares the queue and consumes again.
    let next = tokio::spawn(async move {
        let d = next_within(&mut c, 30.0).await;
        (c, d)
    });
    let mut back = false;
    for _ in 0..200 {
        let ch = conn.create_channel().await.unwrap();
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        if let Ok(q) = ch
            .queue_declare(q.as_str().into(), passive, FieldTable::default())
            .await
        {
            if q.consumer_count() == 1 {
                back = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(back, "the queue is declared and consumed again");
    let ch = conn.create_channel().await.unwrap();
    ch.basic_publish(
        "".into(),
        q.as_str().into(),
        BasicPublishOptions::default(),
        b"after",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    let (mut c, d) = next.await.unwrap();
    let d = d.expect("a delivery after the consumer came back");
    assert_eq!(d.message.body, b"after");
    d.ack().await.unwrap();
    c.close().await.unwrap();
    conn.close(200, "OK".into()).await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test]
async fn closing_the_broker_stops_its_consumers() {
    let qs = Queues::new("brokerclose", 1);
    let q = qs.name(0).to_owned();
    let b = broker("").await;
    let mut c = b.consume(std::slice::from_ref(&q), 5).await.unwrap();
    let waiting = tokio::spawn(async move { c.next().await.map(|d| d.is_none()) });
    tokio::time::sleep(Duration::from_millis(100)).await;
    b.close().await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("next() returns after close")
        .unwrap();
    assert!(
        ended.unwrap(),
        "next() gives None once the broker is closed"
    );
    assert!(matches!(
        b.publish(&q, &msg(1)).await,
        Err(BrokerError::Closed)
    ));
}

fn python() -> Option<std::path::PathBuf> {
    support::celery_python()
}

#[tokio::test]
async fn decodes_a_task_sent_by_python_celery() {
    let Some(py) = python() else { return };
    let qs = Queues::new("pycelery", 1);
    let q = qs.name(0).to_owned();
    let script = r#"
import sys
from celery import Celery
app = Celery(broker="amqp://guest:guest@127.0.0.1:5672//")
r = app.send_task("demo.add", (2, 3), kwargs={"note": "héllo"}, queue=sys.argv[1],
                  time_limit=10, soft_time_limit=5.5)
print(r.id)
"#;
    let q2 = q.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(py).args(["-c", script, &q2]).output().unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "python: {out:?}");
    let id = String::from_utf8(out.stdout).unwrap().trim().to_owned();

    let b = broker("").await;
    let mut c = b.consume(std::slice::from_ref(&q), 1).await.unwrap();
    let d = next_within(&mut c, 10.0).await.expect("celery's message");
    let m = &d.message;
    assert_eq!(m.properties.content_type, "application/json");
    assert_eq!(m.properties.content_encoding, "utf-8");
    assert_eq!(m.properties.correlation_id.as_deref(), Some(id.as_str()));
    assert_eq!(m.properties.delivery_mode, 2);
    let h = &m.headers;
    assert_eq!(h["lang"], "py");
    assert_eq!(h["task"], "demo.add");
    assert_eq!(h["id"], id.as_str());
    assert_eq!(h["root_id"], id.as_str());
    assert_eq!(h["timelimit"], json!([10, 5.5]));
    assert_eq!(h["retries"], 0);
    assert_eq!(h["eta"], Value::Null);
    assert_eq!(h["parent_id"], Value::Null);
    assert_eq!(h["argsrepr"], "(2, 3)");
    // `send_task` passes `ignore_result=None` through (celery/app/base.py), so it arrives as null.
    assert_eq!(h["ignore_result"], Value::Null);
    assert_eq!(h["stamps"], json!({}));
    assert!(h["origin"].as_str().unwrap().starts_with("gen"));
    let body: Value = serde_json::from_slice(&m.body).unwrap();
    assert_eq!(
        body,
        json!([[2, 3], {"note": "héllo"},
               {"callbacks": null, "errbacks": null, "chain": null, "chord": null}])
    );
    d.ack().await.unwrap();
    c.close().await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test]
async fn python_kombu_reads_what_we_publish() {
    let Some(py) = python() else { return };
    let qs = Queues::new("pykombu", 1);
    let q = qs.name(0).to_owned();
    let b = broker("").await;
    let mut m = msg(5);
    m.properties.correlation_id = Some("abc".into());
    m.headers.insert("task".into(), json!("demo.add"));
    m.headers.insert("timelimit".into(), json!([null, 2.5]));
    m.headers
        .insert("stamps".into(), json!({"k": ["v", 1, true]}));
    m.headers.insert("argsrepr".into(), json!("('é',)"));
    b.publish(&q, &m).await.unwrap();

    let script = r#"
import json, sys
from kombu import Connection, Exchange, Queue
with Connection("amqp://guest:guest@127.0.0.1:5672//") as conn:
    q = Queue(sys.argv[1], Exchange(sys.argv[1], "direct"), sys.argv[1])
    msg = conn.SimpleQueue(q).get(timeout=10)
    msg.ack()
    body = msg.body.decode() if isinstance(msg.body, bytes) else msg.body
    print(json.dumps({"headers": msg.headers, "body": body,
                      "correlation_id": msg.properties.get("correlation_id"),
                      "delivery_mode": msg.properties.get("delivery_mode"),
                      "content_type": msg.content_type}))
"#;
    let q2 = q.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(py).args(["-c", script, &q2]).output().unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "python: {out:?}");
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(seen["headers"], Value::Object(m.headers.clone()));
    assert_eq!(seen["body"], "[[5], {}, {}]");
    assert_eq!(seen["correlation_id"], "abc");
    assert_eq!(seen["delivery_mode"], 2);
    assert_eq!(seen["content_type"], "application/json");
    assert_eq!(b.queue_len(&q).await.unwrap(), 0);
    b.close().await.unwrap();
}

/// Not a check: prints publish and consume rates. `cargo test … -- --ignored --nocapture throughput`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn throughput_report() {
    const N: usize = 50_000;
    let qs = Queues::new("throughput", 1);
    let q = qs.name(0).to_owned();
    let b = broker("").await;
    let batch: Vec<Message> = (0..1000).map(msg).collect();
    let t = std::time::Instant::now();
    for _ in 0..N / 1000 {
        b.publish_batch(&q, &batch).await.unwrap();
    }
    let batched = N as f64 / t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    for i in 0..2000 {
        b.publish(&q, &msg(i)).await.unwrap();
    }
    let single = 2000.0 / t.elapsed().as_secs_f64();
    let total = N + 2000;
    let mut c = b.consume(std::slice::from_ref(&q), 1000).await.unwrap();
    let t = std::time::Instant::now();
    let mut acks = tokio::task::JoinSet::new();
    for _ in 0..total {
        let d = next_within(&mut c, 10.0).await.unwrap();
        acks.spawn(d.ack());
    }
    while let Some(r) = acks.join_next().await {
        r.unwrap().unwrap();
    }
    let consumed = total as f64 / t.elapsed().as_secs_f64();
    println!("publish_batch: {batched:.0} msg/s, publish: {single:.0} msg/s, consume+ack: {consumed:.0} msg/s");
    c.close().await.unwrap();
    b.close().await.unwrap();
}
