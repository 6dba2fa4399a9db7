//! The bounds of the broker URL on every transport: a publish over `max_message_size` is refused
//! with nothing sent; a message over it that arrives anyway (published by a producer without the
//! limit) is dead-lettered unparsed, only its first 64 KiB kept, with `x-celerity-dead-size`, and
//! the worker goes on; a dead-letter queue keeps only the newest `max_dead_letters`. Also: a
//! remote-control request with headers over 16 KiB does not make the worker deaf to the next one.

use celerity_broker::message::Message;
use celerity_broker::ResultBackend;
use celerity_client::control::Target;
use celerity_testsupport::Cleanup;
use serde_json::Value;

use super::*;

/// The limit the tests set, and what the oversized messages are.
const LIMIT: usize = 4096;
const KEPT: usize = 5;

/// One transport with the bounds set (`bounded`) and without them (`raw`: a producer that does
/// not check), sharing queues; results on a backend the worker and the test share.
struct Setup {
    bounded: Arc<dyn Broker>,
    raw: Arc<dyn Broker>,
    backend: Arc<dyn ResultBackend>,
    queue: String,
    dead: String,
    _cleanup: Cleanup,
}

async fn setup(transport: &str) -> Setup {
    let tag = unique();
    let queue = format!("{tag}.q");
    let dead = format!("{tag}.dead");
    let bounds = format!("max_message_size={LIMIT}&max_dead_letters={KEPT}");
    let prefix = format!("{tag}:");
    let (bounded, raw, backend) = match transport {
        "memory" => (
            format!("memory://{tag}?{bounds}"),
            format!("memory://{tag}"),
            format!("memory://{tag}"),
        ),
        "redis" => (
            format!("{REDIS}?global_keyprefix={prefix}&{bounds}"),
            format!("{REDIS}?global_keyprefix={prefix}"),
            format!("{REDIS}?global_keyprefix={prefix}"),
        ),
        _ => (
            format!("{AMQP}?{bounds}"),
            AMQP.to_owned(),
            format!("{REDIS}?global_keyprefix={prefix}"),
        ),
    };
    Setup {
        bounded: connect_broker(&bounded).await.unwrap(),
        raw: connect_broker(&raw).await.unwrap(),
        backend: connect_backend(&backend).await.unwrap(),
        _cleanup: Cleanup::new()
            .redis_prefix(prefix)
            .amqp_queue(queue.clone())
            .amqp_queue(dead.clone()),
        queue,
        dead,
    }
}

impl Setup {
    fn worker(&self, hostname: Option<String>) -> InProcessWorker {
        let config = WorkerConfig {
            queues: vec![self.queue.clone()],
            concurrency: 1,
            grace: Duration::from_secs(5),
            dead_letter_queue: self.dead.clone(),
            hostname: hostname.unwrap_or_else(|| WorkerConfig::default().hostname),
            ..WorkerConfig::default()
        };
        spawn_worker(&self.bounded, &self.backend, config)
    }

    /// A `demo.echo` job whose body is about `size` bytes.
    fn echo(&self, size: usize) -> Message {
        SendOptions::new()
            .queue(&self.queue)
            .build(
                "demo.echo",
                vec![json!("x".repeat(size))],
                Map::new(),
                chrono::Utc::now(),
            )
            .unwrap()
            .encode()
    }

    /// Every message of the dead-letter queue, oldest first (taken off it). On RabbitMQ it is read
    /// with `basic_get`: consuming it through our broker would declare it unbounded, which RabbitMQ
    /// refuses for a queue declared with `x-max-length`.
    async fn dead_letters(&self) -> Vec<Dead> {
        if self.raw.transport() == "amqp" {
            return amqp_dead_letters(&self.dead).await;
        }
        let mut out = Vec::new();
        let mut consumer = self
            .raw
            .consume(std::slice::from_ref(&self.dead), 64)
            .await
            .unwrap();
        while let Ok(Ok(Some(d))) =
            tokio::time::timeout(Duration::from_secs(2), consumer.next()).await
        {
            let text = |k: &str| {
                d.message
                    .headers
                    .get(k)
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            };
            out.push(Dead {
                id: text("id"),
                reason: text("x-celerity-dead-reason"),
                size: d
                    .message
                    .headers
                    .get("x-celerity-dead-size")
                    .and_then(Value::as_u64),
                body: d.message.body.clone(),
            });
            d.ack().await.unwrap();
        }
        consumer.close().await.unwrap();
        out
    }
}

