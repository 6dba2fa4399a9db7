//! Far-off ETAs (waiting in Redis, hopping through RabbitMQ delay levels), a global rate limit held
//! across workers, and the Redis lease of long and waiting jobs.

use super::*;

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
    let worker = spawn_worker(
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
    let summary = worker.stop().await;
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
    let worker = spawn_worker(
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
    let summary = worker.stop().await;
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
    let worker = spawn_worker(
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
    let s = worker.stop().await;
    assert_eq!(s.succeeded, 2, "a job whose lease lapsed ran twice");
    delete_redis_prefix(&prefix).await;
}

/// Defect 16.5: a job waiting for its rate-limit token longer than the visibility timeout keeps its
/// Redis lease (before, the restore sweep handed it out again and it ran twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_waiting_for_its_rate_limit_keeps_its_redis_lease() {
    let id = unique();
    let prefix = format!("{id}:");
    let url = format!("{REDIS}?global_keyprefix={prefix}&visibility_timeout=2&restore_interval=1");
    let broker = connect_broker(&url).await.unwrap();
    let backend = connect_backend(&format!("{REDIS}?global_keyprefix={prefix}"))
        .await
        .unwrap();
    let client = Client::new(broker.clone(), Some(backend.clone()));
    // One start per 5 s: the second job waits ~5 s for its token, past the 2 s lease.
    let limit = celerity_worker::RateLimit {
        count: 1.0,
        per: Duration::from_secs(5),
    };
    let worker = spawn_worker(
        &broker,
        &backend,
        WorkerConfig {
            queues: vec!["jobs".into()],
            concurrency: 4,
            rate_limits: vec![("demo.add".into(), limit)],
            ..WorkerConfig::default()
        },
    );
    let opts = SendOptions::new().queue("jobs");
    let mut handles = Vec::new();
    for i in 0..2 {
        let h = client
            .send_task("demo.add", vec![json!(i), json!(i)], Map::new(), &opts)
            .await
            .unwrap();
        handles.push(h);
    }
    for (i, h) in handles.iter().enumerate() {
        assert_eq!(
            h.get(Some(Duration::from_secs(30))).await.unwrap(),
            json!(2 * i)
        );
    }
    tokio::time::sleep(Duration::from_secs(6)).await; // a duplicate would have run by now
    let s = worker.stop().await;
    assert_eq!(s.succeeded, 2, "a job whose lease lapsed ran twice");
    delete_redis_prefix(&prefix).await;
}
