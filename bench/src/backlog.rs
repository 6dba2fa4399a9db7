//! A big backlog (`--shapes backlog`; a million jobs by default, minutes per broker): N noop jobs
//! wait in the broker before a Celerity worker (`-P 2 -c 256`) starts; the broker's memory per
//! waiting job (and, like for like, per job of a smaller sample from Celerity's producer and from
//! Celery's own), then the worker's RSS sampled while it drains them: with a bounded prefetch it
//! stays flat.

use std::time::{Duration, Instant, SystemTime};

use chrono::Utc;
use serde_json::Map;

use celerity_broker::protocol::TaskMessage;
use celerity_client::{Client, SendOptions};

use crate::error::{BenchError, Result};
use crate::probe::{self, Probe};
use crate::procs::{self, Programs, Worker};
use crate::setup::{BrokerKind, Pool, Setup, System, REDIS_URL};
use crate::shapes;

/// Celery's producer is ~1k msgs/s: its memory per job comes from this many.
const CELERY_SAMPLE: usize = 5_000;

/// What a backlog run found.
#[derive(Debug, Clone)]
pub struct Backlog {
    pub broker: BrokerKind,
    pub jobs: usize,
    /// Broker memory per waiting job: Celerity's producer's messages (all `jobs`, then a
    /// [`CELERY_SAMPLE`] of them on a queue of their own), then Celery's (the same sample size).
    pub bytes_per_job: Option<f64>,
    pub sample_bytes_per_job: Option<f64>,
    pub celery_bytes_per_job: Option<f64>,
    /// Worker RSS (supervisor + children) while draining, sampled every 500 ms from 2 s after its
    /// start: first, max, last (MiB).
    pub rss_first: f64,
    pub rss_max: f64,
    pub rss_last: f64,
    /// Jobs ÷ (worker started → nothing left), start-up included.
    pub drain_jobs_per_s: f64,
    /// (seconds since the worker started, RSS MiB), for the picture.
    pub rss_samples: Vec<(f64, f64)>,
}

/// The backlog run on `broker` with `jobs` waiting jobs; Celery's messages measured too when
/// `celery` (the venv's Python is in `programs`).
pub async fn run(
    programs: &Programs,
    broker: BrokerKind,
    jobs: usize,
    celery: bool,
) -> Result<Backlog> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let setup = Setup {
        broker,
        results: false,
        prefix: format!("bench-{}:", &id[..12]),
        pg_schema: None,
    };
    let (queue, sample_queue, celery_queue) = (
        format!("bench.{}", &id[..12]),
        format!("bench.{}.sample", &id[..12]),
        format!("bench.{}.celery", &id[..12]),
    );
    let mut probe = Probe::connect(&setup, &queue).await?;
    let sample_probe = Probe::connect(&setup, &sample_queue).await?;
    let celery_probe = Probe::connect(&setup, &celery_queue).await?;
    let names = Names {
        setup: &setup,
        queue: &queue,
        sample_queue: &sample_queue,
        celery_queue: celery.then_some(celery_queue.as_str()),
    };
    let outcome = measure(programs, &names, &mut probe, jobs).await;
    probe.cleanup().await;
    sample_probe.cleanup().await;
    celery_probe.cleanup().await;
    probe::delete_prefix(&setup.prefix).await?;
    outcome
}

/// A backlog run's setup and queues.
struct Names<'a> {
    setup: &'a Setup,
    queue: &'a str,
    /// Celerity's sample of [`CELERY_SAMPLE`] jobs, left waiting (no worker consumes it).
    sample_queue: &'a str,
    celery_queue: Option<&'a str>,
}

