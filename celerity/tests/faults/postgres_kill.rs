//! SIGKILL with results in PostgreSQL: a `celerity worker -P 2 --backend db+postgresql://…` pool
//! (broker on Redis, visibility timeout 2 s) drains a batch while the test SIGKILLs its worker
//! processes mid-batch, several times. Late acks: a killed process's unacked jobs come back and run
//! again. Every job must end with its SUCCESS stored, as exactly one row of Celery's table, and no
//! row for anything else.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use celerity_broker::{connect_backend, connect_broker};
use celerity_client::{Client, SendOptions};
use celerity_testsupport::{unique, Cleanup, PgSchema, REDIS};

use super::{print_table, unfinished, LogCounts, LogFile, Pool, Rng, Row};

const PROCESSES: usize = 2;
const CONCURRENCY: usize = 8;
const JOBS: usize = 1_500;
const KILLS: usize = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_workers_lose_no_result_stored_in_postgres() {
    let q = unique("faults-pg-kill");
    let prefix = format!("{q}:");
    let cleanup = Cleanup::new().redis_prefix(&prefix);
    let schema = PgSchema::new("faults_kill");
    let broker_url =
        format!("{REDIS}?global_keyprefix={prefix}&visibility_timeout=2&restore_interval=1");
    let backend_url = schema.url("");
    let mut rng = Rng::new("kill with results in PostgreSQL");
    let log = LogFile::new(&q);
    let began = Instant::now();

    // The client first: it creates the tables before the pool's processes race to.
    let broker = connect_broker(&broker_url).await.unwrap();
    let backend = connect_backend(&backend_url).await.unwrap();
    let client = Client::new(broker.clone(), Some(backend.clone()));
    let pool = Pool::start(
        &broker_url,
        &backend_url,
        &q,
        PROCESSES,
        CONCURRENCY,
        &log.0,
    );
    assert_eq!(pool.wait_for_children(PROCESSES).len(), PROCESSES);

    // demo.sleep_ms(ms) returns ms: 10–30 ms a job, so the batch outlasts the kills.
    let options = SendOptions::new().queue(&q);
    let mut expected: HashMap<String, Value> = HashMap::new();
    let batch: Vec<_> = (0..JOBS)
        .map(|i| {
            let ms = 10 + (i % 21) as u64;
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

    let mut left_at_last_kill = 0;
    for _ in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(rng.range(300, 700))).await;
        left_at_last_kill = broker.queue_len(&q).await.unwrap_or(0);
        let children = pool.wait_for_children(1);
        assert!(!children.is_empty(), "the pool has no worker process left");
        let victim = children[rng.range(0, children.len() as u64) as usize];
        super::signal(victim, libc::SIGKILL);
    }

    let missing = unfinished(&backend, &expected, Duration::from_secs(90)).await;
    let seconds = began.elapsed().as_secs_f64();
    assert!(pool.stop(), "the pool did not stop cleanly on SIGTERM");
    let counts = LogCounts::read(&log.0);
    let rows = schema.psql(&format!(
        "SELECT count(*), count(DISTINCT task_id), count(*) FILTER (WHERE status = 'SUCCESS') \
         FROM \"{}\".celery_taskmeta",
        schema.name
    ));
    let _ = client.close().await;
    let duplicates = counts.duplicates(expected.keys());
    let row = Row {
        broker: "Redis",
        fault: "SIGKILL of workers, results in PostgreSQL",
        jobs: JOBS,
        faults: KILLS,
        lost: missing.len(),
        duplicates,
        note: format!(
            "{} redeliveries ({} found already finished); rows (all, distinct ids, SUCCESS): {rows}",
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
        rows,
        format!("{JOBS}|{JOBS}|{JOBS}"),
        "one SUCCESS row per job, no other"
    );
    assert!(
        left_at_last_kill > 0,
        "the batch was drained before the last kill; make the jobs longer"
    );
    assert!(
        counts.redeliveries() > 0,
        "no job came back after the kills: the test did not kill mid-batch"
    );
    drop(cleanup);
}
