//! The Redis transport, result backend, beat's lease and the shared rate limiter on a
//! `sentinel://` URL, against a Sentinel set of the test's own (a master, two replicas, three
//! sentinels on 127.0.0.1, Redis ports 16450–16499, sentinel ports 26450–26499, each test its own
//! half; removed on drop):
//!
//! - a master SIGKILLed: each of them, opened before the kill, works again on the promoted replica
//!   without being reopened, also while many callers hit it at once during the failover;
//! - a master replaced by a forced failover while it stays up (a master until the sentinels demote
//!   it): within a couple of seconds publishes, results and an idle consumer's blocking wait are on
//!   the new master.

use std::time::{Duration, Instant};

use serde_json::{json, Map};

use celerity_broker::backend::TaskMeta;
use celerity_broker::lease::redis::RedisLease;
use celerity_broker::redis::RedisRateLimiter;
use celerity_broker::{connect_backend, connect_broker, BrokerUrl, Message, Properties, State};
use celerity_testsupport::sentinel::query;
use celerity_testsupport::SentinelSet;

const REDIS_PORTS: [std::ops::Range<u16>; 2] = [16450..16475, 16475..16500];
const SENTINEL_PORTS: [std::ops::Range<u16>; 2] = [26450..26475, 26475..26500];
/// Two checks of the master's address (`MASTER_CHECK`, 1 s) and some slack.
const MASTER_CHECK_WAIT: Duration = Duration::from_millis(2500);
/// How long a component may take to work again after the sentinels named the new master.
const RECOVERY: Duration = Duration::from_secs(20);

fn message(id: &str) -> Message {
    let mut headers = Map::new();
    headers.insert("lang".into(), json!("py"));
    headers.insert("task".into(), json!("tests.add"));
    headers.insert("id".into(), json!(id));
    Message {
        properties: Properties {
            correlation_id: Some(id.to_owned()),
            reply_to: Some(String::new()),
            ..Properties::default()
        },
        headers,
        body: b"[[1, 2], {}, {}]".to_vec(),
    }
}

