//! The soak: a long run at a steady, moderate load that watches every process for leaks. Per broker
//! it starts a `celerity worker -P 2` pool (Redis broker + Redis results, or RabbitMQ broker + Redis
//! results) on its own queue and key prefix, runs a [`load::Load`] against it, and every `interval`
//! samples the RSS and open file descriptors of the supervisor, each child (a restarted child shows
//! up as a new row) and the harness itself, printing a line per pool as it goes. At the end it
//! prints a summary per process with the least-squares slopes over the second half of the run
//! (after warm-up), and the job counts; everything it made (processes, queues, keys) is removed,
//! also when stopped early. See bench/README.md "Soak".

pub mod load;
pub mod sample;

use std::fs::File;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::{BenchError, Result};
use crate::probe::{self, Probe};
use crate::procs::{self, CelerityShape, Programs, Worker};
use crate::setup::{BrokerKind, Pool, Setup, System};
use load::{Load, Stats};
use sample::{Role, Series};

/// What to run.
#[derive(Debug, Clone)]
pub struct Config {
    pub celerity: PathBuf,
    pub brokers: Vec<BrokerKind>,
    pub duration: Duration,
    pub interval: Duration,
    /// Jobs per second sent to each pool.
    pub rate: f64,
    /// Jobs at once per worker process.
    pub concurrency: usize,
    /// The drain gives up when no result has come for this long.
    pub drain_stall: Duration,
}

/// How a soak ended.
#[derive(Debug)]
pub struct Outcome {
    /// The final counts per pool.
    pub stats: Vec<(String, Stats)>,
    /// A pool's supervisor exited during the run.
    pub pool_died: bool,
    /// Stopped by a signal before its time.
    pub interrupted: bool,
}

impl Outcome {
    /// No job lost, no result wrong, every pool up to the end.
    pub fn passed(&self) -> bool {
        !self.pool_died && self.stats.iter().all(|(_, s)| s.lost == 0 && s.wrong == 0)
    }
}

/// One broker's worker pool and its load.
struct PoolRun {
    name: String,
    setup: Setup,
    queue: String,
    worker: Option<Worker>,
    log: PathBuf,
    stats: Arc<Mutex<Stats>>,
    load: Option<JoinHandle<Result<Stats>>>,
    /// The supervisor and every child seen, in order of appearance.
    series: Vec<Series>,
}

/// Runs the soak until its duration is over or `stop` turns true (`hurry` cuts the drain short).
pub async fn run(
    config: &Config,
    stop: watch::Receiver<bool>,
    hurry: watch::Receiver<bool>,
) -> Result<Outcome> {
    let programs = Programs {
        celerity: config.celerity.clone(),
        python: PathBuf::from("python3"),
        bench_dir: PathBuf::from(env!("CARGO_MANIFEST_DIR")),
        celerity_shape: CelerityShape {
            processes: 2,
            concurrency: config.concurrency,
        },
    };
    let mut pools: Vec<PoolRun> = Vec::new();
    let outcome = soak(config, &programs, &mut pools, stop, hurry).await;
    for pool in pools {
        cleanup(pool).await;
    }
    outcome
}

async fn soak(
    config: &Config,
    programs: &Programs,
    pools: &mut Vec<PoolRun>,
    mut stop: watch::Receiver<bool>,
    hurry: watch::Receiver<bool>,
) -> Result<Outcome> {
    let (load_stop_tx, load_stop) = watch::channel(false);
    for &broker in &config.brokers {
        if *stop.borrow() {
            break;
        }
        pools.push(start_pool(programs, broker).await?);
    }
    // Every pool is up: the loads begin together.
    for pool in pools.iter_mut() {
        let load = Load::new(
            pool.setup.clone(),
            pool.queue.clone(),
            config.rate,
            config.drain_stall,
        );
        pool.stats = load.stats();
        pool.load = Some(tokio::spawn(load.run(load_stop.clone(), hurry.clone())));
    }
    let mut harness = Series::new("-", Role::Harness, std::process::id());
    println!(
        "soak: {} min, {} jobs/s per pool, sampling every {} s; cells are RSS KiB / open fds; \
         worker logs: {}",
        config.duration.as_secs_f64() / 60.0,
        config.rate,
        config.interval.as_secs(),
        pools
            .iter()
            .map(|p| p.log.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );

    let start = Instant::now();
    let mut pool_died = false;
    let mut ticks = tokio::time::interval(config.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            break;
        }
        let t = start.elapsed().as_secs_f64();
        harness.sample(t);
        for pool in pools.iter_mut() {
            if !sample_pool(pool, t) {
                eprintln!("soak: the {} pool's supervisor has exited", pool.name);
                pool_died = true;
            }
        }
        print_line(pools, &harness, t);
        if pool_died || start.elapsed() >= config.duration {
            break;
        }
    }
    let interrupted = *stop.borrow();
    let run_secs = start.elapsed().as_secs_f64();

    // Stop sending; each load drains (the pools still run).
    let _ = load_stop_tx.send(true);
    if !interrupted {
        eprintln!(
            "soak: draining (up to {:?} without progress)",
            config.drain_stall
        );
    }
    let mut stats = Vec::new();
    for pool in pools.iter_mut() {
        let Some(handle) = pool.load.take() else {
            continue;
        };
        let final_stats = handle
            .await
            .map_err(|e| BenchError::Setup(format!("the {} load task: {e}", pool.name)))??;
        stats.push((pool.name.clone(), final_stats));
    }
    print_summary(pools, &harness, run_secs, &stats);
    Ok(Outcome {
        stats,
        pool_died,
        interrupted,
    })
}

