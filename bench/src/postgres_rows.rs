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

/// `add ×n` with results in PostgreSQL, `runs` times, for one system.
pub(super) async fn add_rows(
    programs: &Programs,
    system: System,
    runs: usize,
    n: usize,
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
            let shape = format!("add ×{n}, results in PostgreSQL");
            samples(row(rows, &shape, &label, "results stored/s"), system).push(t.drain);
        }
        results.close().await;
        Ok::<_, BenchError>(())
    }
    .await;
    s.end().await?;
    drop(schema);
    outcome
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
