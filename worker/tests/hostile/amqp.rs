//! The hostile run on the local RabbitMQ (results on Redis), and its raw cases: messages published
//! with lapin so the header table is exactly hostile — tables nested deep, values of every AMQP
//! type where a string belongs (timestamps, decimals, byte arrays, non-UTF-8 long strings, NaN).
//! lapin's short strings are Rust strings, so a non-UTF-8 header *key* cannot be sent this way.
//! The run's own dead-letter queue is read with `basic_get`.

use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{
    AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString, ShortString,
};
use lapin::BasicProperties;

use celerity_broker::{connect_backend, connect_broker};
use celerity_testsupport::{AMQP, REDIS};

use crate::gen::{Case, Expect, Gen, Payload};
use crate::run::{bounded, Raw as RunRaw, Run};

/// Depth of the nested header tables in the main run. Deeper ones abort the reading process:
/// see `a_deep_header_table_overflows_the_readers_stack` (500 levels do, in a debug build).
const AMQP_DEPTH: usize = 100;

/// One raw message.
pub struct RawAmqp {
    pub headers: FieldTable,
    pub body: Vec<u8>,
}

/// A lapin channel (publisher confirms on) for the raw cases and the dead-letter read.
pub struct Raw {
    conn: lapin::Connection,
    channel: lapin::Channel,
}

impl Raw {
    async fn connect() -> Raw {
        let conn = lapin::Connection::connect(AMQP, lapin::ConnectionProperties::default())
            .await
            .unwrap();
        let channel = conn.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        Raw { conn, channel }
    }

