//! What `celerity call` puts on real Redis and RabbitMQ is read by real Celery 5.7.
//!
//! The real binary sends one fully optioned call (positional args, unicode/nested kwargs,
//! `--countdown`, `--expires`, `--priority`, `--task-id`) and one `--count 50` batch; then
//! `broker/tests/vectors/accept.py --fetch-…` consumes the queue with kombu exactly as a worker does
//! (declare, `Consumer(no_ack=False)`, Celery's strategy and request, ack) and reports what Celery
//! understood. Set `CELERITY_NO_PYTHON=1` to skip (the test then only prints a note).

use std::collections::HashSet;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use celerity_broker::protocol::time::parse_iso;
use celerity_testsupport::{celery_python, text, AMQP, REDIS};
use redis::Commands;
use serde_json::{json, Value};

const TASK: &str = "proj.tasks.echo";
const BULK_TASK: &str = "proj.tasks.add";
const BULK: usize = 50;
const ARGS: &str = r#"[2, "três ☃", [1, {"a": null, "b": [true, 2.5]}], -7, "tab\there"]"#;
const KWARGS: &str = r#"{"name": "Zoë ☕", "nested": {"list": [1, 2.5, true, null], "emoji": "🚀🎉", "deep": {"x": {"y": "ü"}}}, "empty": {}}"#;
const BULK_ARGS: &str = "[2, 3]";
const BULK_KWARGS: &str = r#"{"who": "Ærø"}"#;

fn unique() -> String {
    celerity_testsupport::unique("celery-reads")
}

fn celerity(broker: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_celerity"))
        .arg("--broker")
        .arg(broker)
        .args(args)
        .env_remove("CELERITY_BROKER_URL")
        .env_remove("CELERITY_RESULT_BACKEND")
        .stdin(Stdio::null())
        .output()
        .expect("run celerity")
}

/// Sends the optioned call and the batch; returns the optioned call's id.
fn send_all(broker: &str, queue: &str) -> String {
    let id = uuid::Uuid::new_v4().to_string();
    let out = celerity(
        broker,
        &[
            "call",
            TASK,
            "--args",
            ARGS,
            "--kwargs",
            KWARGS,
            "-Q",
            queue,
            "--countdown",
            "30",
            "--expires",
            "120",
            "--priority",
            "3",
            "--task-id",
            &id,
        ],
    );
    assert!(out.status.success(), "call: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), id, "call prints the given id");

    let count = BULK.to_string();
    let out = celerity(
        broker,
        &[
            "call",
            BULK_TASK,
            "--args",
            BULK_ARGS,
            "--kwargs",
            BULK_KWARGS,
            "-Q",
            queue,
            "--count",
            &count,
        ],
    );
    assert!(out.status.success(), "call --count: {}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains(&format!("sent {BULK} messages")),
        "{}",
        text(&out.stderr)
    );
    id
}

/// Runs accept.py in live mode and parses its lines.
fn fetch(python: &Path, live_args: &[&str]) -> Vec<Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../broker/tests/vectors/accept.py");
    let out = Command::new(python)
        .arg(&script)
        .args(live_args)
        // Ask for more than was sent: an extra or duplicated message would show up.
        .args(["--count", &(2 * (BULK + 1)).to_string()])
        .stdin(Stdio::null())
        .output()
        .expect("run accept.py");
    assert!(
        out.status.success(),
        "accept.py {live_args:?} failed ({:?}): {}",
        out.status,
        text(&out.stderr)
    );
    text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Everything Celery reported, checked against what was sent.
fn assert_celery_view(views: &[Value], id: &str, queue: &str) {
    assert_eq!(views.len(), BULK + 1, "messages Celery took off the queue");
    let mut bulk_ids = HashSet::new();
    let mut seen_optioned = 0;
    for (i, v) in views.iter().enumerate() {
        assert_eq!(v["index"], json!(i));
        assert_eq!(v["ok"], json!(true), "message {i} refused: {v}");
        assert_eq!(v["settled"], json!("ack"), "{v}");
        assert_eq!(v["protocol"], json!(2), "{v}");
        assert_eq!(v["content_type"], json!("application/json"));
        assert_eq!(v["delivery_info"]["routing_key"], json!(queue), "{v}");
        assert_eq!(v["delivery_info"]["redelivered"], json!(false), "{v}");
        assert_eq!(v["revoked_on_receipt"], json!(false), "{v}");
        assert_eq!(v["correlation_id"], v["id"], "{v}");
        assert_eq!(v["root_id"], v["id"], "{v}");
        assert_eq!(v["retries"], json!(0));
        if v["id"] == json!(id) {
            seen_optioned += 1;
            assert_eq!((&v["task"], &v["name"]), (&json!(TASK), &json!(TASK)));
            assert_eq!(v["args"], serde_json::from_str::<Value>(ARGS).unwrap());
            assert_eq!(v["kwargs"], serde_json::from_str::<Value>(KWARGS).unwrap());
            assert_eq!(v["delivery_info"]["priority"], json!(3), "{v}");
            let at = |k: &str| {
                let s = v[k]
                    .as_str()
                    .unwrap_or_else(|| panic!("Celery saw no {k}: {v}"));
                parse_iso(s).unwrap_or_else(|e| panic!("{k} {s}: {e}"))
            };
            // Both come from the same `now`: expires (120 s) - eta (countdown 30 s) = 90 s.
            assert_eq!((at("expires") - at("eta")).num_milliseconds(), 90_000);
        } else {
            assert_eq!(
                (&v["task"], &v["name"]),
                (&json!(BULK_TASK), &json!(BULK_TASK))
            );
            assert_eq!(v["args"], serde_json::from_str::<Value>(BULK_ARGS).unwrap());
            assert_eq!(
                v["kwargs"],
                serde_json::from_str::<Value>(BULK_KWARGS).unwrap()
            );
            assert_eq!(
                (&v["eta"], &v["expires"]),
                (&Value::Null, &Value::Null),
                "{v}"
            );
            assert_eq!(v["delivery_info"]["priority"], json!(0), "{v}");
            let bid = v["id"].as_str().expect("id is a string");
            assert!(uuid::Uuid::parse_str(bid).is_ok(), "{bid}");
            bulk_ids.insert(bid.to_owned());
        }
    }
    assert_eq!(seen_optioned, 1, "the optioned call came back once");
    assert_eq!(bulk_ids.len(), BULK, "each copy has its own id");
}

/// After Celery acked everything, the broker has nothing left waiting (per our own CLI).
fn assert_queue_empty(broker: &str, queue: &str) {
    let out = celerity(broker, &["queues", queue]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), format!("{queue}\t0"));
}

