//! Kill: a batch drained by a `-P 2` pool while the test SIGKILLs random children and the
//! supervisor itself at random moments. After a supervisor kill a new pool is started; the old
//! one's children must end by themselves (`PR_SET_PDEATHSIG`). On Redis the visibility timeout is
//! 2 s (sweep every 1 s), so a dead process's unacked jobs come back within the test; on RabbitMQ
//! they come back when its connection drops.
//!
//! Every job must end with exactly one stored SUCCESS holding its value; a job run more than once
//! (counted from the pool's log, see the crate doc) is a duplicate, and duplicates must stay within
//! what the killed processes could have had in flight: concurrency × processes × kills.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use celerity_broker::{connect_backend, connect_broker};
use celerity_client::{Client, SendOptions};
use celerity_testsupport::{unique, Cleanup, Transport, AMQP, REDIS};

use super::{
    long_run, print_table, stored_results, surviving, unfinished, LogCounts, LogFile, Orphans,
    Pool, Rng, Row,
};

const PROCESSES: usize = 2;
const CONCURRENCY: usize = 4;

/// The size of one run.
struct Plan {
    jobs: usize,
    kills: usize,
    /// How many of the kills hit the supervisor (the others hit a random child).
    supervisor_kills: usize,
    /// Pause before each kill, in ms (uniform in this range).
    pause_ms: (u64, u64),
    /// How long the drain may take after the last kill.
    patience: Duration,
}

