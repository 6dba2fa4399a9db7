//! How Celerity's cost grows with the work, on Redis and on RabbitMQ: worker processes (`-P 1, 2,
//! 4`, add with results), message size (noop jobs carrying 100 B – 1 MB, against the broker alone
//! moving values that size: redis-benchmark's LPUSH/RPOP, or a bare lapin client's confirmed publish
//! and drain) and queues consumed by one worker (1, 10, 100: jobs/s, sockets the worker holds, CPU
//! while idle). Each point starts a fresh worker on queues and a key prefix of its own; results go
//! to Redis on both brokers, as in the main rows.

use std::time::{Duration, Instant, SystemTime};

use chrono::Utc;
use serde_json::{json, Map};

use celerity_broker::protocol::TaskMessage;
use celerity_client::{Client, SendOptions};

use crate::error::{BenchError, Result};
use crate::probe::{self, Probe, Results};
use crate::procs::{self, Programs, Worker};
use crate::setup::{BrokerKind, Pool, Setup, System};
use crate::{rawamqp, rawredis, shapes};

/// No progress for this long fails a point.
const STALL: Duration = Duration::from_secs(60);
/// Bytes per publish round trip in the message-size runs.
const BATCH_BYTES: usize = 4 << 20;
/// Bytes of payload each message-size point moves at most (it all waits in Redis at once); and
/// the least jobs per point.
const POINT_BYTES: usize = 300 << 20;
const MIN_JOBS: usize = 50;
/// The same with --quick (tiny, to check the harness).
const QUICK_POINT_BYTES: usize = 10 << 20;
const QUICK_MIN_JOBS: usize = 10;

/// One worker-processes point.
#[derive(Debug, Clone)]
pub struct ProcessPoint {
    pub processes: usize,
    pub jobs_per_s: f64,
    pub idle_mib: f64,
}

/// One message-size point.
#[derive(Debug, Clone)]
pub struct SizePoint {
    pub bytes: usize,
    pub jobs: usize,
    pub jobs_per_s: f64,
    /// Jobs/s × payload size.
    pub mb_per_s: f64,
    /// The broker alone moving one value this size per job: on Redis one LPUSH and one RPOP
    /// (redis-benchmark `-P 16`, 50 clients), on RabbitMQ a confirmed persistent publish and a
    /// drain (bare lapin client); jobs/s = 1 ÷ (1/put + 1/take).
    pub raw_jobs_per_s: f64,
}

/// One queue-count point.
#[derive(Debug, Clone)]
pub struct QueuePoint {
    pub queues: usize,
    pub jobs_per_s: f64,
    /// Sockets open in the worker's processes (supervisor + children), idle.
    pub sockets: u64,
    /// CPU of the worker's processes while idle, % of one core.
    pub idle_cpu_pct: f64,
}

/// A worker of this module's runs, with its names.
struct Run {
    setup: Setup,
    queues: Vec<String>,
    worker: Worker,
}

impl Run {
    /// A Celerity worker on `broker` consuming `queues` fresh queues; ready once a job on the first
    /// came back.
    async fn start(
        programs: &Programs,
        broker: BrokerKind,
        queues: usize,
        results: bool,
    ) -> Result<Run> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let setup = Setup {
            broker,
            results,
            prefix: format!("bench-{}:", &id[..12]),
            pg_schema: None,
        };
        let names: Vec<String> = (0..queues.max(1))
            .map(|i| format!("bench.{}.{i}", &id[..12]))
            .collect();
        let worker = Worker::start(
            programs,
            System::Celerity,
            &setup,
            &names.join(","),
            Pool::TwoProcesses,
        )?;
        let run = Run {
            setup,
            queues: names,
            worker,
        };
        let mut probe = match Probe::connect(&run.setup, &run.queues[0]).await {
            Ok(p) => p,
            Err(e) => {
                run.end().await;
                return Err(e);
            }
        };
        let warm = shapes::warm_up(&run.setup, &run.queues[0], &mut probe).await;
        probe.close().await;
        if let Err(e) = warm {
            run.end().await;
            return Err(e);
        }
        Ok(run)
    }

    async fn end(self) {
        self.worker.stop(Duration::from_secs(20)).await;
        if self.setup.broker == BrokerKind::Amqp {
            for q in &self.queues {
                if let Ok(p) = Probe::connect(&self.setup, q).await {
                    p.cleanup().await;
                }
            }
        }
        if let Err(e) = probe::delete_prefix(&self.setup.prefix).await {
            eprintln!("bench: deleting {}: {e}", self.setup.prefix);
        }
    }
}

