//! Broker restart under load: a `-P 2` pool drains while a producer (one `Client`, sending in a
//! loop) keeps sending and a result listener (the same client) waits for each result, and the
//! broker — a private `redis-server` holding broker and results, or a private RabbitMQ node with
//! results on the shared Redis — is crashed and started again twice. Nothing is rebuilt by the
//! test: the pool, the producer and the listener must resume on their own.
//!
//! Each send either returns `Ok` (then its result must arrive, with its value) or an error, which
//! is counted and must say what failed; a send that neither returns nor fails within 30 s is a
//! hang and fails the test. 0 lost. Jobs run twice (counted from the pool's log, see the crate doc)
//! stay within what was in flight: on Redis an outage longer than the visibility timeout lets the
//! leases of running jobs lapse, and the first sweep after it may give such a job to another worker.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use celerity_broker::testkit::PrivateRedis;
use celerity_broker::{connect_backend, connect_broker, State};
use celerity_client::{Client, SendOptions};
use celerity_testsupport::{unique, Cleanup, PrivateRabbit, Transport, REDIS};

use super::{long_run, print_table, LogCounts, LogFile, Pool, Row};

const PROCESSES: usize = 2;
const CONCURRENCY: usize = 4;
/// How long the private Redis stays down: longer than the workers' visibility timeout (2 s), so
/// leases that could not be renewed meanwhile have lapsed when it comes back.
const REDIS_DOWN: Duration = Duration::from_secs(3);
/// How long the RabbitMQ node stays down (its boot adds a few seconds more).
const RABBIT_DOWN: Duration = Duration::from_secs(1);
/// A send that takes longer than this is a hang.
const SEND_PATIENCE: Duration = Duration::from_secs(30);

/// The broker the test owns and restarts.
enum Server {
    Redis(PrivateRedis),
    Rabbit(PrivateRabbit),
}

impl Server {
    async fn restart(&mut self) -> bool {
        match self {
            Server::Redis(r) => r.restart(REDIS_DOWN).await,
            Server::Rabbit(r) => r.restart(RABBIT_DOWN).await,
        }
    }
}

/// What the producer saw.
#[derive(Default)]
struct Sent {
    /// Sends that returned `Ok`: task id → the value its job must return.
    ok: HashMap<String, Value>,
    /// The text of every send that returned an error.
    errors: Vec<String>,
    /// Sends that neither returned nor failed within [`SEND_PATIENCE`].
    hung: usize,
}

/// What the listener saw.
#[derive(Default)]
struct Heard {
    /// Task id → the stored outcome it read (status, value).
    outcomes: HashMap<String, (State, Value)>,
    /// Waits that failed (and were tried again).
    errors: usize,
}

