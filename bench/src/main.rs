//! `bench`: Celerity and Python Celery side by side on this machine's Redis and RabbitMQ.
//!
//! For each system it starts a worker (Celery: prefork -c 2 / threads -c 16 for the IO row;
//! Celerity: the release `celerity` binary, two processes / one process for the IO row), then runs
//! each shape `--runs` times against the running worker and prints a markdown table of medians,
//! min–max and the ratio Celerity ÷ Celery. See bench/README.md for the method.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};

mod postgres_rows;

use celerity_bench::error::{BenchError, Result};
use celerity_bench::probe::{self, Probe, Results};
use celerity_bench::procs::{self, Programs, Worker};
use celerity_bench::report::{self, Row};
use celerity_bench::setup::{self, BrokerKind, Pool, Setup, System};
use celerity_bench::{backlog, bullmq, ceiling, charts, growth, rawamqp, rawredis, rpcrow, shapes};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Only {
    Celery,
    Celerity,
    /// BullMQ (Node.js) alone, on Redis
    Bullmq,
}

/// The shapes that can be picked with `--shapes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Shape {
    /// noop throughput (enqueue and drain), no results
    Noop,
    /// add with results, and the memory rows (idle and under that load)
    Add,
    /// round-trip latency of sequential add calls
    Latency,
    /// sleep_ms(100) IO-bound
    Io,
    /// Celerity only, Redis: add with results, metrics off and on (`--metrics-addr`), interleaved
    MetricsAb,
    /// add with results on RabbitMQ with the rpc:// result backend (see `rpcrow`)
    Rpc,
    /// add with results stored in PostgreSQL (Celery's database backend), Redis broker
    AddPostgres,
    /// Celerity only, each broker: how cost grows with worker processes, message size and queues
    Growth,
    /// Celerity (and Celery's message size): --backlog-jobs jobs waiting (a million unless
    /// --quick), then drained; minutes per broker
    Backlog,
}

/// Celerity vs Python Celery, same machine, brokers and job shapes.
#[derive(Debug, Parser)]
#[command(name = "bench")]
struct Args {
    /// Tiny job counts and one run: checks the harness end to end (numbers mean nothing)
    #[arg(long)]
    quick: bool,
    /// Runs per row
    #[arg(long)]
    runs: Option<usize>,
    /// Jobs per throughput run (noop, add)
    #[arg(long)]
    jobs: Option<usize>,
    /// Jobs per throughput run for Celery (default: --jobs)
    #[arg(long)]
    celery_jobs: Option<usize>,
    /// sleep_ms(100) jobs for Celerity (one process)
    #[arg(long)]
    io_jobs: Option<usize>,
    /// sleep_ms(100) jobs for Celery (threads pool, 16 threads)
    #[arg(long)]
    celery_io_jobs: Option<usize>,
    /// Sequential add calls per latency run
    #[arg(long)]
    latency_calls: Option<usize>,
    /// The celerity binary (default: target/release/celerity of this workspace)
    #[arg(long)]
    celerity_bin: Option<PathBuf>,
    /// Python with Celery 5.7 (default: the venv of scripts/celery-venv.sh)
    #[arg(long)]
    python: Option<PathBuf>,
    /// Celerity worker processes for the throughput rows (0: one unsupervised process)
    #[arg(long, default_value_t = 2)]
    celerity_processes: usize,
    /// Celerity jobs at once per process for the throughput rows (above 64, so more than 128
    /// deliveries are in flight and Redis keeps kombu's `unacked_index` as a skiplist; see README)
    #[arg(long, default_value_t = 256)]
    celerity_concurrency: usize,
    /// Run one system only
    #[arg(long, value_enum)]
    only: Option<Only>,
    /// Brokers to run (default both)
    #[arg(long, value_delimiter = ',', default_values_t = vec!["redis".to_string(), "amqp".to_string()])]
    brokers: Vec<String>,
    /// Shapes to run (default all)
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = vec![Shape::Noop, Shape::Add, Shape::Latency, Shape::Io, Shape::Rpc, Shape::AddPostgres, Shape::Growth, Shape::Backlog])]
    shapes: Vec<Shape>,
    /// Leave BullMQ out (it needs node and npm; installed on first use under target/bullmq)
    #[arg(long)]
    skip_bullmq: bool,
    /// Leave out the Celerity rows with default worker flags (no -P / -c)
    #[arg(long)]
    skip_default_flags: bool,
    /// Skip the raw broker rows (redis-benchmark, and a bare lapin client on RabbitMQ)
    #[arg(long)]
    skip_raw: bool,
    /// Jobs waiting in the broker for the backlog shape (default 1,000,000; 2,000 with --quick)
    #[arg(long)]
    backlog_jobs: Option<usize>,
    /// Where the SVG pictures go (default: bench/charts; with --quick, target/bench-charts-quick)
    #[arg(long)]
    charts: Option<PathBuf>,
    /// Also write the table to this file
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Job counts and repetitions.
#[derive(Debug, Clone)]
struct Plan {
    shapes: Vec<Shape>,
    runs: usize,
    jobs: usize,
    celery_jobs: usize,
    io_jobs: usize,
    celery_io_jobs: usize,
    latency_calls: usize,
    raw_requests: usize,
}