/// Add with results (`n` jobs) with `-P p` for each p, `-c` as the throughput rows.
pub async fn processes(
    programs: &Programs,
    broker: BrokerKind,
    n: usize,
    counts: &[usize],
) -> Result<Vec<ProcessPoint>> {
    let mut out = Vec::new();
    for &p in counts {
        let mut programs = programs.clone();
        programs.celerity_shape.processes = p;
        let run = Run::start(&programs, broker, 1, true).await?;
        let point = async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let idle_mib = procs::tree_rss_kib(run.worker.pid()) as f64 / 1024.0;
            let results = Results::connect(&run.setup).await?;
            let job = shapes::Job {
                task: "demo.add",
                n,
                sleep_ms: 0,
            };
            let t =
                shapes::with_results(&programs, &run.setup, &run.queues[0], &results, job).await;
            results.close().await;
            Ok::<_, BenchError>(ProcessPoint {
                processes: p,
                jobs_per_s: t?.drain,
                idle_mib,
            })
        }
        .await;
        run.end().await;
        let point = point?;
        eprintln!(
            "growth {} -P {p}: add+results {:.0} jobs/s, idle {:.1} MiB",
            broker.label(),
            point.jobs_per_s,
            point.idle_mib
        );
        out.push(point);
    }
    Ok(out)
}

/// Noop jobs whose one argument is a string of `bytes` bytes, no results: jobs/s from the first
/// publish until the queue is empty, beside the broker alone moving values that size.
pub async fn sizes(
    programs: &Programs,
    broker: BrokerKind,
    n: usize,
    sizes: &[usize],
    quick: bool,
) -> Result<Vec<SizePoint>> {
    let (most, least) = if quick {
        (QUICK_POINT_BYTES, QUICK_MIN_JOBS)
    } else {
        (POINT_BYTES, MIN_JOBS)
    };
    let mut out = Vec::new();
    for &bytes in sizes {
        let jobs = (most / bytes.max(1)).clamp(least, n.max(least));
        // RabbitMQ shows no unacked deliveries without its management plugin, so there a point
        // ends when every job's (null) result is stored; on Redis when queue and `unacked` are empty.
        let results = broker == BrokerKind::Amqp;
        let run = Run::start(programs, broker, 1, results).await?;
        let t = sized_point(&run, jobs, bytes).await;
        run.end().await;
        let jobs_per_s = t?;
        let raw_jobs_per_s = raw_sized(broker, jobs, bytes, most, least).await?;
        let point = SizePoint {
            bytes,
            jobs,
            jobs_per_s,
            mb_per_s: jobs_per_s * bytes as f64 / 1e6,
            raw_jobs_per_s,
        };
        eprintln!(
            "growth {} {bytes} B: {:.0} jobs/s ({:.1} MB/s), broker alone {:.0}/s",
            broker.label(),
            point.jobs_per_s,
            point.mb_per_s,
            point.raw_jobs_per_s
        );
        out.push(point);
    }
    Ok(out)
}

/// `jobs` noops of `bytes` bytes through the run's worker: jobs/s from the first publish until they
/// are finished (queue drained, or with results every result stored).
async fn sized_point(run: &Run, jobs: usize, bytes: usize) -> Result<f64> {
    let queue = &run.queues[0];
    if run.setup.results {
        let results = Results::connect(&run.setup).await?;
        let timed = async {
            let (first, ids) = publish_payloads(&run.setup, queue, jobs, bytes).await?;
            let done = results
                .wait_all(&ids, |_| serde_json::Value::Null, STALL)
                .await?;
            Ok::<_, BenchError>(shapes::rate(jobs, first, done))
        }
        .await;
        results.close().await;
        return timed;
    }
    let mut probe = Probe::connect(&run.setup, queue).await?;
    let timed = async {
        let (first, _) = publish_payloads(&run.setup, queue, jobs, bytes).await?;
        let done = probe.wait_drained(STALL).await?;
        Ok::<_, BenchError>(shapes::rate(jobs, first, done))
    }
    .await;
    probe.close().await;
    timed
}

/// The broker alone moving values of `bytes` bytes, one put and one take per job: jobs/s.
async fn raw_sized(
    broker: BrokerKind,
    jobs: usize,
    bytes: usize,
    most: usize,
    least: usize,
) -> Result<f64> {
    let (put, take) = match broker {
        BrokerKind::Redis => {
            let requests = (most / bytes.max(1)).clamp(least.max(100), 200_000);
            rawredis::lpush_rpop_sized(requests, 16, bytes).await?
        }
        BrokerKind::Amqp => {
            rawamqp::publish_drain_sized(crate::setup::AMQP_URL, jobs, bytes).await?
        }
    };
    Ok(if put > 0.0 && take > 0.0 {
        1.0 / (1.0 / put + 1.0 / take)
    } else {
        0.0
    })
}

