//! What lies in Redis: kombu's envelope and priority keys, malformed envelopes dead-lettered, and
//! interop with the real kombu of the pinned venv.

use super::*;

#[tokio::test]
async fn envelope_on_the_wire_is_kombus() {
    let s = Space::new().await;
    let b = s.broker("").await;
    let mut m = message(7, 3);
    m.properties.expiration = Some("60000".into());
    b.publish("wire", &m).await.unwrap();
    let pushed = s.lrange(&format!("wire{SEP}3")).await;
    assert_eq!(pushed.len(), 1);
    let v: Value = serde_json::from_slice(&pushed[0]).unwrap();
    let keys = |v: &Value| -> Vec<String> { v.as_object().unwrap().keys().cloned().collect() };
    assert_eq!(
        keys(&v),
        [
            "body",
            "content-encoding",
            "content-type",
            "headers",
            "properties"
        ]
    );
    assert_eq!(
        keys(&v["properties"]),
        [
            "correlation_id",
            "reply_to",
            "delivery_mode",
            "expiration",
            "delivery_info",
            "priority",
            "body_encoding",
            "delivery_tag"
        ]
    );
    assert_eq!(
        v["properties"]["delivery_info"],
        json!({"exchange": "", "routing_key": "wire"})
    );
    assert_eq!(v["properties"]["body_encoding"], "base64");
    let text = String::from_utf8(pushed[0].clone()).unwrap();
    assert!(text.starts_with(r#"{"body": "W1s3LCAiaFx1MDBlOSJdLCB7fSwgeyJjYWxsYmFja3MiOiBudWxsfV0=", "content-encoding": "utf-8", "content-type": "application/json", "headers": {"lang": "py""#), "{text}");

    // The envelope Celery 5.7 pushed, consumed by us; its bytes are kept as they are in `unacked`.
    let sample = r#"{"body": "W1syLCAzXSwgeyJ6IjogImhcdTAwZTlsbG8gXHUyNjAzIn0sIHsiY2FsbGJhY2tzIjogbnVsbCwgImVycmJhY2tzIjogbnVsbCwgImNoYWluIjogbnVsbCwgImNob3JkIjogbnVsbH1d", "content-encoding": "utf-8", "content-type": "application/json", "headers": {"lang": "py", "task": "demo.add", "id": "85621692-0899-4a99-a3c9-46d0063eef39", "shadow": null, "eta": "2026-11-23T11:23:37.319511+00:00", "expires": "2026-11-23T11:24:32.319511+00:00", "group": null, "group_index": null, "retries": 0, "timelimit": [10, 5.5], "root_id": "85621692-0899-4a99-a3c9-46d0063eef39", "parent_id": null, "argsrepr": "(2, 3)", "kwargsrepr": "{'z': 'h\u00e9llo \u2603'}", "origin": "gen10785@vm", "ignore_result": null, "replaced_task_nesting": 0, "stamped_headers": null, "stamps": {}}, "properties": {"correlation_id": "85621692-0899-4a99-a3c9-46d0063eef39", "reply_to": "a2c3a804-92fa-3a6c-9aa0-ca9fde3742cc", "delivery_mode": 2, "expiration": "60000", "delivery_info": {"exchange": "", "routing_key": "probeq"}, "priority": 3, "body_encoding": "base64", "delivery_tag": "944d3ba7-6c3f-4749-9676-91ebb81f4ec4"}}"#;
    let mut raw = s.raw.clone();
    let _: () = raw
        .lpush(s.key(&format!("probeq{SEP}3")), sample)
        .await
        .unwrap();
    let mut c = b.consume(&queue("probeq"), 1).await.unwrap();
    let d = next(&mut c).await;
    assert_eq!(d.message.task_name(), Some("demo.add"));
    assert_eq!(d.message.properties.priority, 3);
    assert_eq!(d.message.properties.expiration.as_deref(), Some("60000"));
    assert_eq!(
        d.message.body,
        br#"[[2, 3], {"z": "h\u00e9llo \u2603"}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]"#
    );
    let record: String = raw
        .hget(s.key("unacked"), "944d3ba7-6c3f-4749-9676-91ebb81f4ec4")
        .await
        .unwrap();
    assert_eq!(record, format!(r#"[{sample}, "", "probeq"]"#));
    d.ack().await.unwrap();
    assert_eq!(s.unacked().await, (0, 0));
}

#[tokio::test]
async fn priority_keys_and_priority_major_order() {
    let s = Space::new().await;
    let b = s.broker("").await;
    for (q, n, p) in [
        ("a", 1, 9),
        ("b", 2, 0),
        ("a", 3, 0),
        ("b", 4, 6),
        ("a", 5, 5),
        ("b", 6, 200),
    ] {
        b.publish(q, &message(n, p)).await.unwrap();
    }
    // Priorities map to kombu's steps: 5 -> 3, 200 -> 9.
    for (key, len) in [
        ("a".to_owned(), 1),
        (format!("a{SEP}3"), 1),
        (format!("a{SEP}9"), 1),
        ("b".to_owned(), 1),
        (format!("b{SEP}6"), 1),
        (format!("b{SEP}9"), 1),
        (format!("a{SEP}6"), 0),
    ] {
        assert_eq!(s.llen(&key).await, len, "{key:?}");
    }
    let mut c = b
        .consume(&["a".to_owned(), "b".to_owned()], 10)
        .await
        .unwrap();
    let mut order = Vec::new();
    for _ in 0..6 {
        let d = next(&mut c).await;
        order.push((d.queue.clone(), task_id(&d)));
        d.ack().await.unwrap();
    }
    let expected: Vec<(String, String)> =
        [("a", 3), ("b", 2), ("a", 5), ("b", 4), ("a", 1), ("b", 6)]
            .iter()
            .map(|(q, n)| (q.to_string(), format!("task-{n}")))
            .collect();
    assert_eq!(order, expected);
    assert_eq!(s.unacked().await, (0, 0));
}

#[tokio::test]
async fn malformed_envelopes_are_dead_lettered() {
    let s = Space::new().await;
    let b = s.broker("").await;
    let mut raw = s.raw.clone();
    let garbage: &[u8] = b"not json \xff";
    let undecodable =
        br#"{"body": "x", "properties": {"body_encoding": "rot13", "delivery_tag": "bad-1"}}"#;
    let _: () = raw.lpush(s.key("mal"), garbage).await.unwrap();
    let _: () = raw.lpush(s.key("mal"), &undecodable[..]).await.unwrap();
    b.publish("mal", &message(1, 0)).await.unwrap();
    let mut c = b.consume(&queue("mal"), 4).await.unwrap();
    let d = next(&mut c).await;
    assert_eq!(task_id(&d), "task-1");
    // Both bad ones are kept, byte for byte, in the dead-letter list; only the good one is unacked.
    // (The one that fails to decode in Rust is moved there in the background.)
    let deadline = Instant::now() + PATIENCE;
    while s.llen("mal.celerity.dead").await < 2 {
        assert!(Instant::now() < deadline, "not dead-lettered");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut dead = s.lrange("mal.celerity.dead").await;
    dead.sort();
    let mut expected = vec![garbage.to_vec(), undecodable.to_vec()];
    expected.sort();
    assert_eq!(dead, expected);
    assert_eq!(s.unacked().await, (1, 1));
    d.ack().await.unwrap();
    assert_eq!(s.unacked().await, (0, 0));
    // The consumer goes on.
    b.publish("mal", &message(2, 0)).await.unwrap();
    assert_eq!(task_id(&next(&mut c).await), "task-2");
    c.close().await.unwrap();
}

/// Two messages with the same delivery tag (a producer that does not make unique tags): the second
/// must not overwrite the first's `unacked` record (one settle would then drop both). Before: both
/// were handed out under one record, and acking them left one message nowhere.
#[tokio::test]
async fn a_reused_delivery_tag_does_not_overwrite_an_unacked_message() {
    let s = Space::new().await;
    let b = s.broker("").await;
    let mut raw = s.raw.clone();
    let envelope = |n: usize| {
        let body = base64_json(&format!("[[{n}], {{}}, {{}}]"));
        format!(
            r#"{{"body": "{body}", "content-encoding": "utf-8", "content-type": "application/json", "headers": {{"lang": "py", "task": "tests.add", "id": "dup-{n}"}}, "properties": {{"body_encoding": "base64", "delivery_info": {{"exchange": "", "routing_key": "dup"}}, "delivery_tag": "same-tag"}}}}"#
        )
    };
    let _: () = raw.lpush(s.key("dup"), envelope(1)).await.unwrap();
    let _: () = raw.lpush(s.key("dup"), envelope(2)).await.unwrap();
    let mut c = b.consume(&queue("dup"), 4).await.unwrap();
    let d = next(&mut c).await;
    assert_eq!(task_id(&d), "dup-1");
    let deadline = Instant::now() + PATIENCE;
    while s.llen("dup.celerity.dead").await < 1 {
        assert!(Instant::now() < deadline, "the second one went nowhere");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let dead = s.lrange("dup.celerity.dead").await;
    assert_eq!(dead, vec![envelope(2).into_bytes()]);
    assert_eq!(s.unacked().await, (1, 1));
    // A third with that tag, fetched while the first is still unacked (a later fetch than the
    // first's): dead-lettered too, the first's record untouched.
    let _: () = raw.lpush(s.key("dup"), envelope(3)).await.unwrap();
    let none = tokio::time::timeout(Duration::from_millis(300), c.next()).await;
    assert!(none.is_err(), "nothing else is deliverable");
    let dead = s.lrange("dup.celerity.dead").await;
    assert_eq!(
        dead,
        vec![envelope(3).into_bytes(), envelope(2).into_bytes()]
    );
    assert_eq!(s.unacked().await, (1, 1));
    d.ack().await.unwrap();
    assert_eq!(s.unacked().await, (0, 0));
    c.close().await.unwrap();
}

fn base64_json(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(text)
}

#[tokio::test]
async fn the_dead_letter_list_keeps_the_newest_max_dead_letters() {
    let s = Space::new().await;
    let b = s.broker("&max_dead_letters=3").await;
    let mut raw = s.raw.clone();
    // Five that are not envelopes (dead-lettered by the fetch script), one that does not decode
    // (moved there by the consumer), oldest first.
    for i in 0..5 {
        let _: () = raw
            .lpush(s.key("capped"), format!("not json {i}"))
            .await
            .unwrap();
    }
    let undecodable =
        br#"{"body": "x", "properties": {"body_encoding": "rot13", "delivery_tag": "bad-9"}}"#;
    let _: () = raw.lpush(s.key("capped"), &undecodable[..]).await.unwrap();
    b.publish("capped", &message(1, 0)).await.unwrap();
    let mut c = b.consume(&queue("capped"), 16).await.unwrap();
    let d = next(&mut c).await;
    assert_eq!(task_id(&d), "task-1");
    d.ack().await.unwrap();
    let expected: Vec<Vec<u8>> = vec![
        undecodable.to_vec(),
        b"not json 4".to_vec(),
        b"not json 3".to_vec(),
    ];
    // The consumer moves the undecodable one, then trims, in the background.
    let deadline = Instant::now() + PATIENCE;
    let mut dead = s.lrange("capped.celerity.dead").await;
    while dead != expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
        dead = s.lrange("capped.celerity.dead").await;
    }
    assert_eq!(dead, expected);
    c.close().await.unwrap();
}

/// Interop with the real kombu 5.7 (Python) from the pinned venv.
#[tokio::test]
async fn python_kombu_interop() {
    let Some(python) = celerity_testsupport::celery_python() else {
        return;
    };
    let s = Space::new().await;
    let b = s.broker("").await;
    b.publish("interop", &message(42, 3)).await.unwrap();
    let script = r#"
import json, sys
from kombu import Connection, Exchange, Queue, Producer
prefix = sys.argv[1]
with Connection('redis://127.0.0.1:6379/0', transport_options={'global_keyprefix': prefix}) as conn:
    q = Queue('interop', Exchange('interop', type='direct'), routing_key='interop')
    got = []
    def on(body, message):
        got.append({'body': message.body.decode() if isinstance(message.body, bytes) else message.body,
                    'headers': message.headers, 'priority': message.properties.get('priority'),
                    'correlation_id': message.properties.get('correlation_id'),
                    'content_type': message.content_type})
        message.ack()
    with conn.Consumer(q, callbacks=[on], accept=['json']):
        conn.drain_events(timeout=5)
    Producer(conn).publish({'from': 'python'}, exchange='', routing_key='frompy', serializer='json',
                           headers={'task': 'py.task', 'id': 'py-1'}, priority=6, correlation_id='py-1')
    print(json.dumps(got))
"#;
    let out = tokio::process::Command::new(&python)
        .arg("-c")
        .arg(script)
        .arg(&s.prefix)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        got[0]["body"],
        json!(r#"[[42, "h\u00e9"], {}, {"callbacks": null}]"#)
    );
    assert_eq!(got[0]["headers"]["id"], json!("task-42"));
    assert_eq!(got[0]["priority"], json!(3));
    assert_eq!(got[0]["correlation_id"], json!("task-42"));
    assert_eq!(got[0]["content_type"], json!("application/json"));
    // kombu acked it from the structures we share.
    assert_eq!(s.unacked().await, (0, 0));
    assert_eq!(b.queue_len("interop").await.unwrap(), 0);

    // And what kombu published, we consume.
    let mut c = b.consume(&queue("frompy"), 1).await.unwrap();
    let d = next(&mut c).await;
    assert_eq!(d.message.body, br#"{"from": "python"}"#);
    assert_eq!(d.message.task_id(), Some("py-1"));
    assert_eq!(d.message.properties.priority, 6);
    assert_eq!(d.message.properties.content_type, "application/json");
    d.ack().await.unwrap();
    assert_eq!(s.unacked().await, (0, 0));
    c.close().await.unwrap();

    // Each side's restore sweep brings back what the other left unacked.
    let sweep = r#"
import os, sys
from kombu import Connection
prefix, mode = sys.argv[1], sys.argv[2]
conn = Connection('redis://127.0.0.1:6379/0',
                  transport_options={'global_keyprefix': prefix, 'visibility_timeout': 0})
ch = conn.default_channel
if mode == 'restore':
    ch.qos.restore_visible(num=100)
    print('restored')
else:
    m = ch.basic_get('frompy2', no_ack=False)
    print(m.headers['id'], flush=True)
    os._exit(0)  # die holding the unacked message
"#;
    let run_python = |mode: &'static str| {
        let prefix = s.prefix.clone();
        let python = python.clone();
        async move {
            let out = tokio::process::Command::new(&python)
                .arg("-c")
                .arg(sweep)
                .arg(prefix)
                .arg(mode)
                .output()
                .await
                .unwrap();
            assert!(
                out.status.success(),
                "python failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        }
    };
    // Ours, restored by kombu.
    b.publish("ours", &message(5, 0)).await.unwrap();
    let mut c = b.consume(&queue("ours"), 1).await.unwrap();
    let held = next(&mut c).await;
    assert_eq!(run_python("restore").await, "restored");
    assert_eq!(s.unacked().await, (0, 0));
    held.ack().await.unwrap(); // too late: harmless
    let d = next(&mut c).await;
    assert_eq!((task_id(&d), d.redelivered), ("task-5".into(), true));
    d.ack().await.unwrap();
    c.close().await.unwrap();
    // kombu's, restored by us.
    b.publish("frompy2", &message(6, 0)).await.unwrap();
    assert_eq!(run_python("take").await, "task-6");
    assert_eq!(s.unacked().await, (1, 1));
    // (The smallest visibility timeout: 0 is refused.)
    tokio::time::sleep(Duration::from_millis(20)).await;
    let rescuer = s
        .broker("&visibility_timeout=0.001&restore_interval=3600")
        .await;
    assert_eq!(rescuer.restore_visible().await.unwrap(), 1);
    let mut c = rescuer.consume(&queue("frompy2"), 1).await.unwrap();
    let d = next(&mut c).await;
    assert_eq!((task_id(&d), d.redelivered), ("task-6".into(), true));
    d.ack().await.unwrap();
    assert_eq!(s.unacked().await, (0, 0));
    c.close().await.unwrap();
}