impl Plan {
    fn from(args: &Args) -> Plan {
        let (runs, jobs, io, celery_io, lat, raw) = if args.quick {
            (1, 300, 500, 48, 20, 10_000)
        } else {
            (3, 20_000, 10_000, 1_000, 200, 200_000)
        };
        let jobs = args.jobs.unwrap_or(jobs);
        Plan {
            shapes: args.shapes.clone(),
            runs: args.runs.unwrap_or(runs).max(1),
            jobs,
            celery_jobs: args.celery_jobs.unwrap_or(jobs),
            io_jobs: args.io_jobs.unwrap_or(io),
            celery_io_jobs: args.celery_io_jobs.unwrap_or(celery_io),
            latency_calls: args.latency_calls.unwrap_or(lat),
            raw_requests: raw,
        }
    }

    fn has(&self, shape: Shape) -> bool {
        self.shapes.contains(&shape)
    }
}

/// The sleep of the IO-bound shape.
const SLEEP_MS: u64 = 100;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = Args::parse();
    match run(&args).await {
        Ok(table) => {
            print!("{table}");
        }
        Err(e) => {
            eprintln!("bench: {e}");
            std::process::exit(1);
        }
    }
}

async fn run(args: &Args) -> Result<String> {
    let plan = Plan::from(args);
    let celerity =
        procs::celerity_binary(args.celerity_bin.as_deref()).map_err(BenchError::Setup)?;
    let systems: Vec<System> = match args.only {
        Some(Only::Celery) => vec![System::Celery],
        Some(Only::Celerity) => vec![System::Celerity],
        Some(Only::Bullmq) => vec![],
        None => vec![System::Celery, System::Celerity],
    };
    let with_bullmq = match args.only {
        Some(Only::Bullmq) => true,
        Some(_) => false,
        None => !args.skip_bullmq,
    };
    let python = match &args.python {
        Some(p) => p.clone(),
        None if systems.contains(&System::Celery) => procs::celery_python()?,
        None => PathBuf::from("python3"),
    };
    let programs = Programs {
        celerity,
        python,
        bench_dir: PathBuf::from(env!("CARGO_MANIFEST_DIR")),
        celerity_shape: procs::CelerityShape {
            processes: args.celerity_processes,
            concurrency: args.celerity_concurrency,
        },
    };
    let mut brokers = Vec::new();
    for b in &args.brokers {
        brokers.push(match b.as_str() {
            "redis" => BrokerKind::Redis,
            "amqp" | "rabbitmq" => BrokerKind::Amqp,
            other => return Err(BenchError::Setup(format!("unknown broker {other}"))),
        });
    }

    let load_before = loadavg();
    let mut rows: Vec<Row> = Vec::new();
    let mut ceilings = ceiling::Ceilings::default();
    let mut latencies: Latencies = Vec::new();
    for &system in &systems {
        for &broker in &brokers {
            let (r, c, l) = (&mut rows, &mut ceilings, &mut latencies);
            throughput_rows(&programs, system, broker, &plan, r, c, l).await?;
            if system == System::Celerity && !args.skip_default_flags && plan.has(Shape::Add) {
                default_flag_rows(&programs, broker, &plan, &mut rows).await?;
            }
        }
        if brokers.contains(&BrokerKind::Redis) && plan.has(Shape::Io) {
            io_rows(&programs, system, &plan, &mut rows).await?;
        }
        if brokers.contains(&BrokerKind::Amqp) && plan.has(Shape::Rpc) {
            let n = match system {
                System::Celery => plan.celery_jobs,
                System::Celerity => plan.jobs,
            };
            let (samples, used) = rpcrow::run(&programs, system, n, plan.runs).await?;
            rpcrow::record(&mut rows, plan.jobs, system, samples, used);
        }
        if brokers.contains(&BrokerKind::Redis) && plan.has(Shape::AddPostgres) {
            let n = match system {
                System::Celery => plan.celery_jobs,
                System::Celerity => plan.jobs,
            };
            let jobs = (n, plan.jobs);
            postgres_rows::add_rows(&programs, system, plan.runs, jobs, &mut rows).await?;
        }
    }
    let bullmq_shapes = plan.has(Shape::Noop) || plan.has(Shape::Add) || plan.has(Shape::Latency);
    if with_bullmq && brokers.contains(&BrokerKind::Redis) && bullmq_shapes {
        bullmq_rows(&programs, &plan, &mut rows, &mut latencies).await?;
    }
    let mut grown = String::new();
    let celerity_runs = systems.contains(&System::Celerity);
    if plan.has(Shape::Growth) && celerity_runs {
        let dir = charts_dir(args);
        grown = growth_tables(&programs, &plan, &brokers, args.quick, &dir).await?;
    }
    if plan.has(Shape::Backlog) && celerity_runs {
        let jobs = args
            .backlog_jobs
            .unwrap_or(if args.quick { 2_000 } else { 1_000_000 });
        let celery = systems.contains(&System::Celery);
        grown.push_str(&backlog_table(&programs, &brokers, jobs, celery, &charts_dir(args)).await?);
    }
    let mut ab = String::new();
    if plan.has(Shape::MetricsAb) && brokers.contains(&BrokerKind::Redis) {
        ab = metrics_ab(&programs, &plan).await?;
    }
    let mut raw = String::new();
    if !args.skip_raw {
        if brokers.contains(&BrokerKind::Redis) {
            raw = raw_redis(&plan, &mut ceilings, &mut latencies).await?;
        }
        if brokers.contains(&BrokerKind::Amqp) {
            raw.push_str(&raw_amqp(&plan, &mut ceilings).await?);
        }
    }
    ceilings.apply(&mut rows);
    draw(&charts_dir(args), &rows, &latencies)?;
    let table = format!(
        "{}\n{}{}{}{}\n",
        machine(&plan, &load_before, &programs.celerity),
        if rows.is_empty() {
            String::new()
        } else {
            report::table(&rows)
        },
        ab,
        raw,
        grown
    );
    if let Some(path) = &args.out {
        std::fs::write(path, &table)?;
    }
    Ok(table)
}