/// Runs `attempt` until it succeeds or `RECOVERY` passed; how long it took.
async fn until_ok<F, Fut, T, E>(what: &str, mut attempt: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let began = Instant::now();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), attempt()).await {
            Ok(Ok(_)) => return began.elapsed(),
            Ok(Err(e)) if began.elapsed() > RECOVERY => panic!("{what} still fails: {e}"),
            Err(_) if began.elapsed() > RECOVERY => panic!("{what} still hangs"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_follows_a_killed_master_to_the_promoted_replica() {
    let Some(mut set) = SentinelSet::start(REDIS_PORTS[0].clone(), SENTINEL_PORTS[0].clone()).await
    else {
        eprintln!("skipped: redis-server is not installed");
        return;
    };
    let url = set.url("&wait_replicas=1");
    let broker = connect_broker(&url).await.expect("broker over sentinel");
    let backend = connect_backend(&set.url(""))
        .await
        .expect("backend over sentinel");
    let parsed = BrokerUrl::parse(&url).unwrap();
    let lease = RedisLease::connect(&parsed, "sentinel-test-beat")
        .await
        .expect("lease over sentinel");
    let limiter = RedisRateLimiter::connect(&url)
        .await
        .expect("rate limiter over sentinel");
    for i in 0..100 {
        broker
            .publish("q", &message(&format!("before-{i}")))
            .await
            .unwrap();
    }
    backend
        .store(&TaskMeta::success("before", json!(1)))
        .await
        .unwrap();
    let held = lease
        .try_acquire(Duration::from_secs(30))
        .await
        .unwrap()
        .expect("the lease is free");

    let old = set.master.port;
    set.master.kill();
    // Many callers at once while the sentinels still name the dead master.
    let hammer: Vec<_> = (0..32)
        .map(|_| {
            let broker = broker.clone();
            tokio::spawn(async move {
                let until = Instant::now() + Duration::from_secs(4);
                while Instant::now() < until {
                    let _ = broker.queue_len("q").await;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        })
        .collect();
    let promoted = set.wait_failover(old).await;
    assert!(set.replicas.iter().any(|r| r.port == promoted));
    for h in hammer {
        h.await.unwrap();
    }

    let b = until_ok("the broker", || broker.queue_len("q")).await;
    assert_eq!(
        broker.queue_len("q").await.unwrap(),
        100,
        "replicated before the kill"
    );
    let after = message("after");
    let p = until_ok("a publish", || broker.publish("q", &after)).await;
    let r = until_ok("the backend", || backend.get("before")).await;
    assert_eq!(backend.get("before").await.unwrap().status, State::Success);
    let l = until_ok("the lease", || lease.renew(&held, Duration::from_secs(30))).await;
    assert!(
        lease.renew(&held, Duration::from_secs(30)).await.unwrap(),
        "the lease replicated to the new master is still ours"
    );
    let t = until_ok("the rate limiter", || {
        limiter.try_take("sentinel-test", 10.0, 1.0)
    })
    .await;
    eprintln!(
        "after the failover to {promoted}: broker {b:?}, publish {p:?}, backend {r:?}, lease {l:?}, rate limiter {t:?}"
    );
    let mut consumer = broker.consume(&["q".to_owned()], 10).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("a delivery from the new master")
        .unwrap()
        .expect("a delivery");
    first.ack().await.unwrap();
    let _ = broker.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_to_a_replaced_master_that_stays_up_move_to_the_new_one() {
    let Some(set) = SentinelSet::start(REDIS_PORTS[1].clone(), SENTINEL_PORTS[1].clone()).await
    else {
        eprintln!("skipped: redis-server is not installed");
        return;
    };
    let url = set.url("");
    let broker = connect_broker(&url).await.expect("broker over sentinel");
    let backend = connect_backend(&url).await.expect("backend over sentinel");
    broker.publish("q", &message("before")).await.unwrap();
    // A consumer idle on an empty queue: its blocking wait is on the old master.
    let mut consumer = broker.consume(&["idle".to_owned()], 10).await.unwrap();
    let waiting = tokio::spawn(async move {
        let got = tokio::time::timeout(Duration::from_secs(30), consumer.next()).await;
        let delivery = got
            .expect("the idle consumer heard nothing")
            .unwrap()
            .expect("a delivery");
        let id = delivery.message.task_id().map(str::to_owned);
        delivery.ack().await.unwrap();
        id
    });
    let old = set.master.port;
    set.force_failover().await.expect("SENTINEL FAILOVER");
    let promoted = set.wait_failover(old).await;
    // The old master is still up and, until the sentinels demote it, still a master: within a
    // couple of checks our connections lead to the new one.
    tokio::time::sleep(MASTER_CHECK_WAIT).await;
    let after = message("after");
    broker.publish("q", &after).await.unwrap();
    backend
        .store(&TaskMeta::success("after", json!(2)))
        .await
        .unwrap();
    broker.publish("idle", &message("wake")).await.unwrap();
    let on_new: i64 = query(promoted, redis::cmd("LLEN").arg("q")).await.unwrap();
    assert_eq!(
        on_new, 2,
        "the publish after the failover is on the new master"
    );
    let stored: Option<String> = query(promoted, redis::cmd("GET").arg("celery-task-meta-after"))
        .await
        .unwrap();
    assert!(stored.is_some(), "the result is on the new master");
    assert_eq!(waiting.await.unwrap().as_deref(), Some("wake"));
    // Once demoted, the old master refuses writes; nothing of ours writes there any more.
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let role: Vec<redis::Value> = query(old, &mut redis::cmd("ROLE")).await.unwrap();
        if matches!(role.first(), Some(redis::Value::BulkString(r)) if r == b"slave") {
            break;
        }
        assert!(
            Instant::now() < until,
            "the sentinels did not demote the old master"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    broker.publish("q", &message("later")).await.unwrap();
    let on_new: i64 = query(promoted, redis::cmd("LLEN").arg("q")).await.unwrap();
    assert_eq!(on_new, 3);
    let _ = broker.close().await;
}

/// Without replicas (the shared Redis has none), `wait_replicas=1` turns every publish into an
/// error that says the message reached the master only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_replicas_refuses_a_publish_no_replica_confirmed() {
    let q = celerity_testsupport::unique("sentinel-wait");
    let prefix = format!("{q}:");
    let _cleanup = celerity_testsupport::Cleanup::new().redis_prefix(&prefix);
    let url = format!(
        "{}?global_keyprefix={prefix}&wait_replicas=1&wait_replicas_timeout=0.1",
        celerity_testsupport::REDIS
    );
    let broker = connect_broker(&url).await.unwrap();
    let err = broker
        .publish(&q, &message("w"))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("0 of the 1 replicas"), "{err}");
    let batch = broker
        .publish_batch(&q, &[message("x")])
        .await
        .unwrap_err()
        .to_string();
    assert!(batch.contains("0 of the 1 replicas"), "{batch}");
    let _ = broker.close().await;
}
