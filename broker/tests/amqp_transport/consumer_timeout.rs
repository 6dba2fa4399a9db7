//! RabbitMQ's consumer timeout: a channel that holds a delivery unacked longer than
//! `consumer_timeout` is closed by the server. Beat's leader lock must survive it (the leader hands
//! its token back and gets it again), a long job's channel is closed and its job comes again (the
//! consumer reconnects; README says to raise the timeout above the longest job), and the
//! `consumer_timeout` URL option reaches RabbitMQ as the consumer argument `x-consumer-timeout`.
//!
//! The timeout tests run on a private RabbitMQ node with a 2 s timeout checked every 0.5 s
//! (`PrivateRabbit`); the shared node keeps its 30 min default, which no test can wait for.

use std::time::Instant;

use celerity_broker::lease::amqp::AmqpLease;
use celerity_broker::url::BrokerUrl;
use celerity_testsupport::PrivateRabbit;

use super::*;

/// The private node's settings: a 2 s consumer timeout, checked every 0.5 s.
const SHORT_TIMEOUT: &str = "{consumer_timeout, 2000}, {channel_tick_interval, 500}";

#[tokio::test]
async fn the_beat_leader_keeps_its_token_past_rabbitmqs_consumer_timeout() {
    let Some(node) = PrivateRabbit::start(SHORT_TIMEOUT).await else {
        eprintln!("skipped: cannot start a private RabbitMQ node");
        return;
    };
    let url = BrokerUrl::parse(&node.url()).unwrap();
    let lease = AmqpLease::new(&url, "celerity-test-lock", "celerity-test")
        .with_refresh(Duration::from_millis(700));
    let mut held = None;
    for _ in 0..100 {
        held = lease.try_acquire().await.unwrap();
        if held.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let held = held.expect("a lone candidate becomes leader");
    // Three timeouts: a token held unacked all along gets its channel closed after 2 to 2.5 s.
    let began = Instant::now();
    while began.elapsed() < Duration::from_secs(6) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(
            lease.check(&held).await.unwrap(),
            "the leader lost its lock after {:?}",
            began.elapsed()
        );
    }
    assert_eq!(lease.try_acquire().await.unwrap(), Some(held));
    lease.release().await.unwrap();
}

#[tokio::test]
async fn a_job_held_past_the_consumer_timeout_comes_again_on_a_new_channel() {
    let Some(node) = PrivateRabbit::start(SHORT_TIMEOUT).await else {
        eprintln!("skipped: cannot start a private RabbitMQ node");
        return;
    };
    let b = connect_broker(&node.url()).await.unwrap();
    let q = "celerity-test-long-job".to_owned();
    b.publish(&q, &msg(1)).await.unwrap();
    // Room for the redelivery while the first one is still held.
    let mut c = b.consume(std::slice::from_ref(&q), 2).await.unwrap();
    let first = next_within(&mut c, 10.0).await.expect("the job");
    assert!(!first.redelivered);
    // The "job" runs past the timeout: RabbitMQ closes the channel and requeues the delivery; the
    // consumer reconnects and receives it again.
    let again = next_within(&mut c, 20.0)
        .await
        .expect("the job again after the timeout");
    assert_eq!(n_of(&again), 1);
    assert!(again.redelivered);
    assert!(
        first.ack().await.is_err(),
        "the first delivery's channel is gone"
    );
    again.ack().await.unwrap();
    c.close().await.unwrap();
    b.close().await.unwrap();
}

/// `rabbitmqctl` rows for the shared node, or `None` when it cannot be run here.
fn list_consumers() -> Option<String> {
    let out = Command::new("rabbitmqctl")
        .args(["-q", "list_consumers", "-p", "/", "queue_name", "arguments"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test]
async fn the_consumer_timeout_option_is_sent_as_a_consumer_argument() {
    if list_consumers().is_none() {
        eprintln!("skipped: rabbitmqctl is not available");
        return;
    }
    let qs = Queues::new("consumer-timeout", 1);
    let q = qs.name(0).to_owned();
    let b = broker("?consumer_timeout=7200").await;
    let mut c = b.consume(std::slice::from_ref(&q), 1).await.unwrap();
    let mut row = None;
    for _ in 0..50 {
        row = list_consumers()
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with(&q))
            .map(str::to_owned);
        if row.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let row = row.expect("our consumer is listed");
    assert!(
        row.contains("x-consumer-timeout") && row.contains("7200000"),
        "{row}"
    );
    // The queue itself is declared without it, as Celery declares it.
    let conn = admin().await;
    let ch = conn.create_channel().await.unwrap();
    let same = ch
        .queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    assert!(same.is_ok(), "{same:?}");
    c.close().await.unwrap();
    b.close().await.unwrap();
    conn.close(200, "OK".into()).await.unwrap();
}
