//! Network cut: a `-P 2` pool, a producer (one `Client`, sending in a loop) and a result listener
//! (the same client) reach the broker and the result backend only through [`CutProxy`]s the test
//! owns, while the test cuts them mid-drain: first a black hole (a pulled cable: nothing moves,
//! nothing closes) for longer than the clients' timeouts and heartbeat, then a reset (every
//! connection closed, new ones refused) for a few seconds. Nothing is rebuilt by the test: the pool,
//! the producer and the listener must find their way back on their own.
//!
//! - Redis: broker and results on the shared Redis through one proxy; the black hole outlasts the
//!   30 s response timeout and the 10 s visibility timeout (leases lapse while cut).
//! - RabbitMQ: the shared broker through one proxy (`heartbeat=5`: the black hole outlasts two
//!   heartbeats, so the connections are declared dead), results on the shared Redis through a second
//!   proxy cut at the same moments.
//!
//! Checks: every send returns `Ok` or an error that says what failed, each within [`SEND_BOUND`]
//! (a send that never returns is a hang); every `Ok` send has exactly its SUCCESS stored (read
//! directly, not through the proxy), and the listener heard it too; jobs run twice stay within the
//! slots in flight at the cuts; after the last restoration every pool process answers a remote
//! `ping` (its control listener is not deaf) and a last batch sent then completes.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use celerity_broker::{connect_backend, connect_broker, State};
use celerity_client::control::Target;
use celerity_client::{Client, SendOptions};
use celerity_testsupport::{unique, Cleanup, Cut, CutProxy, Transport, AMQP, REDIS};

use super::{long_run, print_table, unfinished, LogCounts, LogFile, Pool, Row};

const PROCESSES: usize = 2;
const CONCURRENCY: usize = 4;
/// A send that takes longer than this has hung (the clients' own bounds are 30 s a command).
const SEND_BOUND: Duration = Duration::from_secs(50);
/// Jobs sent after the last restoration, that must complete.
const LAST_BATCH: usize = 50;

/// The cuts of one run, in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// A black hole, then everything held flows on.
    BlackHole,
    /// Every connection reset, new ones refused.
    Reset,
    /// A black hole after which only new connections get through: the open ones stay silent for
    /// good, so only a client that notices (a timeout, a heartbeat) and dials again recovers.
    Stranded,
}

impl Fault {
    fn cut(self) -> Cut {
        match self {
            Fault::BlackHole | Fault::Stranded => Cut::BlackHole,
            Fault::Reset => Cut::Reset,
        }
    }
}

/// The size of one run.
struct Plan {
    jobs: usize,
    /// How long each cut lasts.
    black_hole: Duration,
    reset: Duration,
    stranded: Duration,
    /// How long the producer may take for all its sends (a producer left deaf never finishes).
    send_for: Duration,
}

/// Where the clients connect (through the proxies) and where the test checks (directly).
struct Wiring {
    name: &'static str,
    broker: String,
    backend: String,
    direct_backend: String,
    direct_broker: String,
    /// Every proxy between the clients and the servers (cut together).
    proxies: Vec<CutProxy>,
}

async fn wire(transport: Transport, prefix: &str) -> Wiring {
    let redis = CutProxy::start(0, "127.0.0.1:6379")
        .await
        .expect("start the Redis proxy");
    let via = |p: &CutProxy| format!("redis://127.0.0.1:{}/0?global_keyprefix={prefix}", p.port());
    let backend = via(&redis);
    let direct_backend = format!("{REDIS}?global_keyprefix={prefix}");
    match transport {
        Transport::Redis => Wiring {
            name: "Redis (broker and results)",
            broker: format!("{backend}&visibility_timeout=10&restore_interval=1"),
            backend,
            direct_broker: direct_backend.clone(),
            direct_backend,
            proxies: vec![redis],
        },
        Transport::Amqp => {
            let amqp = CutProxy::start(0, "127.0.0.1:5672")
                .await
                .expect("start the RabbitMQ proxy");
            Wiring {
                name: "RabbitMQ (results on Redis)",
                broker: format!(
                    "amqp://guest:guest@127.0.0.1:{}/%2f?heartbeat=5",
                    amqp.port()
                ),
                backend,
                direct_backend,
                direct_broker: AMQP.to_owned(),
                proxies: vec![amqp, redis],
            }
        }
    }
}

impl Wiring {
    fn set(&self, cut: Cut) {
        for p in &self.proxies {
            p.set(cut);
        }
    }

    fn restore(&self) {
        self.set(Cut::Open);
    }

