//! `celerity demo`: producer, worker and result lookups in one process (memory://, Redis or
//! RabbitMQ), every result checked, then the rate and the latency percentiles.

use std::time::{Duration, Instant};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Map};

use celerity_broker::protocol::TaskMessage;
use celerity_broker::{connect_broker, State};
use celerity_client::{Client, SendOptions};
use celerity_worker::{run, Registry, Shutdown, WorkerConfig, WorkerError};

use super::connection::ConnectionArgs;

/// The queue `celerity demo` uses.
pub const DEMO_QUEUE: &str = "celerity.demo";

/// `celerity demo`.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// How many `demo.add` jobs to run
    #[arg(long, default_value_t = 10_000)]
    pub jobs: u64,
    /// Jobs run at once by the in-process worker
    #[arg(short = 'c', long, default_value_t = 64)]
    pub concurrency: usize,
}

/// What `celerity demo` measured.
#[derive(Debug, Clone)]
pub struct DemoReport {
    pub jobs: u64,
    pub failures: u64,
    pub seconds: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// Producer + worker + result lookups in one process: sends `jobs` × `demo.add(i, i)`, waits for
/// every result, checks each value, and reports the rate and latency percentiles.
pub async fn run_demo(args: &DemoArgs, conn: &ConnectionArgs) -> Result<DemoReport, WorkerError> {
    // One fixed queue, emptied before and after, so repeated demos leave nothing behind.
    let queue = DEMO_QUEUE.to_owned();
    let broker = connect_broker(&conn.broker).await?;
    // Declared first: purging a queue RabbitMQ does not have yet closes the channel.
    broker.declare_queue(&queue).await?;
    broker.purge(&queue).await?;
    let Some(backend) = conn.worker_backend().await? else {
        return Err(WorkerError::Config(
            "the demo reads results: give --backend redis://… with an AMQP broker".into(),
        ));
    };
    let client = Client::new(broker.clone(), Some(backend.clone()));
    let mut registry = Registry::new();
    celerity_worker::demo::register(&mut registry);
    let shutdown = Shutdown::default();
    let config = WorkerConfig {
        queues: vec![queue.clone()],
        concurrency: args.concurrency.max(1),
        ..WorkerConfig::default()
    };
    let worker = tokio::spawn(run(
        registry,
        broker.clone(),
        Some(backend.clone()),
        config,
        shutdown.clone(),
    ));

    let bar = ProgressBar::new(args.jobs);
    if let Ok(style) = ProgressStyle::with_template("{msg:8} {bar:40} {pos}/{len} {per_sec}") {
        bar.set_style(style);
    }
    bar.set_message("sending");
    let started = Instant::now();
    let options = SendOptions::new().queue(queue.clone());
    let mut sent: Vec<(String, i64, chrono::DateTime<chrono::Utc>)> =
        Vec::with_capacity(args.jobs as usize);
    let mut i = 0i64;
    while (sent.len() as u64) < args.jobs {
        let n = (args.jobs - sent.len() as u64).min(1000);
        let now = chrono::Utc::now();
        let batch: Vec<TaskMessage> = (0..n)
            .map(|_| {
                i += 1;
                options.build("demo.add", vec![json!(i), json!(i)], Map::new(), now)
            })
            .collect::<std::result::Result<_, _>>()?;
        let t = chrono::Utc::now();
        client.send_batch(&batch, &queue).await?;
        sent.extend(
            batch
                .iter()
                .zip((i - n as i64 + 1)..)
                .map(|(m, k)| (m.id().to_owned(), k, t)),
        );
        bar.set_position(sent.len() as u64);
    }
    bar.set_message("results");
    bar.set_position(0);
    let mut latencies = Vec::with_capacity(sent.len());
    let mut failures = 0;
    let mut checked = 0u64;
    for chunk in sent.chunks(1000) {
        let ids: Vec<String> = chunk.iter().map(|(id, _, _)| id.clone()).collect();
        let metas = backend.get_many(&ids).await?;
        for ((id, k, sent_at), meta) in chunk.iter().zip(metas) {
            let meta = if meta.status.is_ready() {
                meta
            } else {
                backend.wait(id, Some(Duration::from_secs(60))).await?
            };
            // Send → result stored, on the same clock.
            let done = meta.date_done.unwrap_or_else(chrono::Utc::now);
            latencies.push((done - *sent_at).to_std().unwrap_or_default());
            if meta.status != State::Success || meta.result != json!(2 * k) {
                failures += 1;
            }
        }
        checked += chunk.len() as u64;
        bar.set_position(checked);
    }
    let seconds = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    shutdown.warm.cancel();
    if let Ok(Err(e)) = worker.await {
        tracing::warn!(error = %e, "demo worker stopped with an error");
    }
    let _ = broker.purge(&queue).await;
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * p).round() as usize)
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    Ok(DemoReport {
        jobs: args.jobs,
        failures,
        seconds,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
    })
}
