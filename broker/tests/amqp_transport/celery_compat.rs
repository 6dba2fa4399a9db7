//! What Celery sees and sends: the topology Celery declares, quorum queues, a task sent by Python
//! Celery decoded, and kombu reading what we publish.

use super::*;

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
    let mut c = b.consume(&qs.names, 4).await.unwrap();
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

/// `?queue_type=quorum&delivery_limit=5` declares the queue as kombu does with
/// `queue_arguments={'x-queue-type': 'quorum', 'x-delivery-limit': 5}`: Python declares it again
/// without a 406 (RabbitMQ compares the argument's value and type), and another limit is refused.
#[tokio::test]
async fn a_delivery_limit_matches_what_kombu_declares() {
    let Some(py) = python() else { return };
    let qs = Queues::new("qlimit", 1);
    let q = qs.name(0).to_owned();
    let b = broker("?queue_type=quorum&delivery_limit=5").await;
    b.declare_queue(&q).await.unwrap();
    b.close().await.unwrap();
    let script = r#"
import sys
from kombu import Connection, Exchange, Queue
with Connection("amqp://guest:guest@127.0.0.1:5672//") as conn:
    for limit in (5, 6):
        q = Queue(sys.argv[1], Exchange(sys.argv[1], "direct"), routing_key=sys.argv[1],
                  queue_arguments={"x-queue-type": "quorum", "x-delivery-limit": limit})
        try:
            q.bind(conn.channel()).declare()
            print(limit, "ok")
        except Exception as e:
            print(limit, "refused", type(e).__name__)
"#;
    let out = tokio::task::spawn_blocking(move || {
        Command::new(py).args(["-c", script, &q]).output().unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "python: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("5 ok"), "{text}");
    assert!(text.contains("6 refused"), "{text}");
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