/// Where the pictures go: `--charts`, else bench/charts (target/bench-charts-quick with --quick, so
/// that a quick run does not overwrite the committed ones).
fn charts_dir(args: &Args) -> PathBuf {
    args.charts.clone().unwrap_or_else(|| {
        let base = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        if args.quick {
            base.join("../target/bench-charts-quick")
        } else {
            base.join("charts")
        }
    })
}

/// How cost grows (Celerity, on each broker): worker processes, message size, queues; markdown
/// tables (a broker column in each) and a picture each (a line per broker).
async fn growth_tables(
    programs: &Programs,
    plan: &Plan,
    brokers: &[BrokerKind],
    quick: bool,
    dir: &std::path::Path,
) -> Result<String> {
    std::fs::create_dir_all(dir)?;
    let n = plan.jobs;
    let mut procs_points = Vec::new();
    let mut size_points = Vec::new();
    let mut queue_points = Vec::new();
    for &b in brokers {
        procs_points.push((b, growth::processes(programs, b, n, &[1, 2, 4]).await?));
    }
    for &b in brokers {
        let sizes = &[100, 10_000, 1_000_000];
        size_points.push((b, growth::sizes(programs, b, n, sizes, quick).await?));
    }
    for &b in brokers {
        queue_points.push((
            b,
            growth::queues(programs, b, n, &[1, 10, 100], quick).await?,
        ));
    }
    let mut out = format!(
        "\nHow cost grows (Celerity; one run per point, a fresh worker each; -c {}; results in Redis):\n\n\
         | broker | worker processes | add ×{n} with results, jobs/s | idle RSS MiB |\n|---|---|---|---|\n",
        programs.celerity_shape.concurrency
    );
    for (b, points) in &procs_points {
        for p in points {
            out.push_str(&format!(
                "| {} | -P {} | {} | {:.1} |\n",
                b.label(),
                p.processes,
                report::fmt_num(p.jobs_per_s),
                p.idle_mib
            ));
        }
    }
    out.push_str(
        "\n| broker | payload per job | jobs | noop jobs/s (-P 2) | MB/s | broker alone: one put + one \
         take of that size, jobs/s | MB/s | Celerity ÷ broker alone |\n|---|---|---|---|---|---|---|---|\n",
    );
    for (b, points) in &size_points {
        for p in points {
            let raw_mb = p.raw_jobs_per_s * p.bytes as f64 / 1e6;
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {:.2} |\n",
                b.label(),
                human_bytes(p.bytes),
                p.jobs,
                report::fmt_num(p.jobs_per_s),
                report::fmt_num(p.mb_per_s),
                report::fmt_num(p.raw_jobs_per_s),
                report::fmt_num(raw_mb),
                if p.raw_jobs_per_s > 0.0 {
                    p.jobs_per_s / p.raw_jobs_per_s
                } else {
                    0.0
                }
            ));
        }
    }
    out.push_str(
        "\n(Redis: no results, done when the queue and `unacked` are empty; broker alone = \
         redis-benchmark LPUSH and RPOP of values that size, -P 16, 50 clients. RabbitMQ: done when \
         every job's null result is in Redis, since RabbitMQ shows no unacked deliveries without its \
         management plugin; broker alone = a bare lapin client's confirmed persistent publish, then \
         drain, of messages that size.)\n",
    );
    out.push_str(
        "\n| broker | queues (one worker, -P 2) | add with results, jobs/s (spread round-robin) | \
         sockets open, idle | idle CPU, % of a core |\n|---|---|---|---|---|\n",
    );
    for (b, points) in &queue_points {
        for p in points {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {:.2} |\n",
                b.label(),
                p.queues,
                report::fmt_num(p.jobs_per_s),
                p.sockets,
                p.idle_cpu_pct
            ));
        }
    }
    let line = |name: String, points: Vec<(f64, f64)>| charts::Line { name, points };
    let per_broker = |label: &str, b: &BrokerKind| format!("{label}, {}", b.label());
    charts::curves(
        &dir.join("growth-processes.svg"),
        "add with results vs worker processes (2 cores)",
        "worker processes (-P)",
        "jobs/s",
        &procs_points
            .iter()
            .map(|(b, ps)| {
                let pts = ps.iter().map(|p| (p.processes as f64, p.jobs_per_s));
                line(per_broker("Celerity", b), pts.collect())
            })
            .collect::<Vec<_>>(),
        false,
    )?;
    let mut size_lines = Vec::new();
    for (b, ps) in &size_points {
        let mb = ps.iter().map(|p| (p.bytes as f64, p.mb_per_s));
        size_lines.push(line(per_broker("Celerity", b), mb.collect()));
        let raw = ps
            .iter()
            .map(|p| (p.bytes as f64, p.raw_jobs_per_s * p.bytes as f64 / 1e6));
        size_lines.push(line(format!("{} alone", b.label()), raw.collect()));
    }
    charts::curves(
        &dir.join("growth-message-size.svg"),
        "MB/s vs payload size",
        "payload bytes per job (log)",
        "MB/s",
        &size_lines,
        true,
    )?;
    charts::curves(
        &dir.join("growth-queues.svg"),
        "add with results vs queues consumed by one worker",
        "queues (log)",
        "jobs/s",
        &queue_points
            .iter()
            .map(|(b, ps)| {
                let pts = ps.iter().map(|p| (p.queues as f64, p.jobs_per_s));
                line(per_broker("Celerity", b), pts.collect())
            })
            .collect::<Vec<_>>(),
        true,
    )?;
    Ok(out)
}

