//! Plain delivery on Redis: publish, consume and ack, reject, purge, fair turns between queues,
//! the prefetch window, a batch consumed exactly once by two consumers, and parked (ETA) messages.

use super::*;

#[tokio::test]
async fn round_trip_publish_consume_ack() {
    let s = Space::new().await;
    let b = s.broker("").await;
    let m = message(1, 0);
    b.publish("jobs", &m).await.unwrap();
    assert_eq!(b.queue_len("jobs").await.unwrap(), 1);
    // Celery's binding, as kombu stores it.
    let mut raw = s.raw.clone();
    let member = format!("jobs{SEP}{SEP}jobs");
    for set in ["_kombu.binding.jobs", "_kombu.binding_permanent.jobs"] {
        let members: Vec<String> = raw.smembers(s.key(set)).await.unwrap();
        assert_eq!(members, std::slice::from_ref(&member), "{set}");
    }

    let mut c = b.consume(&queue("jobs"), 4).await.unwrap();
    let d = next(&mut c).await;
    assert_eq!(d.message, m);
    assert_eq!(d.queue, "jobs");
    assert!(!d.redelivered);
    assert_eq!(s.unacked().await, (1, 1));
    assert_eq!(s.llen("jobs").await, 0);
    d.keep_alive().await.unwrap();
    d.ack().await.unwrap();
    assert_eq!(s.unacked().await, (0, 0));
    c.close().await.unwrap();
    assert_eq!(b.queue_len("jobs").await.unwrap(), 0);
}

#[tokio::test]
async fn queues_take_turns_between_fetches() {
    let s = Space::new().await;
    let b = s.broker("").await;
    let batch: Vec<Message> = (0..10).map(|n| message(n, 0)).collect();
    b.publish_batch("x", &batch).await.unwrap();
    b.publish_batch("y", &batch).await.unwrap();
    // Prefetch 1: one message per fetch, so the round-robin shows in the order.
    let mut c = b.consume(&["x".into(), "y".into()], 1).await.unwrap();
    let mut queues = String::new();
    for _ in 0..6 {
        let d = next(&mut c).await;
        queues.push_str(&d.queue);
        d.ack().await.unwrap();
    }
    assert_eq!(queues, "xyxyxy");
}

#[tokio::test]
async fn batch_publish_consumed_exactly_once_by_two_consumers() {
    const N: usize = 5000;
    let s = Space::new().await;
    let b = Arc::new(s.broker("").await);
    let batch: Vec<Message> = (0..N).map(|n| message(n, (n % 10) as u8)).collect();
    b.publish_batch("bulk", &batch).await.unwrap();
    assert_eq!(b.queue_len("bulk").await.unwrap(), N as u64);

    let seen = Arc::new(Mutex::new(Vec::with_capacity(N)));
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let (b, seen) = (b.clone(), seen.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = b.consume(&queue("bulk"), 100).await.unwrap();
            let mut mine = 0;
            while seen.lock().unwrap().len() < N {
                let Ok(d) = tokio::time::timeout(Duration::from_millis(200), c.next()).await else {
                    continue;
                };
                let d = d.unwrap().unwrap();
                seen.lock().unwrap().push(task_id(&d));
                d.ack().await.unwrap();
                mine += 1;
            }
            c.close().await.unwrap();
            mine
        }));
    }
    let mut counts = Vec::new();
    for t in tasks {
        counts.push(
            tokio::time::timeout(Duration::from_secs(60), t)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let seen = seen.lock().unwrap().clone();
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(seen.len(), N, "deliveries");
    assert_eq!(unique.len(), N, "distinct messages");
    println!("per consumer: {counts:?}");
    assert_eq!(b.queue_len("bulk").await.unwrap(), 0);
    assert_eq!(s.unacked().await, (0, 0));
}

#[tokio::test]
async fn prefetch_window_is_respected() {
    let s = Space::new().await;
    let b = s.broker("").await;
    for n in 0..3 {
        b.publish("win", &message(n, 0)).await.unwrap();
    }
    let mut c = b.consume(&queue("win"), 2).await.unwrap();
    let d1 = next(&mut c).await;
    let _d2 = next(&mut c).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), c.next())
            .await
            .is_err(),
        "a third delivery came through a prefetch window of 2"
    );
    assert_eq!(s.unacked().await, (2, 2));
    assert_eq!(s.llen("win").await, 1);
    d1.ack().await.unwrap();
    let d3 = next(&mut c).await;
    assert_eq!(task_id(&d3), "task-2");
    // Widening the window lets more through; there is nothing left, so it waits.
    c.set_prefetch(5).await.unwrap();
    assert!(tokio::time::timeout(Duration::from_millis(100), c.next())
        .await
        .is_err());
    c.close().await.unwrap();
}

