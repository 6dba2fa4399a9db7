//! What happens to unacked messages: the visibility timeout restores them, keep-alive renews the
//! lease, a consumer killed mid-flight loses nothing, `next` is cancel-safe, and closing or dropping a
//! consumer (or the broker) gives them back.

use super::*;

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
    // Another worker's sweep (visibility timeout 1 ms) brings everything back: each message exactly once.
    // (The smallest visibility timeout: 0 is refused.)
    tokio::time::sleep(Duration::from_millis(20)).await;
    let rescuer = s
        .broker("&visibility_timeout=0.001&restore_interval=3600")
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
