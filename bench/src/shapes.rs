//! The job shapes, each run the same way against either system, watching the broker / result backend
//! from outside until the work is done. Enqueue rates use each system's own producer (Celery:
//! `app.send_task` in a loop; Celerity: the client's batch send, what `celerity call --count` uses);
//! the worker shapes publish with the same fast producer for both, so only the worker is timed.

use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use chrono::Utc;
use serde_json::{json, Map, Value};
use tokio::process::Command;

use celerity_broker::protocol::TaskMessage;
use celerity_client::{Client, SendOptions};

use crate::error::{BenchError, Result};
use crate::probe::{Probe, Results};
use crate::procs::Programs;
use crate::setup::{Setup, System};

/// No progress for this long fails a shape.
const STALL: Duration = Duration::from_secs(60);
/// Messages per round trip on the Celerity side (the client's chunk size).
const BATCH: usize = 1000;

/// What a publish step gives back.
pub struct Published {
    pub first: SystemTime,
    pub last: SystemTime,
    pub ids: Vec<String>,
}

impl Published {
    /// Messages per second from first publish to the last one acknowledged by the broker.
    pub fn enqueue_rate(&self) -> f64 {
        rate(self.ids.len(), self.first, self.last)
    }
}

/// `n` per second between two instants (0 if they are out of order).
pub fn rate(n: usize, from: SystemTime, to: SystemTime) -> f64 {
    match to.duration_since(from) {
        Ok(d) if d > Duration::ZERO => n as f64 / d.as_secs_f64(),
        _ => 0.0,
    }
}

/// The arguments of job `i` of a shape.
fn args_for(task: &str, i: usize, sleep_ms: u64) -> Vec<Value> {
    match task {
        "demo.add" => vec![json!(i), json!(i)],
        "demo.sleep_ms" => vec![json!(sleep_ms)],
        _ => vec![],
    }
}

/// Publishes `n` jobs of `task` to `queue` with `system`'s own producer.
pub async fn publish(
    programs: &Programs,
    system: System,
    setup: &Setup,
    queue: &str,
    task: &str,
    n: usize,
    sleep_ms: u64,
) -> Result<Published> {
    match system {
        System::Celerity => {
            let client = Client::connect(&setup.celerity_broker_url(), None).await?;
            let options = SendOptions::new().queue(queue);
            let mut ids = Vec::with_capacity(n);
            let first = SystemTime::now();
            let mut i = 0;
            while i < n {
                let end = (i + BATCH).min(n);
                let now = Utc::now();
                let batch: Vec<TaskMessage> = (i..end)
                    .map(|k| options.build(task, args_for(task, k, sleep_ms), Map::new(), now))
                    .collect::<std::result::Result<_, _>>()?;
                client.send_batch(&batch, queue).await?;
                ids.extend(batch.iter().map(|m| m.id().to_owned()));
                i = end;
            }
            let last = SystemTime::now();
            let _ = client.close().await;
            Ok(Published { first, last, ids })
        }
        System::Celery => {
            let out = celery_script(
                programs,
                setup,
                &[
                    "publish",
                    task,
                    &n.to_string(),
                    queue,
                    &sleep_ms.to_string(),
                ],
            )
            .await?;
            let secs = |k: &str| {
                out.get(k)
                    .and_then(Value::as_f64)
                    .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs_f64(s))
                    .ok_or_else(|| BenchError::Setup(format!("celery_bench.py gave no {k}")))
            };
            let ids = out
                .get("ids")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default();
            if ids.len() != n {
                return Err(BenchError::Setup(format!(
                    "celery_bench.py published {} of {n}",
                    ids.len()
                )));
            }
            Ok(Published {
                first: secs("first")?,
                last: secs("last")?,
                ids,
            })
        }
    }
}

/// Runs `celery_bench.py ARGS` in the venv and parses the JSON it prints.
async fn celery_script(programs: &Programs, setup: &Setup, args: &[&str]) -> Result<Value> {
    let mut cmd = Command::new(&programs.python);
    programs.celery_env(&mut cmd, setup);
    cmd.arg("celery_bench.py")
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(600), cmd.output())
        .await
        .map_err(|_| BenchError::Timeout("celery_bench.py".into()))??;
    if !out.status.success() {
        return Err(BenchError::Setup(format!(
            "celery_bench.py {}: {}",
            args.join(" "),
            out.status
        )));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or("");
    Ok(serde_json::from_str(line)?)
}

/// Throughput of a shape: jobs/s from the first publish to the last finish, and that time.
pub struct Throughput {
    pub drain: f64,
    pub seconds: f64,
}

