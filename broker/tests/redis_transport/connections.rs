//! Idle consumers waiting on Redis (also after a cancelled `next`), bad URLs and unreachable
//! servers, and a consumer that survives a dropped connection.

use super::*;

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

/// A message on another queue than the one an idle consumer's fetch waits on wakes it through the
/// other keys' waits and a `CLIENT UNBLOCK`. That unblock can reach Redis before the `BLMOVE` it is
/// meant for (the two travel on different connections); it must then be sent again, or the fetch
/// waits out the whole one-second block. Each round leaves the consumer with a stale wake-up (both
/// queues got a message), then times one message on the second queue. Before the unblock was
/// retried most rounds took the full second (a round shows which path delivered: ~1 s is the
/// block running out, milliseconds the wake-up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_on_a_second_queue_wakes_an_idle_consumer_at_once() {
    let s = Space::new().await;
    let b = Arc::new(s.broker("").await);
    let mut c = b
        .consume(&["first".to_owned(), "second".to_owned()], 8)
        .await
        .unwrap();
    let mut slow = Vec::new();
    for round in 0..20 {
        // Idle first, so the next fetch waits; then both queues at once.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (m1, m2) = (message(3 * round, 0), message(3 * round + 1, 0));
        let (x, y) = tokio::join!(b.publish("first", &m1), b.publish("second", &m2));
        x.unwrap();
        y.unwrap();
        for _ in 0..2 {
            next(&mut c).await.ack().await.unwrap();
        }
        let b2 = b.clone();
        let publisher = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            b2.publish("second", &message(3 * round + 2, 0))
                .await
                .unwrap();
            Instant::now()
        });
        let d = next(&mut c).await;
        let got = Instant::now();
        let pushed = publisher.await.unwrap();
        assert_eq!(task_id(&d), format!("task-{}", 3 * round + 2));
        d.ack().await.unwrap();
        let took = got.saturating_duration_since(pushed);
        // Half the block: a wake-up that worked is milliseconds even on a loaded machine.
        if took >= Duration::from_millis(500) {
            slow.push((round, took));
        }
    }
    c.close().await.unwrap();
    assert!(
        slow.is_empty(),
        "rounds whose message waited for the block to run out: {slow:?}"
    );
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
        // 0 would hand every running job out again at the next sweep (defect 16.5).
        "redis://127.0.0.1:6379/0?visibility_timeout=0",
        "redis://127.0.0.1:6379/0?visibility_timeout=1e300",
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