/// What a test reads of a dead letter.
struct Dead {
    id: Option<String>,
    reason: Option<String>,
    size: Option<u64>,
    body: Vec<u8>,
}

async fn amqp_dead_letters(queue: &str) -> Vec<Dead> {
    use lapin::options::{BasicAckOptions, BasicGetOptions};
    use lapin::types::AMQPValue;
    let conn = lapin::Connection::connect(AMQP, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let mut out = Vec::new();
    while let Ok(Some(msg)) = channel
        .basic_get(queue.into(), BasicGetOptions::default())
        .await
    {
        let headers = msg
            .delivery
            .properties
            .headers()
            .clone()
            .unwrap_or_default();
        let text = |k: &str| match headers.inner().get(k) {
            Some(AMQPValue::LongString(s)) => {
                Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
            }
            Some(AMQPValue::ShortString(s)) => Some(s.as_str().to_owned()),
            _ => None,
        };
        let size = match headers.inner().get("x-celerity-dead-size") {
            Some(AMQPValue::LongLongInt(n)) => u64::try_from(*n).ok(),
            Some(AMQPValue::LongInt(n)) => u64::try_from(*n).ok(),
            Some(AMQPValue::LongUInt(n)) => Some(u64::from(*n)),
            _ => None,
        };
        out.push(Dead {
            id: text("id"),
            reason: text("x-celerity-dead-reason"),
            size,
            body: msg.delivery.data.clone(),
        });
        msg.delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .unwrap();
    }
    let _ = conn.close(200, "OK".into()).await;
    out
}

const TRANSPORTS: [&str; 3] = ["memory", "redis", "amqp"];

#[tokio::test]
async fn a_publish_over_max_message_size_is_refused_and_nothing_is_sent() {
    for transport in TRANSPORTS {
        let s = setup(transport).await;
        let client = Client::new(s.bounded.clone(), None);
        let big = vec![json!("x".repeat(LIMIT))];
        let options = SendOptions::new().queue(&s.queue);
        let e = client
            .send_task("demo.echo", big, Map::new(), &options)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("over the limit of {LIMIT} bytes"))
                && e.contains("max_message_size"),
            "{transport}: {e}"
        );
        let batch = vec![s.echo(10), s.echo(LIMIT)];
        let e = s.bounded.publish_batch(&s.queue, &batch).await.unwrap_err();
        assert!(
            e.to_string().contains("max_message_size"),
            "{transport}: {e}"
        );
        assert_eq!(s.raw.queue_len(&s.queue).await.unwrap(), 0, "{transport}");
        // Under the limit it goes.
        let small = vec![json!("x".repeat(LIMIT / 2))];
        client
            .send_task("demo.echo", small, Map::new(), &options)
            .await
            .unwrap();
        assert_eq!(s.raw.queue_len(&s.queue).await.unwrap(), 1, "{transport}");
        s.raw.purge(&s.queue).await.unwrap();
    }
}