/// Starts a `-P 2` pool on `broker` with its own queue and prefix, its log in a file, and waits
/// until it consumes.
async fn start_pool(programs: &Programs, broker: BrokerKind) -> Result<PoolRun> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let setup = Setup {
        broker,
        results: true,
        prefix: format!("soak-{}:", &id[..12]),
        pg_schema: None,
    };
    let queue = format!("soak.{}", &id[..12]);
    let name = match broker {
        BrokerKind::Redis => "redis",
        BrokerKind::Amqp => "amqp",
    };
    let log = std::env::temp_dir().join(format!("celerity-soak-{}-{name}.log", &id[..12]));
    let file = File::create(&log)?;
    let worker = Worker::start_logged(
        programs,
        System::Celerity,
        &setup,
        &queue,
        Pool::TwoProcesses,
        Stdio::from(file),
    )?;
    let mut pool = PoolRun {
        name: name.to_owned(),
        series: vec![Series::new(name, Role::Supervisor, worker.pid())],
        setup,
        queue,
        worker: Some(worker),
        log,
        stats: Arc::default(),
        load: None,
    };
    let ready = async {
        let mut probe = Probe::connect(&pool.setup, &pool.queue).await?;
        let waited = probe.wait_consumer(Duration::from_secs(30)).await;
        probe.close().await;
        waited
    }
    .await;
    if let Err(e) = ready {
        cleanup(pool).await;
        return Err(e);
    }
    // The children, once the supervisor has started them.
    let deadline = Instant::now() + Duration::from_secs(10);
    while procs::children(pool.series[0].pid).len() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if let Some(w) = pool.worker.as_mut() {
        if let Err(e) = w.check_alive() {
            cleanup(pool).await;
            return Err(e);
        }
    }
    Ok(pool)
}

/// Samples the supervisor and its current children (new ones get a row); false if the supervisor
/// has gone.
fn sample_pool(pool: &mut PoolRun, t: f64) -> bool {
    let alive = pool
        .worker
        .as_mut()
        .is_some_and(|w| w.check_alive().is_ok());
    if !alive {
        return false;
    }
    let sup = pool.series[0].pid;
    pool.series[0].sample(t);
    for child in procs::children(sup) {
        let at = pool.series.iter().position(|s| s.pid == child);
        let at = at.unwrap_or_else(|| {
            pool.series
                .push(Series::new(&pool.name, Role::Child, child));
            pool.series.len() - 1
        });
        pool.series[at].sample(t);
    }
    true
}

/// One line per pool: the processes alive now, then the job counts.
fn print_line(pools: &[PoolRun], harness: &Series, t: f64) {
    for pool in pools {
        let sup = pool.series[0].pid;
        let live = procs::children(sup);
        let mut cells = vec![format!("sup {}", pool.series[0].cell())];
        for s in pool.series.iter().skip(1).filter(|s| live.contains(&s.pid)) {
            cells.push(format!("{} {}", s.pid, s.cell()));
        }
        let restarts = pool.series.len().saturating_sub(3);
        let s = pool.stats.lock().map(|s| s.clone()).unwrap_or_default();
        println!(
            "{:>6.1} min  {:<5} {}  | sent {} ok {} (failed {} retried {}) pending {} late {} \
             wrong {} send-err {} restarts {}  | harness {}",
            t / 60.0,
            pool.name,
            cells.join("  "),
            s.sent,
            s.ok,
            s.failed,
            s.retried,
            s.pending,
            s.late,
            s.wrong,
            s.send_errors,
            restarts,
            harness.cell()
        );
    }
}

/// The per-process table (slopes over the second half) and the job counts.
fn print_summary(pools: &[PoolRun], harness: &Series, run_secs: f64, stats: &[(String, Stats)]) {
    let from = run_secs / 2.0;
    println!(
        "\nSummary: {:.1} min; slopes are least squares over the samples from {:.1} min on \
         (the second half, after warm-up).\n",
        run_secs / 60.0,
        from / 60.0
    );
    let mut table = String::from(sample::SUMMARY_HEADER);
    for pool in pools {
        for s in &pool.series {
            table.push_str(&sample::summary_row(s, from));
        }
    }
    table.push_str(&sample::summary_row(harness, from));
    println!("{table}");
    println!(
        "| pool | sent | results right | of which failed on purpose | of which retried | wrong | \
         lost | send errors | read errors | worker log (warnings / panics) |\n\
         |---|---|---|---|---|---|---|---|---|---|"
    );
    for (name, s) in stats {
        let log = pools
            .iter()
            .find(|p| &p.name == name)
            .map(|p| log_counts(&p.log))
            .unwrap_or_default();
        println!(
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {log} |",
            s.sent, s.ok, s.failed, s.retried, s.wrong, s.lost, s.send_errors, s.read_errors
        );
        for w in &s.wrong_examples {
            println!("  wrong: {w}");
        }
    }
}

/// `lines / panics` of a worker log.
fn log_counts(path: &std::path::Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => format!(
            "{} lines / {} panics",
            text.lines().count(),
            text.lines().filter(|l| l.contains("panicked")).count()
        ),
        Err(_) => "unreadable".into(),
    }
}

/// Stops the pool (warm, then killed) and deletes its queue, exchange and keys.
async fn cleanup(mut pool: PoolRun) {
    if let Some(load) = pool.load.take() {
        load.abort();
    }
    if let Some(worker) = pool.worker.take() {
        worker.stop(Duration::from_secs(20)).await;
    }
    match Probe::connect(&pool.setup, &pool.queue).await {
        Ok(probe) => probe.cleanup().await,
        Err(e) => eprintln!("soak: could not delete queue {}: {e}", pool.queue),
    }
    if let Err(e) = probe::delete_prefix(&pool.setup.prefix).await {
        eprintln!("soak: could not delete keys {}*: {e}", pool.setup.prefix);
    }
}
