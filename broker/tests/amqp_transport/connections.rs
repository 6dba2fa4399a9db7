//! Lost and refused connections: unreachable brokers, a server-side close (via `rabbitmqctl`, in a
//! private vhost) for consumers and publishers, a deleted queue (consumed again; a publish to it fails
//! instead of being dropped), and closing the broker.

use super::*;

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

#[tokio::test]
async fn a_publish_to_a_deleted_queue_is_an_error_not_a_silent_drop() {
    let qs = Queues::new("unroutable", 1);
    let q = qs.name(0).to_owned();
    let b = broker("").await;
    // The first publish declares the queue (and remembers that it did).
    b.publish(&q, &msg(1)).await.unwrap();
    let conn = admin().await;
    let ch = conn.create_channel().await.unwrap();
    let delete = || async {
        ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await
            .unwrap();
    };
    delete().await;
    // Nothing routes to the name any more: RabbitMQ returns the message, the publish fails.
    let err = b.publish(&q, &msg(2)).await.unwrap_err();
    assert!(
        matches!(&err, BrokerError::Unroutable { queue, .. } if *queue == q),
        "{err:?}"
    );
    // The next publish declares the queue again and is stored.
    b.publish(&q, &msg(3)).await.unwrap();
    assert_eq!(wait_len(&b, &q, 1).await, 1);

    // A batch likewise: an error for a deleted queue, then stored in full once declared again.
    delete().await;
    let batch: Vec<Message> = (0..50).map(msg).collect();
    let err = b.publish_batch(&q, &batch).await.unwrap_err();
    assert!(matches!(err, BrokerError::Unroutable { .. }), "{err:?}");
    b.publish_batch(&q, &batch).await.unwrap();
    assert_eq!(wait_len(&b, &q, 50).await, 50);
    conn.close(200, "OK".into()).await.unwrap();
    b.close().await.unwrap();
}