/// Deletes every key under a prefix when dropped (also when the test panics).
struct RedisKeys(String);

impl Drop for RedisKeys {
    fn drop(&mut self) {
        let Ok(mut c) = redis::Client::open(REDIS).and_then(|c| c.get_connection()) else {
            return;
        };
        let keys: Vec<String> = match c.scan_match(format!("{}*", self.0)) {
            Ok(iter) => iter.filter_map(|k| k.ok()).collect(),
            Err(_) => return,
        };
        if !keys.is_empty() {
            let _: redis::RedisResult<()> = c.del(keys);
        }
    }
}

/// Deletes a queue and its same-named exchange when dropped (also when the test panics).
struct AmqpQueue(String);

impl Drop for AmqpQueue {
    fn drop(&mut self) {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            let props = lapin::ConnectionProperties::default();
            let Ok(conn) = lapin::Connection::connect(AMQP, props).await else {
                return;
            };
            if let Ok(ch) = conn.create_channel().await {
                let q = self.0.as_str();
                let _ = ch
                    .queue_delete(q.into(), lapin::options::QueueDeleteOptions::default())
                    .await;
                let _ = ch
                    .exchange_delete(q.into(), lapin::options::ExchangeDeleteOptions::default())
                    .await;
            }
            let _ = conn.close(0, "done".into()).await;
        });
    }
}

#[test]
fn celery_reads_what_celerity_call_puts_on_redis() {
    let Some(python) = celery_python() else {
        return;
    };
    let queue = unique();
    let prefix = format!("{queue}:");
    let keys = RedisKeys(prefix.clone());
    let broker = format!("{REDIS}?global_keyprefix={prefix}");
    let id = send_all(&broker, &queue);

    let views = fetch(
        &python,
        &[
            "--fetch-redis",
            REDIS,
            "--prefix",
            &prefix,
            "--queue",
            &queue,
        ],
    );
    assert_celery_view(&views, &id, &queue);
    // kombu's ack emulation worked on our messages: each one was recorded in `unacked` /
    // `unacked_index` under the prefix while in hand, and its records were gone after the ack.
    for v in &views {
        assert_eq!(v["unacked_before_settle"], json!(true), "{v}");
        assert_eq!(v["unacked_after_settle"], json!(0), "{v}");
    }
    assert_queue_empty(&broker, &queue);

    drop(keys);
    let mut c = redis::Client::open(REDIS)
        .and_then(|c| c.get_connection())
        .unwrap();
    let left: Vec<String> = c
        .scan_match(format!("{prefix}*"))
        .unwrap()
        .filter_map(|k| k.ok())
        .collect();
    assert!(left.is_empty(), "keys left behind: {left:?}");
}

#[test]
fn celery_reads_what_celerity_call_puts_on_rabbitmq() {
    let Some(python) = celery_python() else {
        return;
    };
    let queue = unique();
    let _cleanup = AmqpQueue(queue.clone());
    let id = send_all(AMQP, &queue);

    // accept.py declares the queue as a `celery worker -Q <queue>` would: RabbitMQ refuses
    // (406) if our declaration differs, so this also checks the topology matches Celery's.
    let views = fetch(&python, &["--fetch-amqp", AMQP, "--queue", &queue]);
    assert_celery_view(&views, &id, &queue);
    assert_queue_empty(AMQP, &queue);
}