#[tokio::test]
async fn an_oversized_message_is_dead_lettered_unparsed_and_the_next_job_runs() {
    for transport in TRANSPORTS {
        let s = setup(transport).await;
        let worker = s.worker(None);
        let huge = s.echo(100_000);
        let huge_id = huge.task_id().unwrap_or_default().to_owned();
        s.raw.publish(&s.queue, &huge).await.unwrap();
        let client = Client::new(s.bounded.clone(), Some(s.backend.clone()));
        let next = client
            .send_task(
                "demo.add",
                vec![json!(2), json!(3)],
                Map::new(),
                &SendOptions::new().queue(&s.queue),
            )
            .await
            .unwrap();
        let wait = Some(Duration::from_secs(30));
        assert_eq!(next.get(wait).await.unwrap(), json!(5), "{transport}");
        let failed = s.backend.wait(&huge_id, wait).await.unwrap();
        let exc = failed.exception().unwrap();
        assert_eq!(
            (failed.status, exc.exc_type.as_str()),
            (State::Failure, "DecodeError"),
            "{transport}"
        );
        assert!(
            exc.message().contains(&format!("limit of {LIMIT} bytes")),
            "{transport}: {}",
            exc.message()
        );
        let summary = worker.stop().await;
        assert_eq!((summary.rejected, summary.succeeded), (1, 1), "{transport}");
        let dead = s.dead_letters().await;
        assert_eq!(dead.len(), 1, "{transport}");
        let kept = &dead[0];
        assert_eq!(kept.body.len(), 64 * 1024, "{transport}");
        assert_eq!(kept.body[..], huge.body[..64 * 1024], "{transport}");
        assert_eq!(kept.size, Some(huge.body.len() as u64), "{transport}");
        let reason = kept.reason.as_deref().unwrap_or_default();
        assert!(
            reason.contains("max_message_size"),
            "{transport}: {reason:?}"
        );
        assert_eq!(kept.id.as_deref(), Some(huge_id.as_str()), "{transport}");
    }
}

#[tokio::test]
async fn a_dead_letter_queue_keeps_only_the_newest_max_dead_letters() {
    for transport in TRANSPORTS {
        let s = setup(transport).await;
        let worker = s.worker(None);
        let ids: Vec<String> = (0..KEPT + 3)
            .map(|i| format!("{}-junk-{i}", s.queue))
            .collect();
        // One at a time, so they are dead-lettered in this order.
        for id in &ids {
            let mut junk = s.echo(1);
            junk.headers.insert("id".into(), json!(id));
            junk.body = b"{not json".to_vec();
            s.raw.publish(&s.queue, &junk).await.unwrap();
            let meta = s
                .backend
                .wait(id, Some(Duration::from_secs(30)))
                .await
                .unwrap();
            assert_eq!(meta.status, State::Failure, "{transport}");
        }
        let summary = worker.stop().await;
        assert_eq!(summary.rejected, ids.len() as u64, "{transport}");
        assert_eq!(
            s.raw.queue_len(&s.dead).await.unwrap(),
            KEPT as u64,
            "{transport}"
        );
        let kept: Vec<String> = s
            .dead_letters()
            .await
            .into_iter()
            .filter_map(|d| d.id)
            .collect();
        assert_eq!(kept, ids[3..], "{transport}");
    }
}

/// Pings `node` until it answers or `patience` is over; true if it answered.
async fn answers_ping(client: &Client, node: &str, patience: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + patience;
    while tokio::time::Instant::now() < deadline {
        let target = Target {
            destination: vec![node.to_owned()],
            timeout: Duration::from_secs(1),
        };
        if let Ok(replies) = client.control_call("ping", Map::new(), &target).await {
            if replies.iter().any(|r| r.node == node) {
                return true;
            }
        }
    }
    false
}