/// Runs one kill campaign on `transport`; panics on a lost job, a wrong or missing result, a
/// surviving orphan or too many duplicates.
async fn campaign(transport: Transport, plan: &Plan) -> Row {
    let q = unique("faults-kill");
    let prefix = format!("{q}:");
    let mut cleanup = Cleanup::new().redis_prefix(&prefix);
    let backend_url = format!("{REDIS}?global_keyprefix={prefix}");
    let (broker_url, name) = match transport {
        Transport::Redis => (
            format!("{backend_url}&visibility_timeout=2&restore_interval=1"),
            "Redis",
        ),
        Transport::Amqp => {
            cleanup = cleanup.amqp_queue(&q);
            (AMQP.to_owned(), "RabbitMQ")
        }
    };
    let mut rng = Rng::new(&format!("kill on {name}"));
    let log = LogFile::new(&q);
    let began = Instant::now();

    let mut pool = Pool::start(
        &broker_url,
        &backend_url,
        &q,
        PROCESSES,
        CONCURRENCY,
        &log.0,
    );
    assert_eq!(pool.wait_for_children(PROCESSES).len(), PROCESSES);
    let broker = connect_broker(&broker_url).await.unwrap();
    let backend = connect_backend(&backend_url).await.unwrap();
    let client = Client::new(broker.clone(), Some(backend.clone()));

    // demo.sleep_ms(ms) returns ms: 40–60 ms a job, so the batch outlasts the kills.
    let options = SendOptions::new().queue(&q);
    let mut expected: HashMap<String, Value> = HashMap::new();
    let batch: Vec<_> = (0..plan.jobs)
        .map(|i| {
            let ms = 40 + (i % 21) as u64;
            let m = options
                .build(
                    "demo.sleep_ms",
                    vec![json!(ms)],
                    Map::new(),
                    chrono::Utc::now(),
                )
                .unwrap();
            expected.insert(m.id().to_owned(), json!(ms));
            m
        })
        .collect();
    client.send_batch(&batch, &q).await.unwrap();

    // Which kills hit the supervisor.
    let mut on_supervisor = vec![false; plan.kills];
    while on_supervisor.iter().filter(|s| **s).count() < plan.supervisor_kills {
        on_supervisor[rng.range(0, plan.kills as u64) as usize] = true;
    }
    let mut orphans = Orphans::default();
    let mut left_at_last_kill = 0;
    for hits_supervisor in on_supervisor {
        tokio::time::sleep(Duration::from_millis(
            rng.range(plan.pause_ms.0, plan.pause_ms.1),
        ))
        .await;
        left_at_last_kill = broker.queue_len(&q).await.unwrap_or(0);
        if hits_supervisor {
            // Both children up (not in a restart backoff after a child kill), so that the kill
            // leaves orphans to check.
            pool.wait_for_children(PROCESSES);
            orphans.0.extend(pool.kill_supervisor());
            pool = Pool::start(
                &broker_url,
                &backend_url,
                &q,
                PROCESSES,
                CONCURRENCY,
                &log.0,
            );
            // Its children up, so that a later kill of it leaves orphans to check.
            pool.wait_for_children(PROCESSES);
        } else {
            let children = pool.wait_for_children(1);
            assert!(!children.is_empty(), "the pool has no worker process left");
            let victim = children[rng.range(0, children.len() as u64) as usize];
            super::signal(victim, libc::SIGKILL);
        }
    }

    let missing = unfinished(&backend, &expected, plan.patience).await;
    let seconds = began.elapsed().as_secs_f64();
    let alive = surviving(&orphans.0, Duration::from_secs(30));
    assert!(pool.stop(), "the last pool did not stop cleanly on SIGTERM");
    let counts = LogCounts::read(&log.0);
    let stored = stored_results(REDIS, &prefix).await;
    let _ = client.close().await;

    let never_logged = expected
        .keys()
        .filter(|id| !counts.runs.contains_key(*id))
        .count();
    let duplicates = counts.duplicates(expected.keys());
    let bound = CONCURRENCY * PROCESSES * plan.kills;
    let row = Row {
        broker: name,
        fault: "SIGKILL of children and supervisor",
        jobs: plan.jobs,
        faults: plan.kills,
        lost: missing.len(),
        duplicates,
        note: format!(
            "{} supervisor kills, {} orphans (all gone); {} redeliveries ({} found already finished); duplicate bound {bound}",
            plan.supervisor_kills,
            orphans.0.len(),
            counts.redeliveries(),
            counts.skipped
        ),
        seconds,
    };
    print_table(std::slice::from_ref(&row));
    assert!(
        missing.is_empty(),
        "{} jobs without their SUCCESS: {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert_eq!(
        orphans.0.len(),
        plan.supervisor_kills * PROCESSES,
        "each supervisor kill left its children"
    );
    assert!(
        alive.is_empty(),
        "orphans of a killed supervisor still run: {alive:?}"
    );
    assert_eq!(stored, plan.jobs, "one stored result per job, no other");
    assert_eq!(
        never_logged, 0,
        "jobs with a stored SUCCESS but no `succeeded` line: the run count is unsound"
    );
    assert!(
        left_at_last_kill > 0,
        "the batch was drained before the last kill; make the jobs longer"
    );
    assert!(
        duplicates <= bound,
        "{duplicates} jobs ran twice, more than the {bound} that could have been in flight"
    );
    drop(cleanup);
    row
}

fn ci_plan() -> Plan {
    Plan {
        jobs: 2_000,
        kills: 10,
        supervisor_kills: 2,
        pause_ms: (400, 900),
        patience: Duration::from_secs(120),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_children_and_supervisors_lose_no_job_on_redis() {
    campaign(Transport::Redis, &ci_plan()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_children_and_supervisors_lose_no_job_on_rabbitmq() {
    campaign(Transport::Amqp, &ci_plan()).await;
}

/// `CELERITY_LONG_FAULTS=1`: 10,000 jobs and 16 kills (4 of them the supervisor) per broker, then
/// the table of both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_kill_campaign() {
    if !long_run() {
        eprintln!("skipped: set CELERITY_LONG_FAULTS=1 for the long kill campaign");
        return;
    }
    let plan = Plan {
        jobs: 10_000,
        kills: 16,
        supervisor_kills: 4,
        pause_ms: (1_000, 3_500),
        patience: Duration::from_secs(600),
    };
    let rows = vec![
        campaign(Transport::Redis, &plan).await,
        campaign(Transport::Amqp, &plan).await,
    ];
    print_table(&rows);
}