/// The backlog shape on each broker, as a markdown table and a picture of the worker's RSS.
async fn backlog_table(
    programs: &Programs,
    brokers: &[BrokerKind],
    jobs: usize,
    celery: bool,
    dir: &std::path::Path,
) -> Result<String> {
    std::fs::create_dir_all(dir)?;
    let mut out = format!(
        "\nBacklog ({jobs} noop jobs waiting before a Celerity worker -P 2 -c 256 starts; RSS of \
         supervisor + children every 500 ms while it drains):\n\n\
         | broker | broker bytes per waiting job, Celerity ({jobs} jobs) | Celerity, 5,000 jobs | \
         Celery's producer, 5,000 jobs{} | worker RSS MiB first / max / last (from 2 s) | jobs/s, \
         worker start → empty |\n|---|---|---|---|---|---|\n",
        if celery { "" } else { " (not run)" }
    );
    let mut lines = Vec::new();
    for &broker in brokers {
        let b = backlog::run(programs, broker, jobs, celery).await?;
        let bytes = |v: Option<f64>| v.map_or("—".into(), |v| format!("{v:.0}"));
        eprintln!(
            "backlog {}: {} B/job, RSS {:.1}/{:.1}/{:.1} MiB, {:.0} jobs/s",
            broker.label(),
            bytes(b.bytes_per_job),
            b.rss_first,
            b.rss_max,
            b.rss_last,
            b.drain_jobs_per_s
        );
        out.push_str(&format!(
            "| {} | {} | {} | {} | {:.1} / {:.1} / {:.1} | {} |\n",
            broker.label(),
            bytes(b.bytes_per_job),
            bytes(b.sample_bytes_per_job),
            bytes(b.celery_bytes_per_job),
            b.rss_first,
            b.rss_max,
            b.rss_last,
            report::fmt_num(b.drain_jobs_per_s)
        ));
        lines.push(charts::Line {
            name: format!("Celerity, {}", broker.label()),
            points: b.rss_samples,
        });
    }
    charts::curves(
        &dir.join("growth-backlog-rss.svg"),
        &format!("worker RSS while draining {jobs} waiting jobs"),
        "seconds since the worker started",
        "RSS MiB (supervisor + children)",
        &lines,
        false,
    )?;
    Ok(out)
}

fn human_bytes(b: usize) -> String {
    if b >= 1_000_000 {
        format!("{} MB", b / 1_000_000)
    } else if b >= 1000 {
        format!("{} KB", b / 1000)
    } else {
        format!("{b} B")
    }
}

/// Every round-trip sample of each system and broker (all runs), for the CDF picture.
type Latencies = Vec<(String, Vec<f64>)>;

fn push_latencies(latencies: &mut Latencies, name: &str, ms: &[f64]) {
    match latencies.iter_mut().find(|(n, _)| n == name) {
        Some((_, v)) => v.extend_from_slice(ms),
        None => latencies.push((name.to_owned(), ms.to_vec())),
    }
}

/// The pictures of this run: jobs/s bars (with the broker alone) and the latency CDF.
fn draw(dir: &std::path::Path, rows: &[Row], latencies: &Latencies) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let med = |v: &[f64]| report::summary(v).map(|(m, _, _)| m);
    let mut bars = Vec::new();
    for r in rows {
        let group = match (r.metric.as_str(), r.setup.as_str()) {
            ("drain jobs/s", "Redis / Redis") if r.shape.starts_with("add ×") => {
                "Redis: add + results"
            }
            ("drain jobs/s", "RabbitMQ / Redis") if r.shape.starts_with("add ×") => {
                "RabbitMQ: add + results"
            }
            ("enqueue msgs/s", "Redis / none") => "Redis: enqueue",
            ("enqueue msgs/s", "RabbitMQ / none") => "RabbitMQ: enqueue",
            _ => continue,
        };
        let default = r.shape.contains("default worker flags");
        let mut push = |series: &str, v: Option<f64>| {
            if let Some(value) = v {
                bars.push(charts::Bar {
                    group: group.into(),
                    series: series.into(),
                    value,
                });
            }
        };
        if default {
            push("Celerity, default flags", med(&r.celerity));
            continue;
        }
        push("Celery 5.7", med(&r.celery));
        push("BullMQ", med(&r.bullmq));
        push("Celerity", med(&r.celerity));
        push("broker alone", r.ceiling.as_ref().map(|c| c.0));
    }
    // Groups in a fixed order, whatever order the rows came in.
    let order = [
        "Redis: add + results",
        "Redis: enqueue",
        "RabbitMQ: add + results",
        "RabbitMQ: enqueue",
    ];
    bars.sort_by_key(|b| order.iter().position(|o| *o == b.group));
    charts::bars(
        &dir.join("jobs-per-second.svg"),
        "jobs/s per system and broker (medians of one run)",
        "jobs/s",
        &bars,
    )?;
    charts::cdf(
        &dir.join("latency-cdf.svg"),
        "round trip of sequential add calls (all runs)",
        latencies,
    )?;
    eprintln!("bench: pictures in {}", dir.display());
    Ok(())
}

/// The row for (shape, setup, metric), created in first-seen order.
fn row<'a>(rows: &'a mut Vec<Row>, shape: &str, setup: &str, metric: &str) -> &'a mut Row {
    let at = rows
        .iter()
        .position(|r| r.shape == shape && r.setup == setup && r.metric == metric);
    let at = at.unwrap_or_else(|| {
        rows.push(Row::new(shape, setup, metric));
        rows.len() - 1
    });
    &mut rows[at]
}