async fn measure(
    programs: &Programs,
    names: &Names<'_>,
    probe: &mut Probe,
    jobs: usize,
) -> Result<Backlog> {
    let (setup, queue) = (names.setup, names.queue);
    if setup.broker == BrokerKind::Amqp {
        // RabbitMQ drops what is published to a queue nobody declared: let a worker declare them.
        let both = format!("{queue},{}", names.sample_queue);
        let w = Worker::start(programs, System::Celerity, setup, &both, Pool::TwoProcesses)?;
        let seen = probe.wait_consumer(Duration::from_secs(60)).await;
        w.stop(Duration::from_secs(20)).await;
        seen?;
    }
    publish_noops(setup, queue, jobs).await?;
    let bytes_per_job = broker_bytes(setup, queue).await?.map(|b| b / jobs as f64);
    publish_noops(setup, names.sample_queue, CELERY_SAMPLE).await?;
    let sample_bytes_per_job = broker_bytes(setup, names.sample_queue)
        .await?
        .map(|b| b / CELERY_SAMPLE as f64);
    let celery_bytes_per_job = if let Some(celery_queue) = names.celery_queue {
        let p = shapes::publish(
            programs,
            System::Celery,
            setup,
            celery_queue,
            "demo.noop",
            CELERY_SAMPLE,
            0,
        )
        .await;
        match p {
            Ok(_) => broker_bytes(setup, celery_queue)
                .await?
                .map(|b| b / CELERY_SAMPLE as f64),
            Err(e) => {
                eprintln!("bench: backlog: Celery's messages not measured: {e}");
                None
            }
        }
    } else {
        None
    };
    let worker = Worker::start(programs, System::Celerity, setup, queue, Pool::TwoProcesses)?;
    let started = Instant::now();
    let first_publish = SystemTime::now();
    let mut samples = Vec::new();
    let drained = async {
        let mut last_seen = (u64::MAX, Instant::now());
        loop {
            samples.push((
                started.elapsed().as_secs_f64(),
                procs::tree_rss_kib(worker.pid()) as f64 / 1024.0,
            ));
            let left = probe.outstanding().await?;
            if left == 0 {
                return Ok::<_, BenchError>(SystemTime::now());
            }
            if left != last_seen.0 {
                last_seen = (left, Instant::now());
            } else if last_seen.1.elapsed() > Duration::from_secs(60) {
                return Err(BenchError::Timeout(format!("backlog stuck at {left}")));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    .await;
    worker.stop(Duration::from_secs(20)).await;
    let done = drained?;
    // From 2 s on: before that the processes are still starting.
    let rss: Vec<f64> = samples.iter().filter(|s| s.0 >= 2.0).map(|s| s.1).collect();
    Ok(Backlog {
        broker: setup.broker,
        jobs,
        bytes_per_job,
        sample_bytes_per_job,
        celery_bytes_per_job,
        rss_first: rss.first().copied().unwrap_or(0.0),
        rss_max: rss.iter().copied().fold(0.0, f64::max),
        rss_last: rss.last().copied().unwrap_or(0.0),
        drain_jobs_per_s: shapes::rate(jobs, first_publish, done),
        rss_samples: samples,
    })
}

/// `n` × demo.noop with the Celerity client, 1,000 a round trip.
async fn publish_noops(setup: &Setup, queue: &str, n: usize) -> Result<()> {
    let client = Client::connect(&setup.celerity_broker_url(), None).await?;
    let options = SendOptions::new().queue(queue);
    let mut i = 0;
    while i < n {
        let end = (i + 1000).min(n);
        let now = Utc::now();
        let batch: Vec<TaskMessage> = (i..end)
            .map(|_| options.build("demo.noop", vec![], Map::new(), now))
            .collect::<std::result::Result<_, _>>()?;
        client.send_batch(&batch, queue).await?;
        i = end;
    }
    let _ = client.close().await;
    Ok(())
}

/// Bytes the broker holds for `queue`: Redis `MEMORY USAGE` of the list (every element counted);
/// RabbitMQ the queue's `memory` in `rabbitmqctl list_queues` (its process; persistent messages
/// may also be on disk).
async fn broker_bytes(setup: &Setup, queue: &str) -> Result<Option<f64>> {
    match setup.broker {
        BrokerKind::Redis => {
            let client = redis::Client::open(REDIS_URL)?;
            let mut c = client.get_multiplexed_async_connection().await?;
            let bytes: Option<u64> = redis::cmd("MEMORY")
                .arg("USAGE")
                .arg(format!("{}{queue}", setup.prefix))
                .arg("SAMPLES")
                .arg(0)
                .query_async(&mut c)
                .await?;
            Ok(bytes.map(|b| b as f64))
        }
        BrokerKind::Amqp => {
            let out = tokio::process::Command::new("rabbitmqctl")
                .args(["list_queues", "-q", "--no-table-headers", "name", "memory"])
                .output()
                .await
                .map_err(|e| BenchError::Setup(format!("rabbitmqctl: {e}")))?;
            let text = String::from_utf8_lossy(&out.stdout);
            Ok(text.lines().find_map(|l| {
                let mut f = l.split_whitespace();
                (f.next()? == queue).then_some(())?;
                f.next()?.parse::<f64>().ok()
            }))
        }
    }
}