/// Broadcasts a request with 40 KiB of headers and, right behind it, a `ping` for `node`; true if
/// the ping is answered within a few seconds. A subscriber whose connection the big request broke
/// loses the ping with its (exclusive) queue, even if it reconnects at once.
async fn answers_ping_behind_big_headers(broker: &Arc<dyn Broker>, node: &str) -> bool {
    use celerity_broker::protocol::control::{
        reply_queue, ControlRequest, PIDBOX_EXCHANGE, REPLY_EXCHANGE,
    };
    let oid = uuid::Uuid::new_v4().to_string();
    let mut replies = broker
        .subscribe(REPLY_EXCHANGE, &oid, &reply_queue(&oid))
        .await
        .unwrap();
    let mut headers = Map::new();
    headers.insert("x-padding".into(), json!("h".repeat(40 * 1024)));
    let request = json!({"method": "ping", "arguments": {}, "destination": [node]});
    let big = Message::transient_json(headers, &request);
    let ping = ControlRequest::call("ping", Map::new(), Some(vec![node.to_owned()]), "t", &oid)
        .to_message(1);
    if broker.transport() == "amqp" {
        // As a Celery client sends them: on one connection offering RabbitMQ's frame_max.
        amqp_broadcast(&[&big.body, &ping.body]).await;
    } else {
        broker.broadcast(PIDBOX_EXCHANGE, "", &big).await.unwrap();
        broker.broadcast(PIDBOX_EXCHANGE, "", &ping).await.unwrap();
    }
    let answered = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(Some(m)) = replies.next().await {
            if m.headers.get("ticket").and_then(Value::as_str) == Some("t") {
                return true;
            }
        }
        false
    })
    .await;
    replies.close().await;
    answered.unwrap_or(false)
}

/// Publishes JSON `bodies` on `celery.pidbox` with lapin, in order on one channel; the first with
/// 40 KiB of headers.
async fn amqp_broadcast(bodies: &[&[u8]]) {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    use lapin::types::{AMQPValue, FieldTable, LongString};
    let conn = lapin::Connection::connect(AMQP, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for (i, body) in bodies.iter().enumerate() {
        let mut headers = FieldTable::default();
        if i == 0 {
            let padding = LongString::from("h".repeat(40 * 1024).into_bytes());
            headers.insert("x-padding".into(), AMQPValue::LongString(padding));
        }
        let props = lapin::BasicProperties::default()
            .with_content_type("application/json".into())
            .with_content_encoding("utf-8".into())
            .with_headers(headers);
        channel
            .basic_publish(
                "celery.pidbox".into(),
                "".into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let _ = conn.close(200, "OK".into()).await;
}

#[tokio::test]
async fn a_control_request_with_headers_over_16_kib_does_not_break_the_subscription() {
    for transport in TRANSPORTS {
        let s = setup(transport).await;
        let node = format!("{}@bounds", s.queue);
        let worker = s.worker(Some(node.clone()));
        let client = Client::new(s.raw.clone(), None);
        let patience = Duration::from_secs(20);
        assert!(
            answers_ping(&client, &node, patience).await,
            "{transport}: never answered"
        );
        assert!(
            answers_ping_behind_big_headers(&s.raw, &node).await,
            "{transport}: the ping right behind a request with 40 KiB of headers got no answer"
        );
        assert!(
            answers_ping(&client, &node, patience).await,
            "{transport}: deaf after a request with 40 KiB of headers"
        );
        worker.stop().await;
    }
}

#[tokio::test]
async fn an_existing_unbounded_dead_letter_queue_on_rabbitmq_is_used_as_it_is() {
    let s = setup("amqp").await;
    // Declared as before the bound (as Celery declares a queue): a bounded redeclare is refused.
    s.raw.declare_queue(&s.dead).await.unwrap();
    let worker = s.worker(None);
    let id = format!("{}-junk", s.queue);
    let mut junk = s.echo(1);
    junk.headers.insert("id".into(), json!(id));
    junk.body = b"{not json".to_vec();
    s.raw.publish(&s.queue, &junk).await.unwrap();
    let meta = s
        .backend
        .wait(&id, Some(Duration::from_secs(30)))
        .await
        .unwrap();
    assert_eq!(meta.status, State::Failure);
    let summary = worker.stop().await;
    assert_eq!(summary.rejected, 1);
    let dead = s.dead_letters().await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id.as_deref(), Some(id.as_str()));
}