fn samples(r: &mut Row, system: System) -> &mut Vec<f64> {
    match system {
        System::Celery => &mut r.celery,
        System::Celerity => &mut r.celerity,
    }
}

/// A started worker with its probe, queue and names; torn down by [`Session::end`].
struct Session {
    setup: Setup,
    queue: String,
    worker: Worker,
    probe: Probe,
}

impl Session {
    async fn start(
        programs: &Programs,
        system: System,
        broker: BrokerKind,
        results: bool,
        pool: Pool,
    ) -> Result<Session> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let setup = Setup {
            broker,
            results,
            prefix: format!("bench-{}:", &id[..12]),
            pg_schema: None,
        };
        Session::start_with(programs, system, setup, pool).await
    }

    /// [`Session::start`] for a prepared setup (the PostgreSQL rows).
    async fn start_with(
        programs: &Programs,
        system: System,
        setup: Setup,
        pool: Pool,
    ) -> Result<Session> {
        let queue = format!(
            "bench.{}",
            setup
                .prefix
                .trim_start_matches("bench-")
                .trim_end_matches(':')
        );
        let mut probe = Probe::connect(&setup, &queue).await?;
        let mut worker = Worker::start(programs, system, &setup, &queue, pool)?;
        let warm = shapes::warm_up(&setup, &queue, &mut probe).await;
        if let Err(e) = warm {
            // Leave nothing behind: the worker, the queue, the keys.
            let alive = worker.check_alive();
            worker.stop(Duration::from_secs(5)).await;
            probe.cleanup().await;
            let _ = probe::delete_prefix(&setup.prefix).await;
            alive?;
            return Err(e);
        }
        Ok(Session {
            setup,
            queue,
            worker,
            probe,
        })
    }

    async fn end(self) -> Result<()> {
        self.worker.stop(Duration::from_secs(20)).await;
        self.probe.cleanup().await;
        probe::delete_prefix(&self.setup.prefix).await
    }
}

