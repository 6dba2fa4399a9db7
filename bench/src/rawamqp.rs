//! The raw limit of the local RabbitMQ for job-shaped messages, with no task queue around it: what a
//! bare lapin client gets from the broker for the same deliveries the task rows make.
//!
//! Messages are built as a Celery `add` job is on the wire (protocol-2 headers, a small JSON body),
//! persistent, to a durable queue of this run (deleted afterwards). Four measures:
//! - publish: `n` messages with publisher confirms, a window of [`WINDOW`] unconfirmed;
//! - drain: consuming those `n` with manual acks (prefetch [`PREFETCH`], one ack per [`ACK_EVERY`]
//!   deliveries with `multiple`), the cheapest way to ack for the broker;
//! - both at once: `n` more published while the consumer drains them, first publish to last
//!   delivery (what the task rows time, less the task queue);
//! - one-way latency: `calls` sequential messages, each published (and confirmed) by one connection
//!   and awaited on another; p50 / p99 from the start of the publish to the delivery in hand.
//!
//! And for the message-size growth rows, publish and drain alone of messages whose one argument is
//! a string of a given size ([`publish_drain_sized`]).
//!
//! A task adds a result write, the worker's own work and a second process on the same two cores,
//! so these numbers are a ceiling for the RabbitMQ rows, not a target.

use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldArray, FieldTable, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};

use crate::error::{BenchError, Result};

/// Unconfirmed publishes in flight.
const WINDOW: usize = 1_000;
/// Bytes of unconfirmed publishes in flight at most (the big-message points).
const IN_FLIGHT_BYTES: usize = 64 << 20;
/// Deliveries the broker may push ahead of the acks.
const PREFETCH: u16 = 512;
/// Deliveries per `basic.ack(multiple)`.
const ACK_EVERY: u64 = 64;
/// Bound on any one wait, so a broken broker fails the run instead of hanging it.
const PATIENCE: Duration = Duration::from_secs(60);

/// What one raw run measured.
pub struct Raw {
    pub publish_per_s: f64,
    pub drain_per_s: f64,
    pub both_per_s: f64,
    /// One-way latencies in milliseconds, sorted.
    pub latency_ms: Vec<f64>,
}

/// A raw run's two connections and its own durable queue (deleted by [`Link::close`]).
struct Link {
    producer: Connection,
    consumer: Connection,
    queue: ShortString,
}

impl Link {
    async fn open(url: &str) -> Result<Link> {
        let queue = ShortString::from(format!("bench.raw.{}", uuid::Uuid::new_v4().simple()));
        Ok(Link {
            producer: connect(url).await?,
            consumer: connect(url).await?,
            queue,
        })
    }

    /// A channel of the producer with publisher confirms, the queue declared (durable).
    async fn publisher(&self) -> Result<lapin::Channel> {
        let channel = self.producer.create_channel().await.map_err(amqp)?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(amqp)?;
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        channel
            .queue_declare(self.queue.clone(), durable, FieldTable::default())
            .await
            .map_err(amqp)?;
        Ok(channel)
    }

    /// Deletes the queue and closes both connections, best effort.
    async fn close(self) {
        if let Ok(ch) = self.producer.create_channel().await {
            let _ = ch
                .queue_delete(self.queue.clone(), QueueDeleteOptions::default())
                .await;
        }
        let _ = self.producer.close(200, "bye".into()).await;
        let _ = self.consumer.close(200, "bye".into()).await;
    }
}

/// Publishes and drains `n` messages, then times `calls` one-way deliveries.
pub async fn run(url: &str, n: usize, calls: usize) -> Result<Raw> {
    let link = Link::open(url).await?;
    let outcome = measure(&link, n, calls).await;
    link.close().await;
    outcome
}

async fn measure(link: &Link, n: usize, calls: usize) -> Result<Raw> {
    let queue = &link.queue;
    let pub_ch = link.publisher().await?;
    let (publish_per_s, drain_per_s, sub_ch, mut deliveries) =
        publish_then_drain(link, &pub_ch, n, job).await?;

    let t = Instant::now();
    tokio::try_join!(
        publish(&pub_ch, queue, n),
        drain(&sub_ch, &mut deliveries, n)
    )?;
    let both_per_s = n as f64 / t.elapsed().as_secs_f64();

    // One-way latency, one message at a time.
    let mut latency_ms = Vec::with_capacity(calls);
    for i in 0..calls {
        let (props, body) = job(i);
        let t = Instant::now();
        let confirm = send(&pub_ch, queue, props, &body).await?;
        let d = next(&mut deliveries).await?;
        latency_ms.push(t.elapsed().as_secs_f64() * 1e3);
        sub_ch
            .basic_ack(d.delivery_tag, BasicAckOptions::default())
            .await
            .map_err(amqp)?;
        confirmed(confirm).await?;
    }
    latency_ms.sort_by(f64::total_cmp);
    let _ = sub_ch.close(200, "bye".into()).await;
    let _ = pub_ch.close(200, "bye".into()).await;
    Ok(Raw {
        publish_per_s,
        drain_per_s,
        both_per_s,
        latency_ms,
    })
}

