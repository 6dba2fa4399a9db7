//! The hostile run on the local Redis, under a key prefix of its own (queues, the dead-letter
//! list, pidbox channel); results on Redis, deleted by id at the end. Redis also gets envelopes
//! that are not kombu's: not JSON, bad UTF-8, headers nested 10,000 deep, fields of wrong types.

use serde_json::json;

use celerity_broker::{connect_backend, connect_broker};
use celerity_testsupport::{delete_redis_prefix, REDIS};

use crate::gen::{Case, Expect, Gen, Payload};
use crate::run::{bounded, Raw, Run};

/// Raw envelopes pushed onto the queue's list as they are.
pub fn raw_cases(g: &mut Gen, count: usize) -> Vec<Case> {
    (0..count)
        .map(|i| {
            let tag = g.tag();
            let (id, m) = g.base(&tag);
            let body = base64_of(&m.body);
            let bytes: Vec<u8> = match i % 8 {
                0 => format!("not json {tag}").into_bytes(),
                1 => {
                    let mut b = format!("{{\"body\": \"{tag}").into_bytes();
                    b.extend_from_slice(b"\xff\xfe\"}");
                    b
                }
                2 => {
                    let mut s = format!("{{\"x\": \"{tag}\", \"headers\": ");
                    s.push_str(&"[".repeat(g.deep));
                    s.push_str(&"]".repeat(g.deep));
                    s.push('}');
                    s.into_bytes()
                }
                3 => json!([tag, 1, 2]).to_string().into_bytes(),
                4 => json!({"body": body, "headers": [tag], "properties": {}}).to_string().into_bytes(),
                5 => json!({"body": 5, "content-type": "application/json", "headers": {"x-hostile": tag, "id": id, "task": "demo.add"}, "properties": {"body_encoding": "base64", "delivery_tag": "t"}}).to_string().into_bytes(),
                6 => json!({"body": body, "content-type": "application/json", "content-encoding": "utf-8", "headers": {"x-hostile": tag, "id": id, "task": "demo.add"}, "properties": {"body_encoding": "rot13", "delivery_tag": tag}}).to_string().into_bytes(),
                _ => json!({"body": body, "content-type": "application/json", "content-encoding": "utf-8", "headers": {"x-hostile": tag, "id": id, "task": "demo.add"}, "properties": {"body_encoding": "base64", "delivery_mode": "x", "priority": 1e300, "delivery_tag": tag}}).to_string().into_bytes(),
            };
            Case {
                kind: "redis-envelope",
                id: None,
                tag,
                payload: Payload::RedisRaw(bytes),
                expect: Expect::Refused,
            }
        })
        .collect()
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_messages_on_redis() {
    crate::count_panics();
    let prefix = format!("{}:", celerity_testsupport::unique("hostile"));
    let _cleanup = celerity_testsupport::Cleanup::new().redis_prefix(prefix.clone());
    let url = format!("{REDIS}?global_keyprefix={prefix}");
    let broker = connect_broker(&url).await.unwrap();
    let worker_broker = connect_broker(&bounded(&url)).await.unwrap();
    let backend = connect_backend(REDIS).await.unwrap();
    let client = ::redis::Client::open(REDIS).unwrap();
    let conn = client.get_multiplexed_async_connection().await.unwrap();
    let run = Run::new(
        "redis",
        [broker, worker_broker],
        backend,
        Raw::Redis {
            conn,
            prefix: prefix.clone(),
        },
    );
    let mut g = Gen::new(crate::seed() ^ 0x5eed, "r");
    let extra = raw_cases(&mut g, 80);
    run.go(crate::count(), crate::seed(), extra).await;
    delete_redis_prefix(&prefix).await;
}

/// Jobs published with priority 255 (Redis maps it to the last step, 9) are all served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_of_priority_255_are_all_served_on_redis() {
    let prefix = format!("{}:", celerity_testsupport::unique("hostile-prio"));
    let _cleanup = celerity_testsupport::Cleanup::new().redis_prefix(prefix.clone());
    let broker = connect_broker(&format!("{REDIS}?global_keyprefix={prefix}"))
        .await
        .unwrap();
    let backend = connect_backend(REDIS).await.unwrap();
    let queue = celerity_testsupport::unique("prio");
    let mut ids = Vec::new();
    for i in 0..40 {
        let t = celerity_broker::protocol::TaskMessage::new(
            "demo.add",
            vec![json!(i), json!(1)],
            serde_json::Map::new(),
        );
        let mut m = t.encode();
        m.properties.priority = if i % 2 == 0 { 255 } else { 9 };
        broker.publish(&queue, &m).await.unwrap();
        ids.push((t.id().to_owned(), i + 1));
    }
    let worker = celerity_testsupport::InProcessWorker::demo(
        broker.clone(),
        Some(backend.clone()),
        &queue,
        4,
    );
    for (id, sum) in &ids {
        let meta = backend
            .wait(id, Some(std::time::Duration::from_secs(20)))
            .await
            .unwrap();
        assert_eq!(meta.result, json!(sum));
        let _ = backend.forget(id).await;
    }
    worker.stop().await;
}
