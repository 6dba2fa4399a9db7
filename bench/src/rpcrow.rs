//! The add-with-results row on RabbitMQ with the `rpc://` result backend: results come back as
//! messages to the sending client's reply queue, so the producer itself waits for them (nothing
//! can watch from outside). Per run: one producer sends N `demo.add` and reads every result; the
//! rate is N ÷ (first send → last result in hand), values checked.
//!
//! Celery: `celery_rpc_bench.py` (send_task in a loop, then `get()` each) against a prefork -c 2
//! worker, both with `backend="rpc://"`. Its N is capped at 8,000: a Celery client keeps at most
//! 8,192 results that arrive before their `get()` (`MESSAGE_BUFFER_MAX`) and drops the rest, so a
//! larger send-all-then-read run never ends. Celerity: our client (`rpc://`, in this process) and
//! the release `celerity` worker with `--backend rpc://`.

use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use chrono::Utc;
use serde_json::{json, Map, Value};
use tokio::process::Command;

use celerity_broker::protocol::TaskMessage;
use celerity_client::{Client, SendOptions};

use crate::error::{BenchError, Result};
use crate::probe::Probe;
use crate::procs::{Programs, Worker};
use crate::report::Row;
use crate::setup::{BrokerKind, Setup, System, AMQP_URL};

/// The result backend URL both systems get.
const RPC: &str = "rpc://";
/// Celery's client drops results past this many unread (see the module doc), less a margin.
pub const CELERY_MAX_N: usize = 8_000;
/// Messages per batch send on the Celerity side.
const BATCH: usize = 1000;
/// Longest a run may take.
const PATIENCE: Duration = Duration::from_secs(600);

/// The setup label of this row.
pub const LABEL: &str = "RabbitMQ / rpc://";

/// Runs the row for `system`: `runs` runs of `n` jobs (Celery: at most [`CELERY_MAX_N`]) and
/// returns the rate samples and the N used.
pub async fn run(
    programs: &Programs,
    system: System,
    n: usize,
    runs: usize,
) -> Result<(Vec<f64>, usize)> {
    let n = match system {
        System::Celery => n.min(CELERY_MAX_N),
        System::Celerity => n,
    };
    let id = uuid::Uuid::new_v4().simple().to_string();
    let queue = format!("bench.rpc.{}", &id[..12]);
    let setup = Setup {
        broker: BrokerKind::Amqp,
        results: false,
        prefix: String::new(),
        pg_schema: None,
    };
    let probe = Probe::connect(&setup, &queue).await?;
    let worker = start_worker(programs, system, &queue)?;
    let outcome = async {
        // Warm-up: the worker is up and answering on rpc://.
        one_run(programs, system, &queue, 20).await?;
        let mut rates = Vec::new();
        for r in 0..runs {
            let t = one_run(programs, system, &queue, n).await?;
            eprintln!(
                "{system:?} {LABEL} add run {}: {:.0}/s ({:.2} s)",
                r + 1,
                n as f64 / t,
                t
            );
            rates.push(n as f64 / t);
        }
        Ok::<_, BenchError>(rates)
    }
    .await;
    worker.stop(Duration::from_secs(20)).await;
    probe.cleanup().await;
    Ok((outcome?, n))
}

/// Adds the row's samples to `rows` (as `add ×N, results checked` / [`LABEL`] / `drain jobs/s`).
pub fn record(rows: &mut Vec<Row>, jobs: usize, system: System, samples: Vec<f64>, n: usize) {
    let shape = format!("add ×{jobs}, results checked");
    let at = rows
        .iter()
        .position(|r| r.shape == shape && r.setup == LABEL && r.metric == "drain jobs/s");
    let at = at.unwrap_or_else(|| {
        rows.push(Row::new(&shape, LABEL, "drain jobs/s"));
        rows.len() - 1
    });
    let row = &mut rows[at];
    match system {
        System::Celery => {
            row.celery = samples;
            if n != jobs {
                row.note = format!("Celery N = {n} (its client drops results past 8,192 unread)");
            }
        }
        System::Celerity => row.celerity = samples,
    }
}