/// Publishes `n` noops carrying `bytes` bytes each; returns when the first went out, and their ids.
async fn publish_payloads(
    setup: &Setup,
    queue: &str,
    n: usize,
    bytes: usize,
) -> Result<(SystemTime, Vec<String>)> {
    let client = Client::connect(&setup.celerity_broker_url(), None).await?;
    let options = SendOptions::new().queue(queue);
    let payload = json!("x".repeat(bytes));
    let per_batch = (BATCH_BYTES / bytes.max(1)).clamp(1, 1000);
    let first = SystemTime::now();
    let mut ids = Vec::with_capacity(n);
    let mut i = 0;
    while i < n {
        let end = (i + per_batch).min(n);
        let now = Utc::now();
        let batch: Vec<TaskMessage> = (i..end)
            .map(|_| options.build("demo.noop", vec![payload.clone()], Map::new(), now))
            .collect::<std::result::Result<_, _>>()?;
        ids.extend(batch.iter().map(|m| m.id().to_owned()));
        client.send_batch(&batch, queue).await?;
        i = end;
    }
    let _ = client.close().await;
    Ok((first, ids))
}

/// One worker consuming `k` queues for each k: idle sockets and CPU, then `n` add jobs with results
/// spread over the queues round-robin.
pub async fn queues(
    programs: &Programs,
    broker: BrokerKind,
    n: usize,
    counts: &[usize],
    quick: bool,
) -> Result<Vec<QueuePoint>> {
    let window = Duration::from_secs(if quick { 1 } else { 5 });
    let mut out = Vec::new();
    for &k in counts {
        let run = Run::start(programs, broker, k, true).await?;
        let point = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let sockets = tree_sockets(run.worker.pid());
            let idle_cpu_pct = idle_cpu(run.worker.pid(), window).await;
            let jobs_per_s = spread_adds(&run, n).await?;
            Ok::<_, BenchError>(QueuePoint {
                queues: k,
                jobs_per_s,
                sockets,
                idle_cpu_pct,
            })
        }
        .await;
        run.end().await;
        let point = point?;
        eprintln!(
            "growth {} {k} queues: {:.0} jobs/s, {} sockets, idle CPU {:.2}%",
            broker.label(),
            point.jobs_per_s,
            point.sockets,
            point.idle_cpu_pct
        );
        out.push(point);
    }
    Ok(out)
}

/// `n` × add(i, i) over the run's queues round-robin, every result checked; jobs/s to the last.
async fn spread_adds(run: &Run, n: usize) -> Result<f64> {
    let client = Client::connect(&run.setup.celerity_broker_url(), None).await?;
    let k = run.queues.len();
    let mut per_queue: Vec<Vec<TaskMessage>> = vec![Vec::new(); k];
    let mut ids = Vec::with_capacity(n);
    let now = Utc::now();
    for i in 0..n {
        let q = &run.queues[i % k];
        let m = SendOptions::new().queue(q.as_str()).build(
            "demo.add",
            vec![json!(i), json!(i)],
            Map::new(),
            now,
        )?;
        ids.push(m.id().to_owned());
        per_queue[i % k].push(m);
    }
    let results = Results::connect(&run.setup).await?;
    let first = SystemTime::now();
    for (q, batch) in run.queues.iter().zip(&per_queue) {
        for chunk in batch.chunks(1000) {
            client.send_batch(chunk, q).await?;
        }
    }
    let _ = client.close().await;
    let done = results.wait_all(&ids, |i| json!(2 * i), STALL).await;
    results.close().await;
    Ok(shapes::rate(n, first, done?))
}

/// Sockets among the open file descriptors of `pid` and its descendants.
fn tree_sockets(pid: u32) -> u64 {
    procs::tree(pid)
        .into_iter()
        .map(|p| {
            std::fs::read_dir(format!("/proc/{p}/fd")).map_or(0, |d| {
                d.flatten()
                    .filter(|e| {
                        std::fs::read_link(e.path())
                            .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
                    })
                    .count() as u64
            })
        })
        .sum()
}

/// CPU time (user + system) of `pid` and its descendants over `window`, % of one core.
async fn idle_cpu(pid: u32, window: Duration) -> f64 {
    let before = tree_cpu_ticks(pid);
    let t = Instant::now();
    tokio::time::sleep(window).await;
    let after = tree_cpu_ticks(pid);
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    after.saturating_sub(before) as f64 / hz / t.elapsed().as_secs_f64() * 100.0
}

fn tree_cpu_ticks(pid: u32) -> u64 {
    procs::tree(pid)
        .into_iter()
        .filter_map(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            let rest = &stat[stat.rfind(')')? + 1..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            // After the command: state is field 3, utime 14 and stime 15 (1-based, whole line).
            let utime: u64 = f.get(11)?.parse().ok()?;
            let stime: u64 = f.get(12)?.parse().ok()?;
            Some(utime + stime)
        })
        .sum()
}
