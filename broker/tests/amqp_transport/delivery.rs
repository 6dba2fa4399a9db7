//! Delivery on RabbitMQ: a message round-trips intact, a batch is consumed exactly once by two
//! consumers, the prefetch window (across all queues of a consumer), reject, grouped acks, close gives
//! unacked deliveries back, purge, priorities, and a throughput report.

use super::*;

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
    let mut c = b.consume(&qs.names, 2).await.unwrap();
    let first = next_within(&mut c, 10.0).await.expect("first");
    let _second = next_within(&mut c, 10.0).await.expect("second");
    assert!(
        next_within(&mut c, 0.5).await.is_none(),
        "the window of 2 covers both queues together"
    );
    first.ack().await.unwrap();
    let third = next_within(&mut c, 10.0).await.expect("third after an ack");
    assert!(qs.names.contains(&third.queue));
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

#[tokio::test]
async fn a_dropped_delivery_is_requeued() {
    let qs = Queues::new("dropped", 1);
    let b = broker("").await;
    b.publish(qs.name(0), &msg(1)).await.unwrap();
    let mut c = b.consume(&[qs.name(0).to_owned()], 1).await.unwrap();
    let d = next_within(&mut c, 10.0).await.expect("the message");
    // Nobody settles it: before, it held the channel's only prefetch slot until the channel closed.
    drop(d);
    let again = next_within(&mut c, 10.0)
        .await
        .expect("the dropped delivery came back");
    assert_eq!(n_of(&again), 1);
    assert!(again.redelivered);
    again.ack().await.unwrap();
    c.close().await.unwrap();
}