/// Publish and drain rates (msgs/s, each on its own: all `n` published, then all drained) of `n`
/// job-shaped messages whose one argument is a string of `bytes` bytes, on a queue of its own.
pub async fn publish_drain_sized(url: &str, n: usize, bytes: usize) -> Result<(f64, f64)> {
    let link = Link::open(url).await?;
    let outcome = measure_sized(&link, n, bytes).await;
    link.close().await;
    outcome
}

async fn measure_sized(link: &Link, n: usize, bytes: usize) -> Result<(f64, f64)> {
    let pub_ch = link.publisher().await?;
    let payload = "x".repeat(bytes);
    let (publish_per_s, drain_per_s, sub_ch, _) =
        publish_then_drain(link, &pub_ch, n, |i| job_carrying(i, &payload)).await?;
    let _ = sub_ch.close(200, "bye".into()).await;
    let _ = pub_ch.close(200, "bye".into()).await;
    Ok((publish_per_s, drain_per_s))
}

/// Publishes `make(i)` for i in 0..n on `pub_ch`, then drains them on a new subscription of the
/// link's consumer: publish and drain rates (msgs/s, each timed on its own) and the subscription,
/// for more rounds.
async fn publish_then_drain(
    link: &Link,
    pub_ch: &lapin::Channel,
    n: usize,
    make: impl Fn(usize) -> (BasicProperties, Vec<u8>),
) -> Result<(f64, f64, lapin::Channel, lapin::Consumer)> {
    let t = Instant::now();
    publish_with(pub_ch, &link.queue, n, make).await?;
    let publish_per_s = n as f64 / t.elapsed().as_secs_f64();
    let (sub_ch, mut deliveries) = subscribe(&link.consumer, &link.queue).await?;
    let t = Instant::now();
    drain(&sub_ch, &mut deliveries, n).await?;
    let drain_per_s = n as f64 / t.elapsed().as_secs_f64();
    Ok((publish_per_s, drain_per_s, sub_ch, deliveries))
}

/// Publishes `n` job-shaped messages, confirmed, [`WINDOW`] at a time in flight.
async fn publish(channel: &lapin::Channel, queue: &ShortString, n: usize) -> Result<()> {
    publish_with(channel, queue, n, job).await
}

/// Publishes `make(i)` for i in 0..n, confirmed, at most [`WINDOW`] (and 64 MiB) in flight.
async fn publish_with(
    channel: &lapin::Channel,
    queue: &ShortString,
    n: usize,
    make: impl Fn(usize) -> (BasicProperties, Vec<u8>),
) -> Result<()> {
    let mut inflight = std::collections::VecDeque::with_capacity(WINDOW);
    let mut window = WINDOW;
    for i in 0..n {
        if inflight.len() >= window {
            if let Some(confirm) = inflight.pop_front() {
                confirmed(confirm).await?;
            }
        }
        let (props, body) = make(i);
        window = (IN_FLIGHT_BYTES / body.len().max(1)).clamp(1, WINDOW);
        inflight.push_back(send(channel, queue, props, &body).await?);
    }
    for confirm in inflight {
        confirmed(confirm).await?;
    }
    Ok(())
}

/// Publishes one message to `queue` through the default exchange; the confirm comes later.
async fn send(
    channel: &lapin::Channel,
    queue: &ShortString,
    props: BasicProperties,
    body: &[u8],
) -> Result<lapin::PublisherConfirm> {
    channel
        .basic_publish(
            ShortString::default(),
            queue.clone(),
            BasicPublishOptions::default(),
            body,
            props,
        )
        .await
        .map_err(amqp)
}