    fn restore_new_only(&self) {
        for p in &self.proxies {
            p.restore_new_only();
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
    /// Sends that did not return within [`SEND_BOUND`].
    hung: usize,
    /// The longest a send took.
    slowest: Duration,
}

impl Sent {
    fn note(&mut self, took: Duration) {
        self.slowest = self.slowest.max(took);
    }
}

/// Sends one `ms`-long `demo.sleep_ms` job through `client` and records what the send did.
async fn send_one(client: &Client, q: &str, ms: u64, sent: &Mutex<Sent>) -> Option<String> {
    let options = SendOptions::new().queue(q);
    let began = Instant::now();
    let send = client.send_task(
        "demo.sleep_ms",
        vec![json!(ms)],
        Default::default(),
        &options,
    );
    let outcome = tokio::time::timeout(SEND_BOUND, send).await;
    let mut s = sent.lock().unwrap();
    s.note(began.elapsed());
    match outcome {
        Ok(Ok(r)) => {
            s.ok.insert(r.id().to_owned(), json!(ms));
            Some(r.id().to_owned())
        }
        Ok(Err(e)) => {
            s.errors.push(e.to_string());
            None
        }
        Err(_) => {
            s.hung += 1;
            None
        }
    }
}

/// The pool's nodes that answer a `ping` within a few tries (names starting with `name`).
async fn answering(client: &Client, name: &str, patience: Duration) -> HashSet<String> {
    let until = Instant::now() + patience;
    let mut nodes = HashSet::new();
    while nodes.len() < PROCESSES && Instant::now() < until {
        let target = Target {
            destination: Vec::new(),
            timeout: Duration::from_secs(2),
        };
        if let Ok(replies) = client
            .control_call("ping", Default::default(), &target)
            .await
        {
            nodes.extend(
                replies
                    .into_iter()
                    .map(|r| r.node)
                    .filter(|n| n.starts_with(name)),
            );
        }
    }
    nodes
}

async fn campaign(transport: Transport, plan: &Plan) -> Row {
    let q = unique("faults-netcut");
    let prefix = format!("{q}:");
    let mut cleanup = Cleanup::new().redis_prefix(&prefix);
    if transport == Transport::Amqp {
        cleanup = cleanup.amqp_queue(&q);
    }
    let wiring = wire(transport, &prefix).await;
    let name = wiring.name;
    let log = LogFile::new(&q);
    let began = Instant::now();
    let node = format!("{q}@%h");
    let pool = Pool::start_with(
        &wiring.broker,
        &wiring.backend,
        &q,
        PROCESSES,
        CONCURRENCY,
        &log.0,
        &["-n", &node],
    );
    assert_eq!(pool.wait_for_children(PROCESSES).len(), PROCESSES);
    let client = Arc::new(Client::new(
        connect_broker(&wiring.broker).await.unwrap(),
        Some(connect_backend(&wiring.backend).await.unwrap()),
    ));
    let direct = connect_backend(&wiring.direct_backend).await.unwrap();
    let direct_broker = connect_broker(&wiring.direct_broker).await.unwrap();

    let progress = Arc::new(AtomicUsize::new(0));
    let sent = Arc::new(Mutex::new(Sent::default()));
    let (to_listener, mut sent_ids) = tokio::sync::mpsc::unbounded_channel::<String>();
    let producer = {
        let (client, progress, sent, q) =
            (client.clone(), progress.clone(), sent.clone(), q.clone());
        let to_listener = to_listener.clone();
        let jobs = plan.jobs;
        let until = Instant::now() + plan.send_for;
        tokio::spawn(async move {
            for i in 0..jobs {
                if Instant::now() > until {
                    // Still failing long after the last cut: stop (the test fails), don't hang.
                    break;
                }
                // 40–60 ms a job: slower than the sends, so a backlog is in flight at the cuts.
                let ms = 40 + (i % 21) as u64;
                let pause = match send_one(&client, &q, ms, &sent).await {
                    Some(id) => {
                        let _ = to_listener.send(id);
                        Duration::from_millis(2)
                    }
                    None => Duration::from_millis(100),
                };
                progress.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(pause).await;
            }
        })
    };
    let listener = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut heard: HashMap<String, (State, Value)> = HashMap::new();
            let mut errors = 0usize;
            let until = Instant::now() + Duration::from_secs(if long_run() { 900 } else { 240 });
            while let Some(id) = sent_ids.recv().await {
                let result = client.result::<Value>(&id);
                loop {
                    match result.wait_meta(Some(Duration::from_secs(30))).await {
                        Ok(m) => {
                            heard.insert(id, (m.status, m.result));
                            break;
                        }
                        Err(_) if Instant::now() < until => {
                            errors += 1;
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Err(_) => break,
                    }
                }
            }
            (heard, errors)
        })
    };

