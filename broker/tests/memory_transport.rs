//! The `memory://` transport: publish/consume/ack, requeue, prefetch, restore on close, priorities.

use std::time::Duration;

use celerity_broker::memory::MemoryBroker;
use celerity_broker::message::{Message, Properties};
use celerity_broker::{connect_broker, Broker};

fn msg(n: u32, priority: u8) -> Message {
    Message {
        properties: Properties {
            correlation_id: Some(format!("id-{n}")),
            priority,
            ..Properties::default()
        },
        headers: Default::default(),
        body: format!("[[{n}], {{}}, {{}}]").into_bytes(),
    }
}

fn unique() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[tokio::test]
async fn round_trip_and_ack() {
    let b = MemoryBroker::named(&unique());
    b.publish("q", &msg(1, 0)).await.unwrap();
    assert_eq!(b.queue_len("q").await.unwrap(), 1);
    let mut c = b.consume(&["q".into()], 4).await.unwrap();
    let d = c.next().await.unwrap().unwrap();
    assert_eq!(d.message, msg(1, 0));
    assert_eq!(d.queue, "q");
    assert!(!d.redelivered);
    d.ack().await.unwrap();
    c.close().await.unwrap();
    assert_eq!(b.queue_len("q").await.unwrap(), 0);
}

#[tokio::test]
async fn same_name_shares_queues_and_names_are_isolated() {
    let name = unique();
    let a = connect_broker(&format!("memory://{name}")).await.unwrap();
    let b = connect_broker(&format!("memory://{name}")).await.unwrap();
    let other = MemoryBroker::named(&unique());
    a.publish("q", &msg(1, 0)).await.unwrap();
    assert_eq!(b.queue_len("q").await.unwrap(), 1);
    assert_eq!(other.queue_len("q").await.unwrap(), 0);
    assert!(connect_broker("memory://x?bogus=1").await.is_err());
}

#[tokio::test]
async fn reject_requeue_and_drop() {
    let b = MemoryBroker::named(&unique());
    b.publish_batch("q", &[msg(1, 0), msg(2, 0)]).await.unwrap();
    let mut c = b.consume(&["q".into()], 10).await.unwrap();
    let first = c.next().await.unwrap().unwrap();
    first.reject(true).await.unwrap();
    let second = c.next().await.unwrap().unwrap();
    assert_eq!(second.message, msg(2, 0));
    second.reject(false).await.unwrap();
    let again = c.next().await.unwrap().unwrap();
    assert_eq!(again.message, msg(1, 0));
    assert!(again.redelivered);
    again.ack().await.unwrap();
    assert_eq!(b.queue_len("q").await.unwrap(), 0);
}

#[tokio::test]
async fn prefetch_window_holds_back_deliveries() {
    let b = MemoryBroker::named(&unique());
    b.publish_batch("q", &[msg(1, 0), msg(2, 0), msg(3, 0)])
        .await
        .unwrap();
    let mut c = b.consume(&["q".into()], 2).await.unwrap();
    let d1 = c.next().await.unwrap().unwrap();
    let _d2 = c.next().await.unwrap().unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(100), c.next())
            .await
            .is_err(),
        "window of 2 let a 3rd through"
    );
    d1.ack().await.unwrap();
    let d3 = tokio::time::timeout(Duration::from_secs(2), c.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(d3.message, msg(3, 0));
}

#[tokio::test]
async fn close_gives_unacked_back_first() {
    let b = MemoryBroker::named(&unique());
    b.publish_batch("q", &[msg(1, 0), msg(2, 0)]).await.unwrap();
    let mut c = b.consume(&["q".into()], 10).await.unwrap();
    let d = c.next().await.unwrap().unwrap();
    c.close().await.unwrap();
    assert_eq!(b.queue_len("q").await.unwrap(), 2);
    d.ack().await.unwrap(); // harmless after close
    let mut c2 = b.consume(&["q".into()], 10).await.unwrap();
    let again = c2.next().await.unwrap().unwrap();
    assert_eq!(again.message, msg(1, 0));
    assert!(again.redelivered);
    drop(again);
    drop(c2); // dropping a consumer restores too
    assert_eq!(b.queue_len("q").await.unwrap(), 2);
}

#[tokio::test]
async fn higher_priority_first_and_waiting_consumer_wakes() {
    let b = MemoryBroker::named(&unique());
    b.publish_batch("q", &[msg(1, 0), msg(2, 9), msg(3, 5)])
        .await
        .unwrap();
    let mut c = b.consume(&["q".into(), "other".into()], 10).await.unwrap();
    let mut order: Vec<Message> = Vec::new();
    for _ in 0..3 {
        let d = c.next().await.unwrap().unwrap();
        order.push(d.message.clone());
        d.ack().await.unwrap();
    }
    assert_eq!(order, vec![msg(2, 9), msg(3, 5), msg(1, 0)]);
    let b2 = b.clone();
    let waiter = tokio::spawn(async move { c.next().await.map(|d| d.map(|d| d.queue.clone())) });
    tokio::time::sleep(Duration::from_millis(20)).await;
    b2.publish("other", &msg(4, 0)).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(2), waiter)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got.as_deref(), Some("other"));
}

#[tokio::test]
async fn purge_counts_and_close_stops_consumers() {
    let b = MemoryBroker::named(&unique());
    b.publish_batch("q", &[msg(1, 0), msg(2, 3)]).await.unwrap();
    assert_eq!(b.purge("q").await.unwrap(), 2);
    assert_eq!(b.purge("missing").await.unwrap(), 0);
    let mut c = b.consume(&["q".into()], 1).await.unwrap();
    let b2 = b.clone();
    let waiter = tokio::spawn(async move { c.next().await });
    tokio::time::sleep(Duration::from_millis(20)).await;
    b2.close().await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(2), waiter)
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(r, Ok(None)));
}

#[tokio::test]
async fn a_dropped_delivery_is_requeued() {
    let b = MemoryBroker::named(&unique());
    b.publish("q", &msg(1, 0)).await.unwrap();
    let mut c = b.consume(&["q".into()], 1).await.unwrap();
    let d = c.next().await.unwrap().unwrap();
    // Nobody settles it: before, it stayed unacked until the consumer closed.
    drop(d);
    let again = tokio::time::timeout(Duration::from_secs(5), c.next())
        .await
        .expect("the dropped delivery came back")
        .unwrap()
        .unwrap();
    assert_eq!(again.message, msg(1, 0));
    assert!(again.redelivered);
    again.ack().await.unwrap();
    assert_eq!(b.queue_len("q").await.unwrap(), 0);
}
