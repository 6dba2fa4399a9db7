//! Python sends (`send_task`, `.delay()`, `.apply_async()` with countdown, expires, priority) and our
//! worker runs: Python's `AsyncResult.get()` returns the value or raises our error type.

use super::*;

async fn python_producer_our_worker(kind: Kind) {
    let Some(python) = celery_python() else {
        return;
    };
    let env = Env::new(kind);
    let ours = demo_worker(&env, 4).await;

    let nested = json!({"list": [1, 2.5, true, null], "emoji": "🚀🎉", "deep": {"x": {"y": "ü"}}, "empty": {}});
    let calls = json!([
        {"via": "send_task", "name": "demo.add", "args": [2, 3]},
        {"via": "delay", "name": "demo.add", "args": [40, 2]},
        {"via": "send_task", "name": "demo.echo", "kwargs": {"name": "Zoë ☕", "n": 7}},
        {"via": "delay", "name": "demo.echo", "args": ["três ☃", [1, {"a": null}], -7, "tab\there"],
         "kwargs": {"nested": nested}},
        {"via": "apply_async", "name": "demo.mul", "args": [6, 7], "countdown": 2},
        {"via": "send_task", "name": "demo.add", "args": [1, 1], "expires": -30, "timeout": 3},
        {"via": "send_task", "name": "demo.add", "args": [5, 5], "expires": 120},
        {"via": "apply_async", "name": "demo.add", "args": [7, 8], "priority": 9},
        {"via": "send_task", "name": "demo.add", "args": [0.5, 0.25], "priority": 0},
        {"via": "send_task", "name": "demo.fail", "args": ["kaputt ☠ äöü"]},
        {"via": "send_task", "name": "demo.add", "args": ["a", 1]},
        {"via": "send_task", "name": "demo.flaky", "args": ["py-flaky", 2]},
        // Arguments by name and mixed, as Python's signatures `add(x, y)`, `mul(x, y)` allow; an
        // unknown keyword is a TypeError, as in Python.
        {"via": "apply_async", "name": "demo.add", "kwargs": {"x": 4, "y": 5}},
        {"via": "delay", "name": "demo.mul", "args": [6], "kwargs": {"y": 7}},
        {"via": "send_task", "name": "demo.add", "args": [1, 2], "kwargs": {"z": 3}},
    ]);
    let mut calls = calls;
    if kind == Kind::Redis {
        // Pickle is refused: not run, FAILURE stored (so get() raises), the message moved to the
        // dead-letter queue. (Redis only: there the dead-letter queue is under the test's prefix.)
        calls.as_array_mut().unwrap().push(
            json!({"via": "send_task", "name": "demo.add", "args": [1, 2], "serializer": "pickle"}),
        );
    }
    let got = env.python_calls(&python, &calls).await;
    let value = |i: usize| {
        assert_eq!(got[i]["ok"], json!(true), "call {i}: {}", got[i]);
        assert_eq!(got[i]["state"], json!("SUCCESS"), "call {i}: {}", got[i]);
        got[i]["value"].clone()
    };
    assert_eq!(value(0), json!(5));
    assert_eq!(value(1), json!(42));
    assert_eq!(
        value(2),
        json!({"args": [], "kwargs": {"name": "Zoë ☕", "n": 7}})
    );
    assert_eq!(
        value(3),
        json!({"args": ["três ☃", [1, {"a": null}], -7, "tab\there"], "kwargs": {"nested": nested}})
    );
    // Countdown: not run before sent_at + 2 s (Python's eta is computed after sent_at).
    assert_eq!(value(4), json!(42));
    let (sent, done) = (
        got[4]["sent_at"].as_f64().unwrap(),
        got[4]["date_done"].as_f64().unwrap(),
    );
    assert!(done >= sent + 2.0, "ran early: sent {sent}, done {done}");
    // An expires already past is never run. Our worker stores REVOKED for it, so Python's get()
    // raises TaskRevokedError. On RabbitMQ Celery also gives such a message a per-message TTL of
    // 0, so the broker may drop it before any worker sees it: then nothing is stored (PENDING),
    // exactly as with a Python worker.
    assert_eq!(got[5]["ok"], json!(false), "{}", got[5]);
    let revoked = got[5]["state"] == json!("REVOKED");
    if revoked {
        assert_eq!(got[5]["exc_class"], json!("TaskRevokedError"), "{}", got[5]);
    } else {
        assert_eq!(kind, Kind::Amqp, "{}", got[5]);
        assert_eq!(got[5]["state"], json!("PENDING"), "{}", got[5]);
    }
    assert_eq!(value(6), json!(10));
    assert_eq!(value(7), json!(15));
    assert_eq!(value(8), json!(0.75));
    // Our failures raise in Python with our type and message.
    assert_eq!(
        (
            &got[9]["state"],
            &got[9]["exc_class"],
            &got[9]["exc_module"],
            &got[9]["exc_message"]
        ),
        (
            &json!("FAILURE"),
            &json!("ValueError"),
            &json!("builtins"),
            &json!("kaputt ☠ äöü")
        ),
        "{}",
        got[9]
    );
    assert_eq!(got[10]["exc_class"], json!("TypeError"), "{}", got[10]);
    assert_eq!(
        got[10]["exc_message"],
        json!(r#"unsupported operand types: "a" and 1"#)
    );
    // A Python-sent retrying job retries on our worker (twice) and Python reads the final value.
    assert_eq!(value(11), json!({"key": "py-flaky", "runs": 3}));
    assert_eq!(value(12), json!(9));
    assert_eq!(value(13), json!(42));
    assert_eq!(
        (&got[14]["state"], &got[14]["exc_class"]),
        (&json!("FAILURE"), &json!("TypeError")),
        "{}",
        got[14]
    );
    let message = got[14]["exc_message"].as_str().unwrap_or_default();
    assert!(message.contains("unknown field `z`"), "{message}");

    let pickled = kind == Kind::Redis;
    if pickled {
        assert_eq!(
            (
                &got[15]["state"],
                &got[15]["exc_class"],
                &got[15]["exc_module"]
            ),
            (
                &json!("FAILURE"),
                &json!("DecodeError"),
                &json!("kombu.exceptions")
            ),
            "{}",
            got[15]
        );
        let message = got[15]["exc_message"].as_str().unwrap();
        assert!(message.contains("pickle is never executed"), "{message}");
        let broker = connect_broker(&env.broker_url()).await.unwrap();
        assert_eq!(
            broker
                .queue_len(celerity_worker::DEAD_LETTER_QUEUE)
                .await
                .unwrap(),
            1
        );
        broker.close().await.unwrap();
    }

    let summary = ours.stop().await;
    assert_eq!(
        (
            summary.succeeded,
            summary.failed,
            summary.retried,
            summary.revoked,
            summary.rejected
        ),
        (11, 3, 2, u64::from(revoked), u64::from(pickled)),
        "{summary:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_producer_our_worker_redis() {
    python_producer_our_worker(Kind::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_producer_our_worker_rabbitmq() {
    python_producer_our_worker(Kind::Amqp).await;
}