/// A channel of `conn` consuming `queue` with manual acks, [`PREFETCH`] ahead.
async fn subscribe(
    conn: &Connection,
    queue: &ShortString,
) -> Result<(lapin::Channel, lapin::Consumer)> {
    let channel = conn.create_channel().await.map_err(amqp)?;
    channel
        .basic_qos(PREFETCH, BasicQosOptions { global: false })
        .await
        .map_err(amqp)?;
    let deliveries = channel
        .basic_consume(
            queue.clone(),
            "bench-raw".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(amqp)?;
    Ok((channel, deliveries))
}

/// Takes `n` deliveries, acking them [`ACK_EVERY`] at a time.
async fn drain(channel: &lapin::Channel, deliveries: &mut lapin::Consumer, n: usize) -> Result<()> {
    let mut last_tag = 0;
    for _ in 0..n {
        last_tag = next(deliveries).await?.delivery_tag;
        if last_tag % ACK_EVERY == 0 {
            channel
                .basic_ack(last_tag, BasicAckOptions { multiple: true })
                .await
                .map_err(amqp)?;
        }
    }
    if last_tag % ACK_EVERY != 0 {
        channel
            .basic_ack(last_tag, BasicAckOptions { multiple: true })
            .await
            .map_err(amqp)?;
    }
    Ok(())
}

async fn connect(url: &str) -> Result<Connection> {
    let props = ConnectionProperties::default().with_connection_name("celerity-bench-raw".into());
    tokio::time::timeout(PATIENCE, Connection::connect(url, props))
        .await
        .map_err(|_| BenchError::Setup(format!("raw RabbitMQ: no connection to {url}")))?
        .map_err(amqp)
}

async fn next(deliveries: &mut lapin::Consumer) -> Result<lapin::message::Delivery> {
    match tokio::time::timeout(PATIENCE, deliveries.next()).await {
        Ok(Some(Ok(d))) => Ok(d),
        Ok(Some(Err(e))) => Err(amqp(e)),
        Ok(None) => Err(BenchError::Setup("raw RabbitMQ: consumer closed".into())),
        Err(_) => Err(BenchError::Setup(
            "raw RabbitMQ: no delivery in time".into(),
        )),
    }
}

async fn confirmed(confirm: lapin::PublisherConfirm) -> Result<()> {
    match confirm.await.map_err(amqp)? {
        lapin::Confirmation::Nack(_) => Err(BenchError::Setup(
            "raw RabbitMQ: a publish was refused".into(),
        )),
        _ => Ok(()),
    }
}

fn amqp(e: lapin::Error) -> BenchError {
    BenchError::Setup(format!("raw RabbitMQ: {e}"))
}

/// A message shaped like Celery's `noop(payload)` on the wire (as [`job`], the body's one argument
/// the string `payload`).
fn job_carrying(i: usize, payload: &str) -> (BasicProperties, Vec<u8>) {
    let (props, _) = job(i);
    let body = format!(
        "[[\"{payload}\"], {{}}, {{\"callbacks\": null, \"errbacks\": null, \"chain\": null, \"chord\": null}}]"
    );
    (props, body.into_bytes())
}

/// A message shaped like Celery's `add(i, 1)` on the wire: protocol-2 headers, JSON body, persistent.
fn job(i: usize) -> (BasicProperties, Vec<u8>) {
    let id = uuid::Uuid::new_v4().to_string();
    let text = |s: &str| AMQPValue::LongString(s.as_bytes().to_vec().into());
    let mut h = FieldTable::default();
    h.insert("lang".into(), text("py"));
    h.insert("task".into(), text("demo.add"));
    h.insert("id".into(), text(&id));
    h.insert("shadow".into(), AMQPValue::Void);
    h.insert("eta".into(), AMQPValue::Void);
    h.insert("expires".into(), AMQPValue::Void);
    h.insert("group".into(), AMQPValue::Void);
    h.insert("group_index".into(), AMQPValue::Void);
    h.insert("retries".into(), AMQPValue::LongLongInt(0));
    h.insert(
        "timelimit".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::Void, AMQPValue::Void])),
    );
    h.insert("root_id".into(), text(&id));
    h.insert("parent_id".into(), AMQPValue::Void);
    h.insert("argsrepr".into(), text(&format!("({i}, 1)")));
    h.insert("kwargsrepr".into(), text("{}"));
    h.insert("origin".into(), text("gen1@bench"));
    h.insert("ignore_result".into(), AMQPValue::Boolean(false));
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("utf-8".into())
        .with_correlation_id(id.as_str().into())
        .with_reply_to(uuid::Uuid::new_v4().to_string().as_str().into())
        .with_delivery_mode(2)
        .with_priority(0)
        .with_headers(h);
    let body = format!(
        "[[{i}, 1], {{}}, {{\"callbacks\": null, \"errbacks\": null, \"chain\": null, \"chord\": null}}]"
    );
    (props, body.into_bytes())
}