async fn campaign(transport: Transport, jobs: usize) -> Row {
    let q = unique("faults-restart");
    let prefix = format!("{q}:");
    let cleanup = Cleanup::new().redis_prefix(&prefix);
    let (mut server, broker_url, backend_url, name) = match transport {
        Transport::Redis => {
            let r = PrivateRedis::start()
                .await
                .expect("cannot start a private redis-server");
            let broker = format!("{}?visibility_timeout=2&restore_interval=1", r.url());
            let backend = r.url();
            (
                Server::Redis(r),
                broker,
                backend,
                "Redis (broker and results)",
            )
        }
        Transport::Amqp => {
            let r = PrivateRabbit::start("")
                .await
                .expect("cannot start a private RabbitMQ node");
            let broker = r.url();
            let backend = format!("{REDIS}?global_keyprefix={prefix}");
            (
                Server::Rabbit(r),
                broker,
                backend,
                "RabbitMQ (results on Redis)",
            )
        }
    };
    let log = LogFile::new(&q);
    let began = Instant::now();
    let pool = Pool::start(
        &broker_url,
        &backend_url,
        &q,
        PROCESSES,
        CONCURRENCY,
        &log.0,
    );
    assert_eq!(pool.wait_for_children(PROCESSES).len(), PROCESSES);
    let client = Arc::new(Client::new(
        connect_broker(&broker_url).await.unwrap(),
        Some(connect_backend(&backend_url).await.unwrap()),
    ));

    let progress = Arc::new(AtomicUsize::new(0));
    let sent = Arc::new(Mutex::new(Sent::default()));
    let (to_listener, mut sent_ids) = tokio::sync::mpsc::unbounded_channel::<String>();
    let producer = {
        let (client, progress, sent, q) =
            (client.clone(), progress.clone(), sent.clone(), q.clone());
        tokio::spawn(async move {
            let options = SendOptions::new().queue(&q);
            for i in 0..jobs {
                // demo.sleep_ms(ms) returns ms: 20–30 ms a job, a little slower than the sends,
                // so a backlog builds up and is in flight when the broker goes down.
                let ms = 20 + (i % 11) as u64;
                let send = client.send_task(
                    "demo.sleep_ms",
                    vec![json!(ms)],
                    Default::default(),
                    &options,
                );
                let outcome = tokio::time::timeout(SEND_PATIENCE, send).await;
                let pause = {
                    let mut s = sent.lock().unwrap();
                    match outcome {
                        Ok(Ok(r)) => {
                            s.ok.insert(r.id().to_owned(), json!(ms));
                            let _ = to_listener.send(r.id().to_owned());
                            Duration::from_millis(2)
                        }
                        Ok(Err(e)) => {
                            s.errors.push(e.to_string());
                            Duration::from_millis(50)
                        }
                        Err(_) => {
                            s.hung += 1;
                            Duration::from_millis(50)
                        }
                    }
                };
                progress.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(pause).await;
            }
        })
    };
    let listener = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut heard = Heard::default();
            let until = Instant::now() + Duration::from_secs(if long_run() { 900 } else { 240 });
            while let Some(id) = sent_ids.recv().await {
                let result = client.result::<Value>(&id);
                loop {
                    match result.wait_meta(Some(Duration::from_secs(30))).await {
                        Ok(m) => {
                            heard.outcomes.insert(id, (m.status, m.result));
                            break;
                        }
                        Err(_) if Instant::now() < until => {
                            heard.errors += 1;
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Err(_) => break,
                    }
                }
            }
            heard
        })
    };

    // Two restarts while the producer is sending and the pool draining.
    let mut restarts = 0;
    for share in [4, 2] {
        while progress.load(Ordering::SeqCst) < jobs / share {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            server.restart().await,
            "{name}: the broker did not come back"
        );
        restarts += 1;
        assert!(
            progress.load(Ordering::SeqCst) < jobs,
            "the producer finished before the broker was back; send more jobs"
        );
    }
    producer.await.unwrap();
    let heard = listener.await.unwrap();
    let seconds = began.elapsed().as_secs_f64();
    assert_eq!(pool.children().len(), PROCESSES, "the pool lost a process");
    assert!(pool.stop(), "the pool did not stop cleanly on SIGTERM");
    let counts = LogCounts::read(&log.0);
    let _ = client.close().await;

    let sent = std::mem::take(&mut *sent.lock().unwrap());
    let lost: Vec<&String> = sent
        .ok
        .iter()
        .filter(|(id, value)| heard.outcomes.get(*id) != Some(&(State::Success, (*value).clone())))
        .map(|(id, _)| id)
        .collect();
    let duplicates = counts.duplicates(sent.ok.keys());
    let mut kinds: Vec<&String> = sent.errors.iter().collect();
    kinds.sort();
    kinds.dedup();
    for kind in kinds.iter().take(5) {
        eprintln!("{name}: a send failed with: {kind}");
    }
    let row = Row {
        broker: name,
        fault: "broker crashed and restarted twice",
        jobs,
        faults: restarts,
        lost: lost.len(),
        duplicates,
        note: format!(
            "{} sends Ok, {} refused with an error, {} hung; {} listener waits failed and were retried; {} redeliveries ({} found already finished)",
            sent.ok.len(),
            sent.errors.len(),
            sent.hung,
            heard.errors,
            counts.redeliveries(),
            counts.skipped
        ),
        seconds,
    };
    print_table(std::slice::from_ref(&row));
    assert!(
        lost.is_empty(),
        "{} jobs whose send returned Ok have no SUCCESS: {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    assert_eq!(sent.hung, 0, "sends hung instead of failing");
    assert!(
        sent.errors.iter().all(|e| e.len() > 10),
        "an error that says nothing: {:?}",
        sent.errors
    );
    assert!(
        sent.ok.len() + sent.errors.len() == jobs,
        "every send is either Ok or an error"
    );
    let bound = CONCURRENCY * PROCESSES * restarts;
    assert!(
        duplicates <= bound,
        "{duplicates} jobs ran twice, more than the {bound} in flight at the restarts"
    );
    drop(server);
    drop(cleanup);
    row
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restarted_twice_under_load_loses_nothing() {
    campaign(Transport::Redis, 1_500).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rabbitmq_restarted_twice_under_load_loses_nothing() {
    campaign(Transport::Amqp, 1_500).await;
}

/// `CELERITY_LONG_FAULTS=1`: 10,000 sends per broker, then the table of both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_restart_campaign() {
    if !long_run() {
        eprintln!("skipped: set CELERITY_LONG_FAULTS=1 for the long restart campaign");
        return;
    }
    let rows = vec![
        campaign(Transport::Redis, 10_000).await,
        campaign(Transport::Amqp, 10_000).await,
    ];
    print_table(&rows);
}