fn start_worker(programs: &Programs, system: System, queue: &str) -> Result<Worker> {
    let node = format!(
        "bench-rpc-{}@%h",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut cmd = match system {
        System::Celery => {
            let mut cmd = Command::new(&programs.python);
            celery_env(programs, &mut cmd);
            cmd.args(["-m", "celery", "-A", "celery_bench", "worker", "-Q", queue])
                .args(["-l", "WARNING", "-n", &node, "-P", "prefork", "-c", "2"]);
            cmd
        }
        System::Celerity => {
            let mut cmd = Command::new(&programs.celerity);
            cmd.env("CELERITY_LOG", "warn")
                .args(["--broker", AMQP_URL, "--backend", RPC])
                .args(["worker", "-Q", queue, "-n", &node, "-P"])
                .arg(programs.celerity_shape.processes.to_string())
                .arg("-c")
                .arg(programs.celerity_shape.concurrency.to_string());
            cmd
        }
    };
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let child = cmd
        .spawn()
        .map_err(|e| BenchError::Setup(format!("starting the {system:?} rpc worker: {e}")))?;
    Worker::from_child(child)
}

fn celery_env(programs: &Programs, cmd: &mut Command) {
    cmd.current_dir(&programs.bench_dir)
        .env("BENCH_BROKER", AMQP_URL)
        .env("BENCH_BACKEND", RPC)
        .env("BENCH_PREFIX", "")
        .env("PYTHONDONTWRITEBYTECODE", "1");
}

/// One run of `n` jobs; returns the seconds from the first send to the last result read.
async fn one_run(programs: &Programs, system: System, queue: &str, n: usize) -> Result<f64> {
    match system {
        System::Celerity => tokio::time::timeout(PATIENCE, celerity_run(queue, n))
            .await
            .map_err(|_| BenchError::Timeout("the Celerity rpc:// run".into()))?,
        System::Celery => celery_run(programs, queue, n).await,
    }
}

async fn celerity_run(queue: &str, n: usize) -> Result<f64> {
    let client = Client::connect(AMQP_URL, Some(RPC)).await?;
    let options = SendOptions::new().queue(queue);
    let started = Instant::now();
    let mut sent: Vec<TaskMessage> = Vec::with_capacity(n);
    let mut i = 0;
    while i < n {
        let end = (i + BATCH).min(n);
        let now = Utc::now();
        let batch: Vec<TaskMessage> = (i..end)
            .map(|k| options.build("demo.add", vec![json!(k), json!(k)], Map::new(), now))
            .collect::<std::result::Result<_, _>>()?;
        client.send_batch(&batch, queue).await?;
        sent.extend(batch);
        i = end;
    }
    let backend = client
        .backend()
        .ok_or_else(|| BenchError::Setup("no rpc:// backend".into()))?;
    for (k, m) in sent.iter().enumerate() {
        let meta = backend.wait(m.id(), Some(Duration::from_secs(120))).await?;
        if meta.result != json!(2 * k) {
            return Err(BenchError::Setup(format!(
                "demo.add({k}, {k}) gave {} ({})",
                meta.result, meta.status
            )));
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let _ = client.close().await;
    Ok(secs)
}

async fn celery_run(programs: &Programs, queue: &str, n: usize) -> Result<f64> {
    let mut cmd = Command::new(&programs.python);
    celery_env(programs, &mut cmd);
    cmd.arg("celery_rpc_bench.py")
        .arg(n.to_string())
        .arg(queue)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let out = tokio::time::timeout(PATIENCE, cmd.output())
        .await
        .map_err(|_| BenchError::Timeout("celery_rpc_bench.py".into()))??;
    if !out.status.success() {
        return Err(BenchError::Setup(format!(
            "celery_rpc_bench.py: {}",
            out.status
        )));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(text.lines().last().unwrap_or(""))?;
    let at = |k: &str| {
        v.get(k)
            .and_then(Value::as_f64)
            .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs_f64(s))
            .ok_or_else(|| BenchError::Setup(format!("celery_rpc_bench.py gave no {k}")))
    };
    let (first, last) = (at("first")?, at("last")?);
    last.duration_since(first)
        .map(|d| d.as_secs_f64().max(1e-9))
        .map_err(|_| BenchError::Setup("celery_rpc_bench.py: last before first".into()))
}