/// `n` × `demo.noop` sent by `system`'s own producer, with the worker consuming meanwhile: the
/// producer's msgs/s. Waits until the worker has drained them before returning.
pub async fn enqueue(
    programs: &Programs,
    system: System,
    setup: &Setup,
    queue: &str,
    probe: &mut Probe,
    n: usize,
) -> Result<f64> {
    let p = publish(programs, system, setup, queue, "demo.noop", n, 0).await?;
    probe.wait_drained(STALL).await?;
    Ok(p.enqueue_rate())
}

/// `n` × `demo.noop`, no results, published with the same (fast, batched) producer for both
/// systems so the worker alone is timed: drained when the broker holds nothing of the queue any
/// more.
pub async fn noop(
    programs: &Programs,
    setup: &Setup,
    queue: &str,
    probe: &mut Probe,
    n: usize,
) -> Result<Throughput> {
    let p = publish(programs, System::Celerity, setup, queue, "demo.noop", n, 0).await?;
    let done = probe.wait_drained(STALL).await?;
    Ok(Throughput {
        drain: rate(n, p.first, done),
        seconds: done
            .duration_since(p.first)
            .unwrap_or_default()
            .as_secs_f64(),
    })
}

/// A batch of jobs: `n` × `task`, `sleep_ms` being the argument of `demo.sleep_ms`.
#[derive(Debug, Clone, Copy)]
pub struct Job<'a> {
    pub task: &'a str,
    pub n: usize,
    pub sleep_ms: u64,
}

/// `n` × a task with a result: done at the latest `date_done` once every result is stored, and every
/// result is checked (`demo.add(i, i)` = 2·i, `demo.sleep_ms(ms)` = ms).
pub async fn with_results(
    programs: &Programs,
    setup: &Setup,
    queue: &str,
    results: &Results,
    job: Job<'_>,
) -> Result<Throughput> {
    let Job { task, n, sleep_ms } = job;
    let p = publish(programs, System::Celerity, setup, queue, task, n, sleep_ms).await?;
    let expect = |i: usize| match task {
        "demo.add" => json!(2 * i),
        "demo.sleep_ms" => json!(sleep_ms),
        _ => Value::Null,
    };
    let done = results.wait_all(&p.ids, expect, STALL).await?;
    Ok(Throughput {
        drain: rate(n, p.first, done),
        seconds: done
            .duration_since(p.first)
            .unwrap_or_default()
            .as_secs_f64(),
    })
}

/// `n` sequential `demo.add` calls, each publish → result in hand; milliseconds, sorted.
pub async fn latency(
    programs: &Programs,
    system: System,
    setup: &Setup,
    queue: &str,
    n: usize,
) -> Result<Vec<f64>> {
    let mut ms = match system {
        System::Celerity => {
            let client =
                Client::connect(&setup.celerity_broker_url(), setup.backend_url().as_deref())
                    .await?;
            let options = SendOptions::new().queue(queue);
            let mut ms = Vec::with_capacity(n);
            for i in 0..n {
                let t = Instant::now();
                let v = client
                    .call_task(
                        "demo.add",
                        vec![json!(i), json!(1)],
                        Map::new(),
                        &options,
                        Some(Duration::from_secs(30)),
                    )
                    .await?;
                ms.push(t.elapsed().as_secs_f64() * 1e3);
                if v != json!(i + 1) {
                    return Err(BenchError::Check(format!("demo.add({i}, 1) gave {v}")));
                }
            }
            let _ = client.close().await;
            ms
        }
        System::Celery => {
            let out = celery_script(programs, setup, &["latency", &n.to_string(), queue]).await?;
            out.get("ms")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_f64).collect())
                .unwrap_or_default()
        }
    };
    if ms.len() != n {
        return Err(BenchError::Setup(format!(
            "{} of {n} latency samples",
            ms.len()
        )));
    }
    ms.sort_by(f64::total_cmp);
    Ok(ms)
}

/// The `p` quantile of sorted samples.
pub fn quantile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Publishes one `demo.noop` with the Celerity client (Celery reads it as well) and waits until the
/// broker holds nothing of the queue: the worker is up and consuming.
pub async fn warm_up(setup: &Setup, queue: &str, probe: &mut Probe) -> Result<()> {
    probe.wait_consumer(Duration::from_secs(60)).await?;
    let client = Client::connect(&setup.celerity_broker_url(), None).await?;
    client
        .send_task(
            "demo.noop",
            vec![],
            Map::new(),
            &SendOptions::new().queue(queue),
        )
        .await?;
    let _ = client.close().await;
    probe.wait_drained(STALL).await?;
    Ok(())
}
