//! Redis Sentinel failover under load: the test starts a master, two replicas and three sentinels
//! of its own (127.0.0.1, Redis on 16400–16499, sentinels on 26400–26499, temporary directories,
//! everything killed by pid and removed on drop), and a `-P 2` pool, a producer with a result
//! listener, and two `celerity beat`s all on the same `sentinel://` URL. Mid-drain the master is
//! SIGKILLed; the sentinels promote the replica; nothing is restarted by the test.
//!
//! Checks: every send either returned `Ok` — then its job ends SUCCESS with its value, read by the
//! listener that was waiting across the failover — or an error that says what failed; no send
//! hangs; jobs run twice (counted from the pool's log, see the crate doc) stay within what the pool
//! can hold fetched at once; the beats never send a tick twice and resume on the new master.
//!
//! The broker URL carries `wait_replicas=1`: Redis replicates asynchronously, and without it a
//! message whose publish returned `Ok` just before the kill may be missing on the promoted replica.
//! Hence two replicas: after the failover the set still has one to confirm publishes.

use std::collections::{BTreeMap, HashMap};

use chrono::Utc;
use std::fs::OpenOptions;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use celerity_broker::{connect_backend, connect_broker, State};
use celerity_client::{Client, SendOptions};
use celerity_testsupport::{celerity_command, unique, ChildGuard, SentinelSet};

use super::beat::{sent_ticks, stop};
use super::{print_table, LogCounts, LogFile, Pool, Row};

const JOBS: usize = 5_000;
const PROCESSES: usize = 2;
const CONCURRENCY: usize = 4;
/// What one worker process may hold fetched and not yet acked (running or waiting to run): its
/// concurrency times Celery's default prefetch multiplier.
const PREFETCH_MULTIPLIER: usize = 4;
/// A send that takes longer than this is a hang.
const SEND_PATIENCE: Duration = Duration::from_secs(30);
/// The whole run's bound (the failover itself takes a few seconds).
const RUN_LIMIT: Duration = Duration::from_secs(75);

/// What the producer saw.
#[derive(Default)]
struct Sent {
    ok: HashMap<String, Value>,
    /// Sends that returned `Ok` after the sentinels had switched to the new master.
    ok_after_failover: usize,
    errors: Vec<String>,
    hung: usize,
}

