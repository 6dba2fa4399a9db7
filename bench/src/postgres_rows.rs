//! The add-with-results row with results stored in PostgreSQL (Celery's database backend, Redis
//! broker): Celery's worker with `db+postgresql://` (SQLAlchemy, psycopg2) beside ours with the
//! same URL, each run in a schema of its own, created before and dropped after. The drain rate is
//! results stored per second: a job counts once its SUCCESS row is readable.

use std::process::Command;
use std::time::Duration;

use celerity_bench::error::{BenchError, Result};
use celerity_bench::probe::Results;
use celerity_bench::procs::Programs;
use celerity_bench::setup::{BrokerKind, Pool, Setup, System};
use celerity_bench::shapes;

use super::{row, samples, Row, Session};

/// `add ×n` with results in PostgreSQL, `runs` times, for one system (the row is labelled with
/// `jobs`, the Celerity count, as the Redis add row is); for Celerity also the backend alone.
pub(super) async fn add_rows(
    programs: &Programs,
    system: System,
    runs: usize,
    (n, jobs): (usize, usize),
    rows: &mut Vec<Row>,
) -> Result<()> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let schema = Schema::create(&format!("bench_{}", &id[..12]))?;
    let setup = Setup {
        broker: BrokerKind::Redis,
        results: true,
        prefix: format!("bench-{}:", &id[..12]),
        pg_schema: Some(schema.0.clone()),
    };
    // Our backend makes the tables (as Celery would) before either worker races to.
    let url = setup.backend_url().unwrap_or_default();
    celerity_broker::connect_backend(&url)
        .await?
        .close()
        .await?;
    let s = Session::start_with(programs, system, setup, Pool::TwoProcesses).await?;
    let label = s.setup.label();
    let outcome = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let results = Results::connect(&s.setup).await?;
        for run in 0..runs {
            let job = shapes::Job {
                task: "demo.add",
                n,
                sleep_ms: 0,
            };
            let t = shapes::with_results(programs, &s.setup, &s.queue, &results, job).await?;
            eprintln!(
                "{system:?} {label} add run {}: {:.0} results/s ({:.2} s)",
                run + 1,
                t.drain,
                t.seconds
            );
            let shape = format!("add ×{jobs}, results in PostgreSQL");
            let r = row(rows, &shape, &label, "results stored/s");
            samples(r, system).push(t.drain);
            if n != jobs {
                r.note = format!("Celery N = {n}");
            }
        }
        results.close().await;
        if system == System::Celerity {
            for run in 0..runs {
                let rate = store_alone(&url, jobs).await?;
                eprintln!(
                    "Celerity PostgreSQL backend alone run {}: {rate:.0} results/s",
                    run + 1
                );
                let shape = format!("{jobs} store() from {WRITERS} tasks, backend alone");
                samples(
                    row(rows, &shape, "— / PostgreSQL", "results stored/s"),
                    system,
                )
                .push(rate);
            }
        }
        Ok::<_, BenchError>(())
    }
    .await;
    s.end().await?;
    drop(schema);
    outcome
}

/// Concurrent writers of [`store_alone`] (a worker's jobs in flight).
const WRITERS: usize = 256;

/// Results per second that `WRITERS` tasks store through one backend (the group-commit path a
/// worker's jobs take), `n` in all: the backend's own capacity, without broker or worker.
async fn store_alone(url: &str, n: usize) -> Result<f64> {
    use celerity_broker::TaskMeta;
    let backend = celerity_broker::connect_backend(url).await?;
    let started = std::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..WRITERS {
        let backend = backend.clone();
        tasks.spawn(async move {
            for i in (w..n).step_by(WRITERS) {
                let id = uuid::Uuid::new_v4().to_string();
                backend
                    .store(&TaskMeta::success(id, serde_json::json!(2 * i)))
                    .await?;
            }
            Ok::<_, celerity_broker::BrokerError>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.map_err(|e| BenchError::Setup(format!("a writer panicked: {e}")))??;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    backend.close().await?;
    Ok(rate)
}

/// A schema of the run's own; dropped (with its tables) on drop.
struct Schema(String);

impl Schema {
    fn create(name: &str) -> Result<Schema> {
        psql(&format!("CREATE SCHEMA \"{name}\""))?;
        Ok(Schema(name.to_owned()))
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        if let Err(e) = psql(&format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.0)) {
            eprintln!("bench: {e}");
        }
    }
}

fn psql(sql: &str) -> Result<()> {
    let out = Command::new("psql")
        .args([
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
        ])
        .args(["-d", "postgres", "-c", sql])
        .output()
        .map_err(|e| BenchError::Setup(format!("psql: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(BenchError::Setup(format!(
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}
