//! Lost connections (cut by a proxy) on Redis and RabbitMQ, and a Redis restarted under load: the
//! worker reconnects and resumes.

use super::*;

/// Cuts the worker's broker connections several times while it drains a batch: it reconnects on its
/// own and every job still ends with its value (producer and results talk to the brokers directly).
async fn survives_connection_drops(
    worker_broker: &str,
    direct_broker: &str,
    prefix: &str,
    queue: &str,
    proxy: &TcpProxy,
) {
    let worker_side = connect_broker(worker_broker).await.unwrap();
    let producer = connect_broker(direct_broker).await.unwrap();
    let backend = connect_backend(&format!("{REDIS}?global_keyprefix={prefix}"))
        .await
        .unwrap();
    let client = Client::new(producer.clone(), Some(backend.clone()));
    let worker = spawn_worker(
        &worker_side,
        &backend,
        WorkerConfig {
            queues: vec![queue.to_owned()],
            concurrency: 8,
            grace: Duration::from_secs(5),
            ..WorkerConfig::default()
        },
    );

    let options = SendOptions::new().queue(queue);
    let mut handles = Vec::new();
    for round in 0..4 {
        for i in 0..100 {
            let n = round * 100 + i;
            handles.push((
                n,
                client
                    .send_task(
                        "demo.sleep_ms",
                        vec![json!(1 + n % 5)],
                        Map::new(),
                        &options,
                    )
                    .await
                    .unwrap(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
        proxy.cut();
    }
    for (n, h) in &handles {
        let m = h
            .wait_meta(Some(Duration::from_secs(60)))
            .await
            .unwrap_or_else(|e| panic!("job {n}: {e}"));
        assert_eq!(
            (m.status, m.result),
            (State::Success, json!(1 + n % 5)),
            "job {n}"
        );
    }
    worker.stop().await;
    worker_side.close().await.unwrap();
    producer.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_reconnects_to_redis_and_resumes() {
    let id = unique();
    let prefix = format!("{id}:");
    let proxy = TcpProxy::start("127.0.0.1:6379").await;
    let through = format!(
        "redis://127.0.0.1:{}/0?global_keyprefix={prefix}&visibility_timeout=5&restore_interval=1",
        proxy.port()
    );
    let direct = format!("{REDIS}?global_keyprefix={prefix}");
    survives_connection_drops(&through, &direct, &prefix, "jobs", &proxy).await;
    delete_redis_prefix(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_reconnects_to_rabbitmq_and_resumes() {
    let id = unique();
    let prefix = format!("{id}:");
    let proxy = TcpProxy::start("127.0.0.1:5672").await;
    let through = format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port());
    survives_connection_drops(&through, AMQP, &prefix, &id, &proxy).await;
    delete_redis_prefix(&prefix).await;
    delete_amqp_queue(&id).await;
}

/// A real broker restart under load: the worker's Redis (a private server with an append-only file)
/// is killed and started again while a batch runs. The worker reconnects on its own and every job
/// ends with its value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_resumes_after_its_redis_restarts_under_load() {
    let Some(mut server) = celerity_broker::testkit::PrivateRedis::start().await else {
        panic!("cannot start a private redis-server");
    };
    let url = format!("{}?visibility_timeout=3&restore_interval=1", server.url());
    let broker = connect_broker(&url).await.unwrap();
    let backend = connect_backend(&server.url()).await.unwrap();
    let client = Client::new(broker.clone(), Some(backend.clone()));
    let worker = spawn_worker(
        &broker,
        &backend,
        WorkerConfig {
            queues: vec!["jobs".into()],
            concurrency: 8,
            ..WorkerConfig::default()
        },
    );

    let options = SendOptions::new().queue("jobs");
    let batch: Vec<_> = (0..300)
        .map(|i| {
            options
                .build(
                    "demo.sleep_ms",
                    vec![json!(3 + i % 4)],
                    Map::new(),
                    chrono::Utc::now(),
                )
                .unwrap()
        })
        .collect();
    client.send_batch(&batch, "jobs").await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(
        broker.queue_len("jobs").await.unwrap() > 0,
        "the batch must still be running when Redis goes down"
    );
    assert!(
        server.restart(Duration::from_millis(500)).await,
        "redis did not come back"
    );

    for (i, m) in batch.iter().enumerate() {
        let meta = backend
            .wait(m.id(), Some(Duration::from_secs(60)))
            .await
            .unwrap_or_else(|e| panic!("job {i}: {e}"));
        assert_eq!(
            (meta.status, meta.result),
            (State::Success, json!(3 + i % 4)),
            "job {i}"
        );
    }
    worker.stop().await;
}

/// Defect 16.1: the result backend refuses every call for 10 s — longer than the store used to
/// retry (about 3 s) — while jobs finish. Every job keeps its delivery until its result is stored,
/// so once the backend is back every result is there, none acked without it.
#[tokio::test]
async fn a_result_backend_outage_loses_no_result() {
    let prefix = unique();
    let queue = unique();
    let broker = connect_broker(&format!("{REDIS}?global_keyprefix={prefix}"))
        .await
        .unwrap();
    let real = connect_backend(&format!("{REDIS}?global_keyprefix={prefix}"))
        .await
        .unwrap();
    let outage = OutageBackend::new(real.clone());
    let backend: Arc<dyn celerity_broker::ResultBackend> = outage.clone();
    let worker = spawn_worker(
        &broker,
        &backend,
        WorkerConfig {
            queues: vec![queue.clone()],
            concurrency: 8,
            grace: Duration::from_secs(5),
            ..WorkerConfig::default()
        },
    );
    outage.set_down(true);
    let producer = Client::new(broker.clone(), None);
    let options = SendOptions::new().queue(&queue);
    let mut ids = Vec::new();
    for i in 0..20 {
        let h = producer
            .send_task("demo.add", vec![json!(i), json!(1)], Map::new(), &options)
            .await
            .unwrap();
        ids.push((i, h.id().to_owned()));
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(outage.refused() >= 20, "the jobs ran into the outage");
    outage.set_down(false);
    let reader = Client::new(broker.clone(), Some(real.clone()));
    for (i, id) in &ids {
        let m = reader
            .result::<serde_json::Value>(id)
            .wait_meta(Some(Duration::from_secs(30)))
            .await
            .unwrap_or_else(|e| panic!("job {i}: its result was lost ({e})"));
        assert_eq!(
            (m.status, m.result),
            (State::Success, json!(i + 1)),
            "job {i}"
        );
    }
    let summary = worker.stop().await;
    assert_eq!(summary.succeeded, 20);
    assert_eq!(broker.queue_len(&queue).await.unwrap(), 0);
    delete_redis_prefix(&prefix).await;
}
