//! Our client sends and a Python worker runs: our `AsyncResult::get` returns its value or its typed
//! failure.

use super::*;

async fn our_client_python_worker(kind: Kind) {
    let Some(python) = celery_python() else {
        return;
    };
    let env = Env::new(kind);
    let py = PyWorker::start(&env, &python).await;
    let client = env.client().await;
    let q = SendOptions::new().queue(&env.queue);
    let send = |name: &'static str, args: Vec<Value>, kwargs: Value, opts: SendOptions| {
        let client = &client;
        async move {
            let Value::Object(kwargs) = kwargs else {
                panic!("kwargs")
            };
            client.send_task(name, args, kwargs, &opts).await.unwrap()
        }
    };
    let nested = json!({"list": [1, 2.5, true, null], "emoji": "🚀", "deep": {"x": {"y": "ü"}}});
    let add = send("demo.add", vec![json!(2), json!(3)], json!({}), q.clone()).await;
    let echo = send(
        "demo.echo",
        vec![json!("Zoë ☕"), nested.clone()],
        json!({"k": "☃", "nested": nested}),
        q.clone(),
    )
    .await;
    let later = send(
        "demo.mul",
        vec![json!(6), json!(7)],
        json!({}),
        q.clone().countdown(Duration::from_secs(2)),
    )
    .await;
    let sent_later = chrono::Utc::now();
    let prio = send(
        "demo.add",
        vec![json!(1), json!(2)],
        json!({}),
        q.clone().priority(5),
    )
    .await;
    let expired = send(
        "demo.add",
        vec![json!(1), json!(1)],
        json!({}),
        q.clone().expires(celerity_client::Expires::At(
            chrono::Utc::now() - chrono::Duration::seconds(30),
        )),
    )
    .await;
    let fail = send("demo.fail", vec![json!("nope ☂ ü")], json!({}), q.clone()).await;
    // Python's demo.flaky calls self.retry: it retries on Python and we read the end result.
    let flaky = send(
        "demo.flaky",
        vec![json!("rs-flaky"), json!(2)],
        json!({}),
        q.clone(),
    )
    .await;

    let t = Some(PATIENCE);
    assert_eq!(add.get(t).await.unwrap(), json!(5));
    assert_eq!(
        echo.get(t).await.unwrap(),
        json!({"args": ["Zoë ☕", nested], "kwargs": {"k": "☃", "nested": nested}})
    );
    assert_eq!(later.get(t).await.unwrap(), json!(42));
    let done = later.meta().await.unwrap().date_done.unwrap();
    assert!(
        done >= sent_later + chrono::Duration::seconds(2) - chrono::Duration::milliseconds(100),
        "ran early: sent {sent_later}, done {done}"
    );
    assert_eq!(prio.get(t).await.unwrap(), json!(3));
    // An expires already past is never run: the Python worker stores REVOKED. On RabbitMQ our
    // client, like Celery, also sets a per-message TTL of 0, so the broker may drop it before any
    // worker sees it (nothing stored, as between two Python processes).
    match expired.get(Some(Duration::from_secs(5))).await {
        Err(ClientError::Revoked { task_id }) => assert_eq!(task_id, expired.id()),
        Err(ClientError::Timeout(_)) if kind == Kind::Amqp => {
            assert_eq!(expired.state().await.unwrap(), State::Pending)
        }
        other => panic!("expected Revoked, got {other:?}"),
    }
    match fail.get(t).await {
        Err(ClientError::TaskFailed { exception, .. }) => {
            assert_eq!(exception.exc_type, "ValueError");
            assert_eq!(exception.exc_module, "builtins");
            assert_eq!(exception.message(), "nope ☂ ü");
        }
        other => panic!("expected TaskFailed, got {other:?}"),
    }
    assert_eq!(
        flaky.get(t).await.unwrap(),
        json!({"key": "rs-flaky", "runs": 3})
    );
    let log = py.log();
    assert!(
        log.contains("demo.flaky") && log.contains("retry"),
        "the Python worker retried demo.flaky:\n{log}"
    );
    client.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_python_worker_redis() {
    our_client_python_worker(Kind::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_python_worker_rabbitmq() {
    our_client_python_worker(Kind::Amqp).await;
}
