//! The worker against the real Redis and RabbitMQ (results on Redis): a batch of jobs all succeed
//! with the right values, failures and retries behave as on memory://, and a cold shutdown gives the
//! unfinished job back to the broker.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map};

use celerity_broker::testkit::{delete_amqp_queue, delete_redis_prefix, TcpProxy};
use celerity_broker::{connect_backend, connect_broker, Broker, State};
use celerity_client::{Client, ClientError, SendOptions};
use celerity_worker::{demo, run, Registry, Shutdown, WorkerConfig};

const REDIS: &str = "redis://127.0.0.1:6379/0";
const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

async fn exercise(broker_url: &str, prefix: &str, queue: &str) {
    let broker = connect_broker(broker_url).await.unwrap();
    let backend = connect_backend(&format!("{REDIS}?global_keyprefix={prefix}"))
        .await
        .unwrap();
    let client = Client::new(broker.clone(), Some(backend.clone()));
    let mut registry = Registry::new();
    demo::register(&mut registry);
    let shutdown = Shutdown::default();
    let config = WorkerConfig {
        queues: vec![queue.to_owned()],
        concurrency: 8,
        grace: Duration::from_secs(5),
        ..WorkerConfig::default()
    };
    let worker = tokio::spawn(run(
        registry.clone(),
        broker.clone(),
        Some(backend.clone()),
        config.clone(),
        shutdown.clone(),
    ));

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
    shutdown.warm.cancel();
    let summary = worker.await.unwrap().unwrap();
    assert_eq!(
        (summary.succeeded, summary.failed, summary.retried),
        (503, 2, 2)
    );
    assert_eq!(broker.queue_len(queue).await.unwrap(), 0);

    // Cold shutdown while a job runs: it goes back to the queue, no result is stored.
    let shutdown = Shutdown::default();
    let worker = tokio::spawn(run(
        registry,
        broker.clone(),
        Some(backend.clone()),
        config,
        shutdown.clone(),
    ));
    let long = client
        .send_task("demo.sleep_ms", vec![json!(30_000)], Map::new(), &options)
        .await
        .unwrap();
    wait_for_state_or_running(&broker, queue).await;
    shutdown.warm.cancel();
    shutdown.cold.cancel();
    worker.await.unwrap().unwrap();
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

/// Waits until the job has left the ready queue (a worker took it).
async fn wait_for_state_or_running(broker: &Arc<dyn Broker>, queue: &str) {
    for _ in 0..100 {
        if broker.queue_len(queue).await.unwrap() == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the worker never took the job");
}

/// Starts a worker with the demo tasks; returns its stop tokens and its task.
fn spawn_worker(
    broker: &Arc<dyn Broker>,
    backend: &Arc<dyn celerity_broker::ResultBackend>,
    config: WorkerConfig,
) -> (
    Shutdown,
    tokio::task::JoinHandle<celerity_worker::error::Result<celerity_worker::Summary>>,
) {
    let mut registry = Registry::new();
    demo::register(&mut registry);
    let shutdown = Shutdown::default();
    let worker = tokio::spawn(run(
        registry,
        broker.clone(),
        Some(backend.clone()),
        config,
        shutdown.clone(),
    ));
    (shutdown, worker)
}

fn unique() -> String {
    format!("wtest-{}", uuid::Uuid::new_v4().simple())
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
    let (shutdown, worker) = spawn_worker(
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
    shutdown.warm.cancel();
    worker.await.unwrap().unwrap();
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

/// A job due later than `park_after` is not held by the worker: it waits in Redis's schedule (not in
/// `unacked`, not in memory) and runs once, on time, when forwarded back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn far_off_eta_waits_on_redis_not_in_the_worker() {
    let id = unique();
    let prefix = format!("{id}:");
    let url = format!("{REDIS}?global_keyprefix={prefix}");
    let broker = connect_broker(&url).await.unwrap();
    let backend = connect_backend(&url).await.unwrap();
    let client = Client::new(broker.clone(), Some(backend.clone()));
    let (shutdown, worker) = spawn_worker(
        &broker,
        &backend,
        WorkerConfig {
            queues: vec!["jobs".into()],
            concurrency: 2,
            park_after: Duration::from_millis(300),
            ..WorkerConfig::default()
        },
    );

    let sent = chrono::Utc::now();
    let later = client
        .send_task(
            "demo.add",
            vec![json!(20), json!(22)],
            Map::new(),
            &SendOptions::new()
                .queue("jobs")
                .countdown(Duration::from_millis(2500)),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let raw = redis::Client::open(REDIS).unwrap();
    let mut c = raw.get_multiplexed_async_connection().await.unwrap();
    let unacked: usize = redis::cmd("HLEN")
        .arg(format!("{prefix}unacked"))
        .query_async(&mut c)
        .await
        .unwrap();
    let parked: usize = redis::cmd("ZCARD")
        .arg(format!("{prefix}celerity.scheduled"))
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(
        (unacked, parked),
        (0, 1),
        "the not-yet-due job must wait in Redis, not unacked in the worker"
    );
    // A due job is not blocked meanwhile.
    let now = client
        .send_task(
            "demo.add",
            vec![json!(1), json!(1)],
            Map::new(),
            &SendOptions::new().queue("jobs"),
        )
        .await
        .unwrap();
    assert_eq!(
        now.get(Some(Duration::from_secs(10))).await.unwrap(),
        json!(2)
    );

    let m = later
        .wait_meta(Some(Duration::from_secs(20)))
        .await
        .unwrap();
    assert_eq!((m.status, m.result.clone()), (State::Success, json!(42)));
    assert!(
        m.date_done.unwrap() >= sent + chrono::Duration::milliseconds(2500),
        "ran early"
    );
    shutdown.warm.cancel();
    let summary = worker.await.unwrap().unwrap();
    assert_eq!(summary.succeeded, 2, "the parked job ran exactly once");
    delete_redis_prefix(&prefix).await;
}

/// Two workers with a cluster-wide limit of 10 starts/s on `demo.add`: 30 jobs cannot finish in less
/// than about 2 s (10 at once from the full bucket, then 10/s). Per-process limits would let the pair
/// run 20/s and finish in about half that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_rate_limit_holds_across_workers() {
    let id = unique();
    let prefix = format!("{id}:");
    let url = format!("{REDIS}?global_keyprefix={prefix}");
    let broker = connect_broker(&url).await.unwrap();
    let backend = connect_backend(&url).await.unwrap();
    let limiter = celerity_broker::redis::RedisRateLimiter::connect(&url)
        .await
        .unwrap();
    let shutdown = Shutdown::default();
    let mut workers = Vec::new();
    for _ in 0..2 {
        let mut registry = Registry::new();
        demo::register(&mut registry);
        let config = WorkerConfig {
            queues: vec!["jobs".into()],
            concurrency: 8,
            rate_limits: vec![("demo.add".into(), "10/s".parse().unwrap())],
            global_rate_limits: Some(limiter.clone()),
            ..WorkerConfig::default()
        };
        workers.push(tokio::spawn(run(
            registry,
            broker.clone(),
            Some(backend.clone()),
            config,
            shutdown.clone(),
        )));
    }
    let client = Client::new(broker.clone(), Some(backend.clone()));
    let mut handles = Vec::new();
    for i in 0..30 {
        handles.push(
            client
                .send_task(
                    "demo.add",
                    vec![json!(i), json!(0)],
                    Map::new(),
                    &SendOptions::new().queue("jobs"),
                )
                .await
                .unwrap(),
        );
    }
    let mut done = Vec::new();
    for h in &handles {
        let m = h.wait_meta(Some(Duration::from_secs(30))).await.unwrap();
        assert_eq!(m.status, State::Success);
        done.push(m.date_done.unwrap());
    }
    done.sort();
    let spread = done[done.len() - 1] - done[0];
    assert!(
        spread >= chrono::Duration::milliseconds(1800),
        "30 jobs at 10/s across two workers took only {spread}"
    );
    shutdown.warm.cancel();
    for w in workers {
        w.await.unwrap().unwrap();
    }
    delete_redis_prefix(&prefix).await;
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
    let (shutdown, worker) = spawn_worker(
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
    shutdown.warm.cancel();
    worker.await.unwrap().unwrap();
}

/// `Client::revoke` reaches a worker over the broker's pidbox: a queued job is skipped (REVOKED) and
/// a running one is stopped with `terminate`.
async fn revoke_over(broker_url: &str, prefix: &str, queue: &str) {
    let broker = connect_broker(broker_url).await.unwrap();
    let backend = connect_backend(&format!("{REDIS}?global_keyprefix={prefix}"))
        .await
        .unwrap();
    let client = Client::new(broker.clone(), Some(backend.clone()));
    let (shutdown, worker) = spawn_worker(
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
    shutdown.warm.cancel();
    let s = worker.await.unwrap().unwrap();
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

/// On RabbitMQ a job due later than `park_after` hops through Celerity's delay levels
/// (`celerity.delay.<s>`, fixed TTL, dead-lettered back to its queue) instead of sitting unacked in the
/// worker, and runs once, not early.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn far_off_eta_hops_through_rabbitmq_delay_levels() {
    let q = unique();
    let prefix = format!("{q}:");
    let broker = connect_broker(AMQP).await.unwrap();
    let backend = connect_backend(&format!("{REDIS}?global_keyprefix={prefix}"))
        .await
        .unwrap();
    let client = Client::new(broker.clone(), Some(backend.clone()));
    let (shutdown, worker) = spawn_worker(
        &broker,
        &backend,
        WorkerConfig {
            queues: vec![q.clone()],
            concurrency: 2,
            park_after: Duration::from_millis(300),
            ..WorkerConfig::default()
        },
    );

    let sent = chrono::Utc::now();
    let later = client
        .send_task(
            "demo.add",
            vec![json!(40), json!(2)],
            Map::new(),
            &SendOptions::new()
                .queue(&q)
                .countdown(Duration::from_millis(2500)),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        broker.queue_len("celerity.delay.1").await.unwrap() >= 1,
        "the job should be parked in a delay level"
    );
    let m = later
        .wait_meta(Some(Duration::from_secs(20)))
        .await
        .unwrap();
    assert_eq!((m.status, m.result.clone()), (State::Success, json!(42)));
    assert!(
        m.date_done.unwrap() >= sent + chrono::Duration::milliseconds(2500),
        "ran early"
    );
    shutdown.warm.cancel();
    let summary = worker.await.unwrap().unwrap();
    assert_eq!(summary.succeeded, 1, "the parked job ran exactly once");
    delete_redis_prefix(&prefix).await;
    delete_amqp_queue(&q).await;
}

/// With a 2 s visibility timeout, a job that runs 4 s and one held 3 s for its ETA keep their
/// leases fresh: neither is handed out again by the restore sweep, each runs exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_and_waiting_jobs_keep_their_redis_lease() {
    let id = unique();
    let prefix = format!("{id}:");
    let url = format!("{REDIS}?global_keyprefix={prefix}&visibility_timeout=2&restore_interval=1");
    let broker = connect_broker(&url).await.unwrap();
    let backend = connect_backend(&format!("{REDIS}?global_keyprefix={prefix}"))
        .await
        .unwrap();
    let client = Client::new(broker.clone(), Some(backend.clone()));
    // A long park_after: the ETA job is held by the worker, not parked.
    let (shutdown, worker) = spawn_worker(
        &broker,
        &backend,
        WorkerConfig {
            queues: vec!["jobs".into()],
            concurrency: 4,
            park_after: Duration::from_secs(60),
            ..WorkerConfig::default()
        },
    );
    let opts = SendOptions::new().queue("jobs");
    let long = client
        .send_task("demo.sleep_ms", vec![json!(4000)], Map::new(), &opts)
        .await
        .unwrap();
    let held = client
        .send_task(
            "demo.add",
            vec![json!(1), json!(2)],
            Map::new(),
            &opts.clone().countdown(Duration::from_secs(3)),
        )
        .await
        .unwrap();
    assert_eq!(
        long.get(Some(Duration::from_secs(30))).await.unwrap(),
        json!(4000)
    );
    assert_eq!(
        held.get(Some(Duration::from_secs(30))).await.unwrap(),
        json!(3)
    );
    tokio::time::sleep(Duration::from_millis(1500)).await; // a duplicate would have started by now
    shutdown.warm.cancel();
    let s = worker.await.unwrap().unwrap();
    assert_eq!(s.succeeded, 2, "a job whose lease lapsed ran twice");
    delete_redis_prefix(&prefix).await;
}