/// A `celerity beat` on `url` ticking `demo.tick` every second into `queue`, its log in `log`;
/// with its schedule and state files.
fn start_beat(url: &str, queue: &str, tag: &str, log: &LogFile) -> (ChildGuard, PathBuf, PathBuf) {
    let dir = std::env::temp_dir();
    let schedule = dir.join(format!("{tag}.toml"));
    std::fs::write(
        &schedule,
        format!("[[entry]]\nname = \"tick\"\ntask = \"demo.tick\"\nevery = \"1s\"\nqueue = \"{queue}\"\n"),
    )
    .expect("write the schedule");
    let state = dir.join(format!("{tag}.json"));
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log.0)
        .expect("open the beat's log");
    let mut cmd = celerity_command(env!("CARGO_BIN_EXE_celerity"));
    cmd.args(["--broker", url, "beat", "--schedule"])
        .arg(&schedule)
        .args(["--lease", "2", "--state"])
        .arg(&state)
        .env("CELERITY_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::from(file));
    (
        ChildGuard::spawn(&mut cmd, "celerity beat"),
        schedule,
        state,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_under_load_loses_nothing() {
    let began = Instant::now();
    let Some(mut cluster) = SentinelSet::start(16400..16450, 26400..26450).await else {
        eprintln!("skipped: redis-server is not installed");
        return;
    };
    let old_master = cluster.master.port;
    let q = unique("faults-sentinel");
    let broker_url = cluster.url("&visibility_timeout=5&restore_interval=1&wait_replicas=1");
    let backend_url = cluster.url("");
    let log = LogFile::new(&q);
    let pool = Pool::start(
        &broker_url,
        &backend_url,
        &q,
        PROCESSES,
        CONCURRENCY,
        &log.0,
    );
    assert_eq!(pool.wait_for_children(PROCESSES).len(), PROCESSES);
    let beat_queue = format!("{q}-beat");
    let beat_logs = [
        LogFile::new(&format!("{q}-beat-a")),
        LogFile::new(&format!("{q}-beat-b")),
    ];
    let beats: Vec<_> = ["a", "b"]
        .iter()
        .zip(&beat_logs)
        .map(|(tag, log)| start_beat(&broker_url, &beat_queue, &format!("{q}-{tag}"), log))
        .collect();
    let client = Arc::new(Client::new(
        connect_broker(&broker_url)
            .await
            .expect("broker over sentinel"),
        Some(
            connect_backend(&backend_url)
                .await
                .expect("backend over sentinel"),
        ),
    ));

    let progress = Arc::new(AtomicUsize::new(0));
    let failed_over = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(Mutex::new(Sent::default()));
    let (to_listener, mut sent_ids) = tokio::sync::mpsc::unbounded_channel::<String>();
    let producer = {
        let (client, progress, sent, q) =
            (client.clone(), progress.clone(), sent.clone(), q.clone());
        let failed_over = failed_over.clone();
        tokio::spawn(async move {
            let options = SendOptions::new().queue(&q);
            for i in 0..JOBS {
                let ms = 1 + (i % 5) as u64;
                let send = client.send_task(
                    "demo.sleep_ms",
                    vec![json!(ms)],
                    Default::default(),
                    &options,
                );
                let outcome = tokio::time::timeout(SEND_PATIENCE, send).await;
                let after = failed_over.load(Ordering::SeqCst);
                let pause = {
                    let mut s = sent.lock().unwrap();
                    match outcome {
                        Ok(Ok(r)) => {
                            s.ok.insert(r.id().to_owned(), json!(ms));
                            s.ok_after_failover += usize::from(after);
                            let _ = to_listener.send(r.id().to_owned());
                            Duration::ZERO
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
            let mut outcomes: HashMap<String, (State, Value)> = HashMap::new();
            let mut errors = 0usize;
            let until = Instant::now() + RUN_LIMIT;
            while let Some(id) = sent_ids.recv().await {
                let result = client.result::<Value>(&id);
                loop {
                    match result.wait_meta(Some(Duration::from_secs(20))).await {
                        Ok(m) => {
                            outcomes.insert(id, (m.status, m.result));
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
            (outcomes, errors)
        })
    };

    // Mid-drain (and mid-send): the master dies.
    while progress.load(Ordering::SeqCst) < JOBS / 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let killed_at = Instant::now();
    let killed_unix = Utc::now().timestamp();
    cluster.master.kill();
    let promoted = cluster.wait_failover(old_master).await;
    let failover = killed_at.elapsed();
    failed_over.store(true, Ordering::SeqCst);
    assert!(
        cluster.replicas.iter().any(|r| r.port == promoted),
        "the sentinels name {promoted}, not a replica"
    );
    let failed_over_unix = Utc::now().timestamp();
    tokio::time::timeout(RUN_LIMIT, producer)
        .await
        .expect("the producer did not finish")
        .unwrap();
    let (outcomes, listener_errors) = tokio::time::timeout(RUN_LIMIT, listener)
        .await
        .expect("the listener did not finish")
        .unwrap();
    // Beat's ticks after the failover: at least a few seconds on the new master.
    let beat_after = killed_at + failover + Duration::from_secs(6);
    tokio::time::sleep_until(beat_after.into()).await;
    let seconds = began.elapsed().as_secs_f64();
    let stopped_unix = Utc::now().timestamp();
    for (beat, schedule, state) in beats {
        stop(beat);
        let _ = std::fs::remove_file(schedule);
        let _ = std::fs::remove_file(state);
    }
    assert!(pool.stop(), "the pool did not stop cleanly on SIGTERM");
    let counts = LogCounts::read(&log.0);
    let beat_queued = client
        .broker()
        .queue_len(&beat_queue)
        .await
        .expect("read the beat queue on the new master");
    let _ = client.close().await;

    let sent = std::mem::take(&mut *sent.lock().unwrap());
    let lost: Vec<&String> = sent
        .ok
        .iter()
        .filter(|(id, v)| outcomes.get(*id) != Some(&(State::Success, (*v).clone())))
        .map(|(id, _)| id)
        .collect();
    let duplicates = counts.duplicates(sent.ok.keys());
    let mut ticks: BTreeMap<i64, usize> = BTreeMap::new();
    for l in &beat_logs {
        for t in sent_ticks(l) {
            *ticks.entry(t).or_insert(0) += 1;
        }
    }
    let twice: Vec<&i64> = ticks
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(t, _)| t)
        .collect();
    let mut kinds = sent.errors.clone();
    kinds.sort();
    kinds.dedup();
    for kind in kinds.iter().take(5) {
        eprintln!("sentinel: a send failed with: {kind}");
    }
    let row = Row {
        broker: "Redis Sentinel (master + 2 replicas + 3 sentinels)",
        fault: "master SIGKILLed, replica promoted",
        jobs: JOBS,
        faults: 1,
        lost: lost.len(),
        duplicates,
        note: format!(
            "failover seen after {:.1} s; {} sends Ok ({} after the failover), {} refused with an error, {} hung; {} listener waits retried; {} redeliveries ({} already finished); beat: {} ticks, {} twice, {} queued",
            failover.as_secs_f64(),
            sent.ok.len(),
            sent.ok_after_failover,
            sent.errors.len(),
            sent.hung,
            listener_errors,
            counts.redeliveries(),
            counts.skipped,
            ticks.len(),
            twice.len(),
            beat_queued
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
    assert_eq!(sent.ok.len() + sent.errors.len(), JOBS);
    assert!(
        sent.ok_after_failover > 0,
        "no send returned Ok after the failover (the producer finished before it: send more jobs)"
    );
    let bound = PROCESSES * CONCURRENCY * PREFETCH_MULTIPLIER;
    assert!(
        duplicates <= bound,
        "{duplicates} jobs ran twice, more than the {bound} a pool can hold fetched"
    );
    assert!(twice.is_empty(), "beat ticks sent twice: {twice:?}");
    assert!(
        ticks.keys().any(|t| *t < killed_unix),
        "beat sent nothing before the kill"
    );
    // Resumed: ticks after the failover, until the beats were stopped (a standby retries the lock
    // every lease / 3, so give it the lease).
    let resumed: Vec<&i64> = ticks
        .keys()
        .filter(|t| (failed_over_unix + 2..stopped_unix).contains(*t))
        .collect();
    assert!(
        !resumed.is_empty(),
        "beat sent no tick after the failover ({failed_over_unix}..{stopped_unix}): {ticks:?}"
    );
    assert_eq!(
        beat_queued as usize,
        ticks.values().sum::<usize>(),
        "every tick a beat logged as sent is in the queue on the new master"
    );
}