    // The cuts at a quarter, a half and three quarters of the sends.
    let mut cuts = 0;
    let mut backlog_at_cuts = Vec::new();
    for (quarter, fault, length) in [
        (1, Fault::BlackHole, plan.black_hole),
        (2, Fault::Reset, plan.reset),
        (3, Fault::Stranded, plan.stranded),
    ] {
        while progress.load(Ordering::SeqCst) < plan.jobs * quarter / 4 && !producer.is_finished() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        backlog_at_cuts.push(direct_broker.queue_len(&q).await.unwrap_or(0));
        eprintln!("{name}: {fault:?} for {length:?}");
        wiring.set(fault.cut());
        tokio::time::sleep(length).await;
        if fault == Fault::Stranded {
            wiring.restore_new_only();
        } else {
            wiring.restore();
        }
        cuts += 1;
    }
    producer.await.unwrap();
    let produced = progress.load(Ordering::SeqCst);
    assert!(
        produced == plan.jobs,
        "the producer could send only {produced} of {} jobs within {:?}: {:?}",
        plan.jobs,
        plan.send_for,
        sent.lock()
            .unwrap()
            .errors
            .iter()
            .rev()
            .take(3)
            .collect::<Vec<_>>()
    );

    // Not deaf: every pool process answers a ping, and a batch sent now completes.
    let nodes = answering(&client, &q, Duration::from_secs(60)).await;
    for i in 0..LAST_BATCH {
        if let Some(id) = send_one(&client, &q, 5 + (i % 5) as u64, &sent).await {
            let _ = to_listener.send(id);
        }
    }
    drop(to_listener);
    let sent_all = std::mem::take(&mut *sent.lock().unwrap());
    let missing = unfinished(&direct, &sent_all.ok, Duration::from_secs(120)).await;
    let (heard, listen_errors) = listener.await.unwrap();
    let seconds = began.elapsed().as_secs_f64();
    assert_eq!(pool.children().len(), PROCESSES, "the pool lost a process");
    assert!(pool.stop(), "the pool did not stop cleanly on SIGTERM");
    let counts = LogCounts::read(&log.0);
    let _ = client.close().await;

    let unheard = sent_all
        .ok
        .iter()
        .filter(|(id, v)| heard.get(*id) != Some(&(State::Success, (*v).clone())))
        .count();
    let duplicates = counts.duplicates(sent_all.ok.keys());
    let mut kinds: Vec<&String> = sent_all.errors.iter().collect();
    kinds.sort();
    kinds.dedup();
    for kind in kinds.iter().take(5) {
        eprintln!("{name}: a send failed with: {kind}");
    }
    let row = Row {
        broker: name,
        fault: "black hole, reset, stranded black hole",
        jobs: plan.jobs + LAST_BATCH,
        faults: cuts,
        lost: missing.len(),
        duplicates,
        note: format!(
            "cuts {:.0} s, {:.0} s and {:.0} s; backlog at the cuts {:?}; {} sends Ok, {} refused with an error, {} hung, slowest send {:.1} s; {} listener waits failed and were retried; {} redeliveries ({} found already finished); {} of {PROCESSES} processes answered ping after",
            plan.black_hole.as_secs_f64(),
            plan.reset.as_secs_f64(),
            plan.stranded.as_secs_f64(),
            backlog_at_cuts,
            sent_all.ok.len(),
            sent_all.errors.len(),
            sent_all.hung,
            sent_all.slowest.as_secs_f64(),
            listen_errors,
            counts.redeliveries(),
            counts.skipped,
            nodes.len(),
        ),
        seconds,
    };
    print_table(std::slice::from_ref(&row));
    assert!(
        missing.is_empty(),
        "{} jobs whose send returned Ok have no SUCCESS: {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert_eq!(sent_all.hung, 0, "sends hung instead of failing");
    assert!(
        sent_all.errors.iter().all(|e| e.len() > 10),
        "an error that says nothing: {:?}",
        sent_all.errors
    );
    assert_eq!(unheard, 0, "the listener missed results that are stored");
    assert_eq!(
        nodes.len(),
        PROCESSES,
        "pool processes deaf to remote control after the cut: {nodes:?} answered"
    );
    let bound = CONCURRENCY * PROCESSES * cuts;
    assert!(
        duplicates <= bound,
        "{duplicates} jobs ran twice, more than the {bound} in flight at the cuts"
    );
    drop(wiring);
    drop(cleanup);
    row
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cut_off_from_its_worker_loses_nothing() {
    let plan = Plan {
        jobs: 1_500,
        black_hole: Duration::from_secs(12),
        reset: Duration::from_secs(4),
        stranded: Duration::from_secs(4),
        send_for: Duration::from_secs(150),
    };
    campaign(Transport::Redis, &plan).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rabbitmq_cut_off_from_its_worker_loses_nothing() {
    let plan = Plan {
        jobs: 1_500,
        black_hole: Duration::from_secs(12),
        reset: Duration::from_secs(4),
        stranded: Duration::from_secs(4),
        send_for: Duration::from_secs(150),
    };
    campaign(Transport::Amqp, &plan).await;
}