/// noop (no results), add (results), latency and memory rows for one system and broker.
async fn throughput_rows(
    programs: &Programs,
    system: System,
    broker: BrokerKind,
    plan: &Plan,
    rows: &mut Vec<Row>,
    ceilings: &mut ceiling::Ceilings,
    latencies: &mut Latencies,
) -> Result<()> {
    let n = match system {
        System::Celery => plan.celery_jobs,
        System::Celerity => plan.jobs,
    };
    let note = if plan.celery_jobs != plan.jobs && system == System::Celery {
        format!("Celery N = {}", plan.celery_jobs)
    } else {
        String::new()
    };

    if plan.has(Shape::Noop) {
        noop_rows(programs, system, broker, plan, n, &note, rows).await?;
    }
    if !plan.has(Shape::Add) && !plan.has(Shape::Latency) {
        return Ok(());
    }

    // add with results, latency, memory.
    let s = Session::start(programs, system, broker, true, Pool::TwoProcesses).await?;
    let label = s.setup.label();
    let outcome = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let idle = procs::tree_rss_kib(s.worker.pid()) as f64 / 1024.0;
        let results = Results::connect(&s.setup).await?;
        let peak = Arc::new(AtomicU64::new(0));
        let sampling = Arc::new(AtomicBool::new(true));
        let sampler = {
            let (peak, sampling, pid) = (peak.clone(), sampling.clone(), s.worker.pid());
            tokio::spawn(async move {
                while sampling.load(Ordering::Relaxed) {
                    peak.fetch_max(procs::tree_rss_kib(pid), Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        };
        let mut loaded = Vec::new();
        let add_runs = if plan.has(Shape::Add) { plan.runs } else { 0 };
        let count_commands = system == System::Celerity && broker == BrokerKind::Redis;
        let before = if count_commands && add_runs > 0 {
            Some(ceiling::commandstats().await?)
        } else {
            None
        };
        for run in 0..add_runs {
            peak.store(0, Ordering::Relaxed);
            let t = shapes::with_results(
                programs,
                &s.setup,
                &s.queue,
                &results,
                shapes::Job {
                    task: "demo.add",
                    n,
                    sleep_ms: 0,
                },
            )
            .await;
            let t = t?;
            loaded.push(peak.load(Ordering::Relaxed) as f64 / 1024.0);
            eprintln!(
                "{system:?} {label} add run {}: drain {:.0}/s ({:.2} s)",
                run + 1,
                t.drain,
                t.seconds
            );
            let shape = format!("add ×{}, results checked", plan.jobs);
            let r = row(rows, &shape, &label, "drain jobs/s");
            samples(r, system).push(t.drain);
            if !note.is_empty() {
                r.note = note.clone();
            }
        }
        if let Some(before) = before {
            let after = ceiling::commandstats().await?;
            ceilings.redis_commands_per_job =
                ceiling::commands_per_job(&before, &after, n * add_runs);
        }
        sampling.store(false, Ordering::Relaxed);
        let _ = sampler.await;
        results.close().await;
        let latency_runs = if plan.has(Shape::Latency) {
            plan.runs
        } else {
            0
        };
        for run in 0..latency_runs {
            let ms =
                shapes::latency(programs, system, &s.setup, &s.queue, plan.latency_calls).await?;
            let (p50, p99) = (shapes::quantile(&ms, 0.5), shapes::quantile(&ms, 0.99));
            eprintln!(
                "{system:?} {label} latency run {}: p50 {p50:.2} ms, p99 {p99:.2} ms",
                run + 1
            );
            let shape = format!("round trip, {} sequential add", plan.latency_calls);
            push_latencies(latencies, &format!("{system:?} {}", broker.label()), &ms);
            samples(row(rows, &shape, &label, "p50 ms"), system).push(p50);
            samples(row(rows, &shape, &label, "p99 ms"), system).push(p99);
        }
        let shape = "memory (RSS, worker + children)";
        if plan.has(Shape::Add) {
            samples(row(rows, shape, &label, "idle MiB"), system).push(idle);
        }
        for l in loaded {
            samples(row(rows, shape, &label, "under add load, peak MiB"), system).push(l);
        }
        Ok::<_, BenchError>(())
    }
    .await;
    s.end().await?;
    outcome
}

/// noop throughput (enqueue and drain), no result backend, for one system and broker.
async fn noop_rows(
    programs: &Programs,
    system: System,
    broker: BrokerKind,
    plan: &Plan,
    n: usize,
    note: &str,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let mut s = Session::start(programs, system, broker, false, Pool::TwoProcesses).await?;
    let label = s.setup.label();
    let outcome = async {
        for run in 0..plan.runs {
            let shape = format!("noop ×{}", plan.jobs);
            let e = shapes::enqueue(programs, system, &s.setup, &s.queue, &mut s.probe, n).await?;
            let t = shapes::noop(programs, &s.setup, &s.queue, &mut s.probe, n).await?;
            eprintln!(
                "{system:?} {label} noop run {}: enqueue {e:.0}/s, drain {:.0}/s ({:.2} s)",
                run + 1,
                t.drain,
                t.seconds
            );
            samples(row(rows, &shape, &label, "enqueue msgs/s"), system).push(e);
            let r = row(rows, &shape, &label, "drain jobs/s");
            samples(r, system).push(t.drain);
            if !note.is_empty() {
                r.note = note.to_owned();
            }
        }
        Ok::<_, BenchError>(())
    }
    .await;
    s.end().await?;
    outcome
}

/// sleep_ms(100) × N on Redis with results: Celery's threads pool (16) vs one Celerity process.
async fn io_rows(
    programs: &Programs,
    system: System,
    plan: &Plan,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let n = match system {
        System::Celery => plan.celery_io_jobs,
        System::Celerity => plan.io_jobs,
    };
    let s = Session::start(programs, system, BrokerKind::Redis, true, Pool::Io).await?;
    let label = s.setup.label();
    let outcome = async {
        let results = Results::connect(&s.setup).await?;
        for run in 0..plan.runs {
            let t = shapes::with_results(
                programs,
                &s.setup,
                &s.queue,
                &results,
                shapes::Job {
                    task: "demo.sleep_ms",
                    n,
                    sleep_ms: SLEEP_MS,
                },
            )
            .await?;
            eprintln!(
                "{system:?} {label} sleep_ms run {}: {n} jobs in {:.2} s ({:.0}/s)",
                run + 1,
                t.seconds,
                t.drain
            );
            let shape = format!("sleep_ms({SLEEP_MS}) IO-bound");
            let r = row(rows, &shape, &label, "jobs/s");
            samples(r, system).push(t.drain);
            r.note = format!(
                "Celery {} jobs, threads -c 16; Celerity {} jobs, 1 process",
                plan.celery_io_jobs, plan.io_jobs
            );
            let r = row(rows, &shape, &label, "wall s");
            samples(r, system).push(t.seconds);
            r.note = "each its own N".into();
            r.comparable = plan.celery_io_jobs == plan.io_jobs;
        }
        results.close().await;
        Ok::<_, BenchError>(())
    }
    .await;
    s.end().await?;
    outcome
}

/// Celerity as a user starts it (`celerity worker`, no `-P` / `-c`): add with results and round
/// trips, beside the tuned rows.
async fn default_flag_rows(
    programs: &Programs,
    broker: BrokerKind,
    plan: &Plan,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let s = Session::start(programs, System::Celerity, broker, true, Pool::Default).await?;
    let label = s.setup.label();
    let outcome = async {
        let results = Results::connect(&s.setup).await?;
        for run in 0..plan.runs {
            let job = shapes::Job {
                task: "demo.add",
                n: plan.jobs,
                sleep_ms: 0,
            };
            let t = shapes::with_results(programs, &s.setup, &s.queue, &results, job).await;
            let t = t?;
            eprintln!(
                "Celerity default flags {label} add run {}: drain {:.0}/s",
                run + 1,
                t.drain
            );
            let shape = format!("add ×{}, results checked, default worker flags", plan.jobs);
            samples(row(rows, &shape, &label, "drain jobs/s"), System::Celerity).push(t.drain);
        }
        results.close().await;
        let calls = plan.latency_calls;
        for _ in 0..if plan.has(Shape::Latency) {
            plan.runs
        } else {
            0
        } {
            let ms = shapes::latency(programs, System::Celerity, &s.setup, &s.queue, calls).await?;
            let shape = format!("round trip, {calls} sequential add, default worker flags");
            let (p50, p99) = (shapes::quantile(&ms, 0.5), shapes::quantile(&ms, 0.99));
            samples(row(rows, &shape, &label, "p50 ms"), System::Celerity).push(p50);
            samples(row(rows, &shape, &label, "p99 ms"), System::Celerity).push(p99);
        }
        Ok::<_, BenchError>(())
    }
    .await;
    s.end().await?;
    outcome
}

/// BullMQ on Redis, with as many Node worker processes and jobs at once as Celerity's throughput
/// rows: `addBulk` enqueue and drain with every return value checked, round trips (`add` +
/// `waitUntilFinished`), idle and peak RSS of the worker processes.
async fn bullmq_rows(
    programs: &Programs,
    plan: &Plan,
    rows: &mut Vec<Row>,
    latencies: &mut Latencies,
) -> Result<()> {
    let dir = bullmq::install().await?;
    let shape = programs.celerity_shape;
    let bull = bullmq::Bull::start(&dir, shape.processes.max(1), shape.concurrency).await?;
    let label = "Redis / Redis";
    let outcome = async {
        bull.latency(1).await?; // warm-up: one job through
        tokio::time::sleep(Duration::from_secs(2)).await;
        let idle = bull.rss_kib() as f64 / 1024.0;
        let peak = Arc::new(AtomicU64::new(0));
        let sampling = Arc::new(AtomicBool::new(true));
        let sampler = {
            let (peak, sampling, pids) = (peak.clone(), sampling.clone(), bull.pids());
            tokio::spawn(async move {
                while sampling.load(Ordering::Relaxed) {
                    let rss = pids.iter().map(|&p| procs::tree_rss_kib(p)).sum();
                    peak.fetch_max(rss, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        };
        let mut loaded = Vec::new();
        let add_runs = if plan.has(Shape::Add) || plan.has(Shape::Noop) {
            plan.runs
        } else {
            0
        };
        for run in 0..add_runs {
            peak.store(0, Ordering::Relaxed);
            let a = bull.add(plan.jobs).await?;
            loaded.push(peak.load(Ordering::Relaxed) as f64 / 1024.0);
            eprintln!(
                "BullMQ add run {}: enqueue {:.0}/s, drain {:.0}/s ({:.2} s)",
                run + 1,
                a.enqueue,
                a.drain,
                a.seconds
            );
            if plan.has(Shape::Noop) {
                let r = row(
                    rows,
                    &format!("noop ×{}", plan.jobs),
                    "Redis / none",
                    "enqueue msgs/s",
                );
                r.bullmq.push(a.enqueue);
            }
            if plan.has(Shape::Add) {
                let shape = format!("add ×{}, results checked", plan.jobs);
                row(rows, &shape, label, "drain jobs/s")
                    .bullmq
                    .push(a.drain);
            }
        }
        sampling.store(false, Ordering::Relaxed);
        let _ = sampler.await;
        for run in 0..if plan.has(Shape::Latency) {
            plan.runs
        } else {
            0
        } {
            let ms = bull.latency(plan.latency_calls).await?;
            let (p50, p99) = (shapes::quantile(&ms, 0.5), shapes::quantile(&ms, 0.99));
            eprintln!(
                "BullMQ latency run {}: p50 {p50:.2} ms, p99 {p99:.2} ms",
                run + 1
            );
            let shape = format!("round trip, {} sequential add", plan.latency_calls);
            push_latencies(latencies, "BullMQ Redis", &ms);
            row(rows, &shape, label, "p50 ms").bullmq.push(p50);
            row(rows, &shape, label, "p99 ms").bullmq.push(p99);
        }
        let shape = "memory (RSS, worker + children)";
        if plan.has(Shape::Add) {
            row(rows, shape, label, "idle MiB").bullmq.push(idle);
            row(rows, shape, label, "under add load, peak MiB")
                .bullmq
                .extend(loaded);
        }
        Ok::<_, BenchError>(())
    }
    .await;
    bull.end().await;
    outcome
}

/// Celerity's add-with-results drain on Redis with metrics off and on, interleaved (off, on, off,
/// on, …; a fresh worker each run, so both see the same drift of this VM), and each worker's idle
/// RSS; as a markdown table.
async fn metrics_ab(programs: &Programs, plan: &Plan) -> Result<String> {
    let (mut drain, mut idle) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
    for run in 0..plan.runs {
        for (i, pool) in [Pool::TwoProcesses, Pool::TwoProcessesWithMetrics]
            .into_iter()
            .enumerate()
        {
            let s =
                Session::start(programs, System::Celerity, BrokerKind::Redis, true, pool).await?;
            let outcome = async {
                tokio::time::sleep(Duration::from_secs(2)).await;
                let rss = procs::tree_rss_kib(s.worker.pid()) as f64 / 1024.0;
                let results = Results::connect(&s.setup).await?;
                let job = shapes::Job {
                    task: "demo.add",
                    n: plan.jobs,
                    sleep_ms: 0,
                };
                let t = shapes::with_results(programs, &s.setup, &s.queue, &results, job).await;
                results.close().await;
                Ok::<_, BenchError>((t?, rss))
            }
            .await;
            s.end().await?;
            let (t, rss) = outcome?;
            eprintln!(
                "metrics {} run {}: drain {:.0}/s, idle {rss:.1} MiB",
                ["off", "on"][i],
                run + 1,
                t.drain
            );
            drain[i].push(t.drain);
            idle[i].push(rss);
        }
    }
    let cell = |v: &[f64], places: usize| match report::summary(v) {
        Some((med, lo, hi)) if places > 0 => format!("{med:.1} ({lo:.1}–{hi:.1})"),
        Some((med, lo, hi)) => format!(
            "{} ({}–{})",
            report::fmt_num(med),
            report::fmt_num(lo),
            report::fmt_num(hi)
        ),
        None => "—".into(),
    };
    let ratio = match (report::summary(&drain[1]), report::summary(&drain[0])) {
        (Some((on, _, _)), Some((off, _, _))) if off > 0.0 => format!("{:.3}", on / off),
        _ => "—".into(),
    };
    Ok(format!(
        "\nMetrics A/B (Celerity, Redis / Redis, add ×{} with results checked, -P {} -c {}; off and \
         on interleaved, a fresh worker each run):\n\n\
         | metrics | drain jobs/s | idle RSS MiB (worker + children) |\n|---|---|---|\n\
         | off | {} | {} |\n| on (`--metrics-addr`) | {} | {} |\n\nOn ÷ off (drain medians): {ratio}.\n",
        plan.jobs,
        programs.celerity_shape.processes,
        programs.celerity_shape.concurrency,
        cell(&drain[0], 0),
        cell(&idle[0], 1),
        cell(&drain[1], 0),
        cell(&idle[1], 1),
    ))
}

/// redis-benchmark LPUSH/RPOP, unpipelined and 16 deep, as a markdown table.
async fn raw_redis(
    plan: &Plan,
    ceilings: &mut ceiling::Ceilings,
    latencies: &mut Latencies,
) -> Result<String> {
    let mut out = String::from(
        "\nRaw Redis on this machine (redis-benchmark, 50 clients):\n\n\
         | pipeline | LPUSH ops/s | RPOP ops/s |\n|---|---|---|\n",
    );
    for p in [1, 16] {
        let (push, pop) = rawredis::lpush_rpop(plan.raw_requests, p).await?;
        if p == 16 {
            ceilings.redis_pipelined = Some((push, pop));
        }
        out.push_str(&format!(
            "| {} | {} | {} |\n",
            if p == 1 {
                "none".to_string()
            } else {
                format!("-P {p}")
            },
            report::fmt_num(push),
            report::fmt_num(pop)
        ));
    }
    let (mut p50, mut p99) = (Vec::new(), Vec::new());
    for _ in 0..plan.runs {
        let ms = rawredis::relay_latency(plan.latency_calls).await?;
        push_latencies(latencies, "Redis floor (no task queue)", &ms);
        p50.push(shapes::quantile(&ms, 0.50));
        p99.push(shapes::quantile(&ms, 0.99));
    }
    if let (Some((p50, lo50, hi50)), Some((p99, lo99, hi99))) =
        (report::summary(&p50), report::summary(&p99))
    {
        ceilings.redis_floor = Some((p50, p99));
        out.push_str(&format!(
            "\nRound-trip floor through Redis ({} sequential: LPUSH → a relay thread's BLPOP → its \
             PUBLISH → the caller's subscription): p50 {p50:.2} ms ({lo50:.2}–{hi50:.2}), p99 \
             {p99:.2} ms ({lo99:.2}–{hi99:.2}).\n",
            plan.latency_calls
        ));
    }
    Ok(out)
}

/// A bare lapin client on RabbitMQ, job-shaped persistent messages (see `rawamqp`), as markdown.
async fn raw_amqp(plan: &Plan, ceilings: &mut ceiling::Ceilings) -> Result<String> {
    let (mut publish, mut drain, mut both) = (Vec::new(), Vec::new(), Vec::new());
    let (mut p50, mut p99) = (Vec::new(), Vec::new());
    for _ in 0..plan.runs {
        let raw = rawamqp::run(setup::AMQP_URL, plan.jobs, plan.latency_calls).await?;
        publish.push(raw.publish_per_s);
        drain.push(raw.drain_per_s);
        both.push(raw.both_per_s);
        p50.push(shapes::quantile(&raw.latency_ms, 0.50));
        p99.push(shapes::quantile(&raw.latency_ms, 0.99));
    }
    let med = |v: &[f64]| report::summary(v).map_or(0.0, |(m, _, _)| m);
    if !publish.is_empty() {
        ceilings.amqp_rates = Some((med(&publish), med(&drain), med(&both)));
        ceilings.amqp_one_way = Some((med(&p50), med(&p99)));
    }
    let cell = |v: &[f64], ms: bool| match report::summary(v) {
        Some((med, lo, hi)) if ms => format!("{med:.2} ({lo:.2}–{hi:.2})"),
        Some((med, lo, hi)) => format!(
            "{} ({}–{})",
            report::fmt_num(med),
            report::fmt_num(lo),
            report::fmt_num(hi)
        ),
        None => "—".into(),
    };
    Ok(format!(
        "\nRaw RabbitMQ on this machine (one bare lapin client, {} persistent job-shaped messages; \
         confirms; prefetch 512, one ack per 64; latency: publish → delivery on a second connection, \
         {} sequential):\n\n\
         | publish msgs/s | drain msgs/s | both at once msgs/s | one-way p50 ms | one-way p99 ms |\n\
         |---|---|---|---|---|\n\
         | {} | {} | {} | {} | {} |\n",
        plan.jobs,
        plan.latency_calls,
        cell(&publish, false),
        cell(&drain, false),
        cell(&both, false),
        cell(&p50, true),
        cell(&p99, true)
    ))
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// What machine and run the numbers came from, and how much of the `celerity` binary's symbol
/// order (`scripts/symbol-order --check`) its link could use: a stale order shows as memory.
fn machine(plan: &Plan, load_before: &str, celerity: &std::path::Path) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/symbol-order");
    let order = std::process::Command::new(script)
        .arg("--check")
        .arg(celerity)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "not checked (scripts/symbol-order --check failed)".into());
    format!(
        "Machine: {cores} cores, {cpu}; load average before {load_before}, after {}.\n\
         Symbol order: {order}.\n\
         Runs per row: {}; medians with (min–max).\n",
        loadavg(),
        plan.runs
    )
}
