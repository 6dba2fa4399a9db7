//! Jobs on the real brokers: a batch of jobs all succeed with the right values, failures and retries
//! behave as on memory://, a cold shutdown gives the unfinished job back; revoke and terminate.

use super::*;

async fn exercise(broker_url: &str, prefix: &str, queue: &str) {
    let broker = connect_broker(broker_url).await.unwrap();
    let backend = connect_backend(&format!("{REDIS}?global_keyprefix={prefix}"))
        .await
        .unwrap();
    let client = Client::new(broker.clone(), Some(backend.clone()));
    let registry = demo_registry();
    let config = WorkerConfig {
        queues: vec![queue.to_owned()],
        concurrency: 8,
        grace: Duration::from_secs(5),
        ..WorkerConfig::default()
    };
    let worker = InProcessWorker::spawn(
        registry.clone(),
        broker.clone(),
        Some(backend.clone()),
        config.clone(),
    );

    let options = SendOptions::new().queue(queue);
    let batch: Vec<_> = (0..500)
        .map(|i| {
            options
                .build(
                    "demo.add",
                    vec![json!(i), json!(1)],
                    Map::new(),
                    chrono::Utc::now(),
                )
                .unwrap()
        })
        .collect();
    client.send_batch(&batch, queue).await.unwrap();
    let unknown = client
        .send_task("nobody.knows", vec![], Map::new(), &options)
        .await
        .unwrap();
    let flaky = client
        .send_task(
            "demo.flaky",
            vec![json!("k"), json!(2)],
            Map::new(),
            &options,
        )
        .await
        .unwrap();

    for (i, m) in batch.iter().enumerate() {
        let meta = backend
            .wait(m.id(), Some(Duration::from_secs(30)))
            .await
            .unwrap();
        assert_eq!(
            (meta.status, meta.result),
            (State::Success, json!(i + 1)),
            "job {i}"
        );
    }
    let meta = unknown
        .wait_meta(Some(Duration::from_secs(30)))
        .await
        .unwrap();
    assert_eq!(
        meta.exception().map(|e| e.exc_type),
        Some("NotRegistered".into())
    );
    assert_eq!(
        flaky.get(Some(Duration::from_secs(30))).await.unwrap(),
        json!({"key": "k", "runs": 3})
    );
    // Send and wait in one call: the value, the task's own error, or a timeout.
    let wait = Some(Duration::from_secs(30));
    let sum = client
        .call_task(
            "demo.add",
            vec![json!(20), json!(22)],
            Map::new(),
            &options,
            wait,
        )
        .await
        .unwrap();
    assert_eq!(sum, json!(42));
    match client
        .call_task("demo.fail", vec![json!("no")], Map::new(), &options, wait)
        .await
    {
        Err(ClientError::TaskFailed { exception, .. }) => {
            assert_eq!(exception.exc_type, "ValueError")
        }
        other => panic!("expected the task's ValueError, got {other:?}"),
    }
    let slow = client
        .call_task(
            "demo.sleep_ms",
            vec![json!(1500)],
            Map::new(),
            &options,
            Some(Duration::from_millis(100)),
        )
        .await;
    assert!(matches!(slow, Err(ClientError::Timeout(_))), "{slow:?}");
    let summary = worker.stop().await;
    assert_eq!(
        (summary.succeeded, summary.failed, summary.retried),
        (503, 2, 2)
    );
    assert_eq!(broker.queue_len(queue).await.unwrap(), 0);

    // Cold shutdown while a job runs: it goes back to the queue, no result is stored.
    let worker = InProcessWorker::spawn(registry, broker.clone(), Some(backend.clone()), config);
    let long = client
        .send_task("demo.sleep_ms", vec![json!(30_000)], Map::new(), &options)
        .await
        .unwrap();
    wait_for_state_or_running(&broker, queue).await;
    worker.shutdown().warm.cancel();
    worker.shutdown().cold.cancel();
    worker.join().await;
    assert_eq!(backend.get(long.id()).await.unwrap().status, State::Pending);
    let mut back = 0;
    for _ in 0..50 {
        back = broker.queue_len(queue).await.unwrap();
        if back == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(back, 1, "the interrupted job is back in its queue");
    broker.purge(queue).await.unwrap();
    broker.close().await.unwrap();
    backend.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_on_redis() {
    let id = unique();
    let prefix = format!("{id}:");
    exercise(
        &format!("{REDIS}?global_keyprefix={prefix}"),
        &prefix,
        "jobs",
    )
    .await;
    delete_redis_prefix(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_on_rabbitmq() {
    let id = unique();
    let prefix = format!("{id}:");
    exercise(AMQP, &prefix, &id).await;
    delete_redis_prefix(&prefix).await;
    delete_amqp_queue(&id).await;
}

/// `Client::revoke` reaches a worker over the broker's pidbox: a queued job is skipped (REVOKED) and
/// a running one is stopped with `terminate`.
async fn revoke_over(broker_url: &str, prefix: &str, queue: &str) {
    let broker = connect_broker(broker_url).await.unwrap();
    let backend = connect_backend(&format!("{REDIS}?global_keyprefix={prefix}"))
        .await
        .unwrap();
    let client = Client::new(broker.clone(), Some(backend.clone()));
    let worker = spawn_worker(
        &broker,
        &backend,
        WorkerConfig {
            queues: vec![queue.to_owned()],
            concurrency: 1,
            hostname: format!("celerity@{queue}"),
            ..WorkerConfig::default()
        },
    );
    let opts = SendOptions::new().queue(queue);
    let warm_up = client
        .send_task("demo.add", vec![json!(1), json!(1)], Map::new(), &opts)
        .await
        .unwrap();
    warm_up.get(Some(Duration::from_secs(20))).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await; // the pidbox subscription is up by now

    let long = client
        .send_task("demo.sleep_ms", vec![json!(30_000)], Map::new(), &opts)
        .await
        .unwrap();
    let queued = client
        .send_task("demo.add", vec![json!(2), json!(2)], Map::new(), &opts)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    client
        .revoke(&[queued.id().to_owned()], false)
        .await
        .unwrap();
    client.revoke(&[long.id().to_owned()], true).await.unwrap();
    let m = long.wait_meta(Some(Duration::from_secs(20))).await.unwrap();
    assert_eq!(
        m.status,
        State::Revoked,
        "terminate did not stop the running job"
    );
    let m = queued
        .wait_meta(Some(Duration::from_secs(20)))
        .await
        .unwrap();
    assert_eq!(
        m.status,
        State::Revoked,
        "the queued job ran although revoked"
    );
    let s = worker.stop().await;
    assert_eq!((s.succeeded, s.revoked), (1, 2));
    broker.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_and_terminate_on_redis() {
    let id = unique();
    let prefix = format!("{id}:");
    revoke_over(
        &format!("{REDIS}?global_keyprefix={prefix}"),
        &prefix,
        "jobs",
    )
    .await;
    delete_redis_prefix(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_and_terminate_on_rabbitmq() {
    let id = unique();
    let prefix = format!("{id}:");
    revoke_over(AMQP, &prefix, &id).await;
    delete_redis_prefix(&prefix).await;
    delete_amqp_queue(&id).await;
}

/// With results in PostgreSQL (which does not expire rows by itself), the worker's janitor deletes
/// results older than `result_expires` while the worker runs, as Celery beat's
/// `celery.backend_cleanup` does, and leaves fresh ones.
#[tokio::test]
async fn the_janitor_deletes_expired_results_from_postgresql() {
    let schema = celerity_testsupport::PgSchema::new("janitor");
    let broker = connect_broker(&format!("memory://{}", unique()))
        .await
        .unwrap();
    let backend = connect_backend(&schema.url("&result_expires=60"))
        .await
        .unwrap();
    let (old, fresh) = (unique(), unique());
    for id in [&old, &fresh] {
        backend
            .store(&celerity_broker::TaskMeta::success(id.as_str(), json!(1)))
            .await
            .unwrap();
    }
    schema.psql(&format!(
        "UPDATE \"{}\".celery_taskmeta SET date_done = date_done - interval '2 minutes' \
         WHERE task_id = '{old}'",
        schema.name
    ));
    let config = WorkerConfig {
        queues: vec![unique()],
        cleanup_every: Some(Duration::from_millis(100)),
        ..WorkerConfig::default()
    };
    let worker = spawn_worker(&broker, &backend, config);
    let mut gone = false;
    for _ in 0..100 {
        if backend.get(&old).await.unwrap().status == State::Pending {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    worker.stop().await;
    assert!(gone, "the expired result was never deleted");
    assert_eq!(backend.get(&fresh).await.unwrap().status, State::Success);
    backend.close().await.unwrap();
}