    pub async fn publish(&self, queue: &str, raw: &RawAmqp) {
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_content_encoding("utf-8".into())
            .with_delivery_mode(2)
            .with_headers(raw.headers.clone());
        self.channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &raw.body,
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// This run's dead letters (tag → reason), taken off its dead-letter queue `dead`.
    pub async fn take_dead_letters(&self, dead: &str) -> Vec<(String, String)> {
        let mut found = Vec::new();
        let channel = self.conn.create_channel().await.unwrap();
        let mut seen = 0;
        loop {
            let Ok(Some(msg)) = channel
                .basic_get(dead.into(), BasicGetOptions::default())
                .await
            else {
                break;
            };
            seen += 1;
            let header =
                |k: &str| {
                    msg.delivery.properties.headers().as_ref().and_then(|h| {
                        match h.inner().get(k) {
                            Some(AMQPValue::LongString(s)) => {
                                Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                            }
                            Some(AMQPValue::ShortString(s)) => Some(s.as_str().to_owned()),
                            _ => None,
                        }
                    })
                };
            match (header("x-hostile"), header("x-celerity-dead-reason")) {
                (Some(tag), Some(reason)) if tag.starts_with("amqp") => {
                    msg.delivery
                        .acker
                        .ack(BasicAckOptions::default())
                        .await
                        .unwrap();
                    found.push((tag, reason));
                }
                // Someone else's: stays unacked until the channel closes, then goes back.
                _ => {}
            }
            if seen > 1_000_000 {
                break;
            }
        }
        let _ = channel.close(200, "done".into()).await;
        found
    }
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// Raw cases: a valid call whose headers are hostile AMQP values.
pub fn raw_cases(g: &mut Gen, count: usize) -> Vec<Case> {
    // `CELERITY_HOSTILE_RAW=<n>`: only variant n (to replay one).
    let only: Option<usize> = std::env::var("CELERITY_HOSTILE_RAW")
        .ok()
        .and_then(|v| v.parse().ok());
    (0..count)
        .filter(|i| only.is_none_or(|o| i % 10 == o))
        .map(|i| {
            let tag = g.tag();
            let (id, m) = g.base(&tag);
            let mut t = FieldTable::default();
            t.insert("x-hostile".into(), long(&tag));
            t.insert("lang".into(), long("py"));
            t.insert("task".into(), long("demo.add"));
            t.insert("id".into(), long(&id));
            let (field, value, expect): (&str, AMQPValue, Expect) = match i % 10 {
                0 => {
                    let mut v = AMQPValue::LongString(LongString::from(b"x".to_vec()));
                    for _ in 0..g.deep.min(AMQP_DEPTH) {
                        let mut inner = FieldTable::default();
                        inner.insert("a".into(), v);
                        v = AMQPValue::FieldTable(inner);
                    }
                    ("stamps", v, Expect::Tolerated)
                }
                1 => {
                    let mut v = AMQPValue::Boolean(true);
                    for _ in 0..g.deep.min(AMQP_DEPTH) {
                        v = AMQPValue::FieldArray(FieldArray::from(vec![v]));
                    }
                    ("timelimit", v, Expect::Refused)
                }
                2 => (
                    "task",
                    AMQPValue::LongString(LongString::from(b"demo.\xff\xfeadd".to_vec())),
                    Expect::NotRegistered,
                ),
                3 => ("eta", AMQPValue::Timestamp(u64::MAX), Expect::Refused),
                4 => (
                    "expires",
                    AMQPValue::DecimalValue(DecimalValue {
                        scale: 255,
                        value: u32::MAX,
                    }),
                    Expect::Refused,
                ),
                5 => ("retries", AMQPValue::Double(-1e308), Expect::Refused),
                6 => (
                    "group",
                    AMQPValue::ByteArray(ByteArray::from(vec![0xff, 0x00, 0xfe])),
                    Expect::Tolerated,
                ),
                7 => (
                    "timelimit",
                    AMQPValue::FieldArray(FieldArray::from(vec![
                        AMQPValue::Float(f32::MAX),
                        AMQPValue::Void,
                    ])),
                    Expect::Tolerated,
                ),
                8 => ("id", AMQPValue::Void, Expect::Refused),
                _ => (
                    "x".repeat(255).leak(),
                    long(&"y".repeat(100_000)),
                    Expect::Tolerated,
                ),
            };
            let case_id = if field == "id" { None } else { Some(id) };
            t.insert(ShortString::from(field), value);
            Case {
                kind: "amqp-headers",
                id: case_id,
                tag,
                payload: Payload::Amqp(RawAmqp {
                    headers: t,
                    body: m.body,
                }),
                expect,
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_messages_on_rabbitmq() {
    crate::count_panics();
    let url = std::env::var("CELERITY_HOSTILE_AMQP").unwrap_or_else(|_| AMQP.to_owned());
    let broker = connect_broker(&url).await.unwrap();
    let worker_broker = connect_broker(&bounded(&url)).await.unwrap();
    let backend = connect_backend(REDIS).await.unwrap();
    let raw = Raw::connect().await;
    let mut g = Gen::new(crate::seed() ^ 0xa3, "amqpraw");
    let extra = raw_cases(&mut g, 100);
    let run = Run::new(
        "amqp",
        [broker, worker_broker],
        backend,
        RunRaw::Amqp(Box::new(raw)),
    );
    run.go(crate::count(), crate::seed(), extra).await;
}

/// Depth at which a header table aborts the process that *reads* it: lapin's frame parser is
/// recursive and runs on its io thread's default 2 MiB stack. Run with `--ignored` to see it; the
/// test process dies with `thread 'lapin-io-loop' has overflowed its stack` — unless it runs with
/// `RUST_MIN_STACK=268435456`, which the `celerity` binary sets for itself
/// (`celerity::reserve_thread_stacks`; see `worker_pool`'s
/// `a_deeply_nested_amqp_header_does_not_kill_the_worker`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "aborts the process: lapin's recursive table parser overflows its io thread's stack"]
async fn a_deep_header_table_overflows_the_readers_stack() {
    let depth: usize = std::env::var("CELERITY_HOSTILE_DEPTH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let queue = celerity_testsupport::unique("hostile-deep");
    let _cleanup = celerity_testsupport::Cleanup::new().amqp_queue(queue.clone());
    let broker = connect_broker(AMQP).await.unwrap();
    broker.declare_queue(&queue).await.unwrap();
    let raw = Raw::connect().await;
    let mut v = AMQPValue::Boolean(true);
    for _ in 0..depth {
        let mut inner = FieldTable::default();
        inner.insert("a".into(), v);
        v = AMQPValue::FieldTable(inner);
    }
    let mut t = FieldTable::default();
    t.insert("deep".into(), v);
    raw.publish(
        &queue,
        &RawAmqp {
            headers: t,
            body: b"[]".to_vec(),
        },
    )
    .await;
    eprintln!("published {depth} deep; now reading it back");
    let got = raw
        .channel
        .basic_get(queue.as_str().into(), BasicGetOptions::default())
        .await;
    eprintln!("read: {}", got.is_ok());
}

/// A message with a 20 KiB header value (a Celery producer may send up to 128 KiB; RabbitMQ never
/// splits a header frame) is run, and the worker goes on serving. Before: over the consumer's
/// 16 KiB `frame_max` the consuming connection broke on it, got it again, and received nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_bigger_than_16_kib_does_not_deafen_the_worker() {
    let queue = celerity_testsupport::unique("hostile-frame");
    let _cleanup = celerity_testsupport::Cleanup::new().amqp_queue(queue.clone());
    let broker = connect_broker(AMQP).await.unwrap();
    let backend = connect_backend(REDIS).await.unwrap();
    broker.declare_queue(&queue).await.unwrap();
    let raw = Raw::connect().await;
    let t = celerity_broker::protocol::TaskMessage::new(
        "demo.add",
        vec![serde_json::json!(20), serde_json::json!(22)],
        serde_json::Map::new(),
    );
    let mut headers = FieldTable::default();
    for (k, v) in t.headers.to_map() {
        if let serde_json::Value::String(s) = v {
            headers.insert(ShortString::from(k), long(&s));
        }
    }
    headers.insert("x-big".into(), long(&"y".repeat(20 * 1024)));
    raw.publish(
        &queue,
        &RawAmqp {
            headers,
            body: t.encode().body,
        },
    )
    .await;
    let client = celerity_client::Client::new(broker.clone(), Some(backend.clone()));
    let after = client
        .send_task(
            "demo.add",
            vec![serde_json::json!(1), serde_json::json!(2)],
            serde_json::Map::new(),
            &celerity_client::SendOptions::new().queue(&queue),
        )
        .await
        .unwrap()
        .id()
        .to_owned();
    let worker = celerity_testsupport::InProcessWorker::demo(
        broker.clone(),
        Some(backend.clone()),
        &queue,
        2,
    );
    for (id, sum) in [(t.id().to_owned(), 42), (after, 3)] {
        let meta = backend
            .wait(&id, Some(std::time::Duration::from_secs(20)))
            .await
            .unwrap();
        assert_eq!(meta.result, serde_json::json!(sum));
        let _ = backend.forget(&id).await;
    }
    worker.stop_within(std::time::Duration::from_secs(30)).await;
}