#[tokio::test]
async fn reject_with_and_without_requeue() {
    let s = Space::new().await;
    let b = s.broker("").await;
    b.publish("rej", &message(1, 0)).await.unwrap();
    b.publish("rej", &message(2, 0)).await.unwrap();
    let mut c = b.consume(&queue("rej"), 1).await.unwrap();
    let d = next(&mut c).await;
    assert_eq!(task_id(&d), "task-1");
    d.reject(true).await.unwrap();
    assert_eq!(s.unacked().await, (0, 0));
    // kombu requeues at the back: task-2 comes first, then task-1 marked redelivered.
    let d = next(&mut c).await;
    assert_eq!((task_id(&d), d.redelivered), ("task-2".into(), false));
    d.ack().await.unwrap();
    let d = next(&mut c).await;
    assert_eq!((task_id(&d), d.redelivered), ("task-1".into(), true));
    assert_eq!(d.message.headers["redelivered"], json!(true));
    d.reject(false).await.unwrap();
    assert_eq!(s.unacked().await, (0, 0));
    assert_eq!(b.queue_len("rej").await.unwrap(), 0);
    c.close().await.unwrap();
}

#[tokio::test]
async fn purge_and_queue_len() {
    let s = Space::new().await;
    let b = s.broker("").await;
    assert_eq!(b.queue_len("pq").await.unwrap(), 0);
    assert_eq!(b.purge("pq").await.unwrap(), 0);
    let batch: Vec<Message> = (0..10).map(|n| message(n, n as u8)).collect();
    b.publish_batch("pq", &batch).await.unwrap();
    b.publish("other", &message(0, 0)).await.unwrap();
    assert_eq!(b.queue_len("pq").await.unwrap(), 10);
    assert_eq!(b.purge("pq").await.unwrap(), 10);
    assert_eq!(b.queue_len("pq").await.unwrap(), 0);
    assert_eq!(b.queue_len("other").await.unwrap(), 1);
}

/// A parked delivery leaves `unacked` (no visibility timeout can hand it out early, no worker holds
/// it) for `celerity.scheduled`, and a consumer's forwarder puts it back on its queue when due.
#[tokio::test]
async fn parked_messages_wait_in_redis_and_come_back_when_due() {
    let s = Space::new().await;
    let b = s.broker("").await;
    b.publish("later", &message(7, 0)).await.unwrap();
    let mut c = b.consume(&queue("later"), 4).await.unwrap();
    let d = next(&mut c).await;
    let due = std::time::SystemTime::now() + Duration::from_millis(1500);
    assert!(d.can_park(due));
    d.park(due).await.unwrap();
    assert_eq!(s.unacked().await, (0, 0));
    let mut raw = s.raw.clone();
    let parked: usize = raw
        .zcard(s.key("celerity.scheduled").as_str())
        .await
        .unwrap();
    assert_eq!(parked, 1);
    assert_eq!(b.queue_len("later").await.unwrap(), 0);
    // Not before it is due...
    assert!(
        tokio::time::timeout(Duration::from_millis(1000), c.next())
            .await
            .is_err(),
        "came back early"
    );
    // ...and then it is delivered again.
    let again = next(&mut c).await;
    assert!(std::time::SystemTime::now() >= due);
    assert_eq!(task_id(&again), "task-7");
    again.ack().await.unwrap();
    let parked: usize = raw
        .zcard(s.key("celerity.scheduled").as_str())
        .await
        .unwrap();
    assert_eq!(parked, 0);
    c.close().await.unwrap();
}

#[tokio::test]
async fn a_dropped_delivery_is_requeued() {
    let s = Space::new().await;
    let b = s.broker("").await;
    b.publish("dropped", &message(1, 0)).await.unwrap();
    let mut c = b.consume(&queue("dropped"), 1).await.unwrap();
    let d = next(&mut c).await;
    assert_eq!(s.unacked().await, (1, 1));
    // Nobody settles it: before, it stayed in `unacked` until the visibility timeout (an hour).
    drop(d);
    let again = next(&mut c).await;
    assert_eq!(again.message.body, message(1, 0).body);
    assert!(again.redelivered);
    again.ack().await.unwrap();
    assert_eq!(s.unacked().await, (0, 0));
    c.close().await.unwrap();
}
