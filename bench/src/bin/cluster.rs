//! `cluster-bench`: throughput of `redis+cluster://` on a 3-master / 3-replica Redis Cluster started
//! here (127.0.0.1, ports 17150–17155, bus 27150–27155, data in a temp dir removed at the end), with
//! one queue and with several queues (which spread over the masters).
//!
//! Each row publishes `--jobs` `demo.add` jobs (spread evenly over the row's queues), then starts one
//! `celerity worker` (release build) consuming every queue with results on the cluster, and times
//! from its start until every result is stored.
//!
//! ```sh
//! cargo build --release -p celerity -p celerity-bench
//! target/release/cluster-bench --jobs 20000 --queues 1,4
//! ```

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::json;

use celerity_broker::{connect_backend, connect_broker, State};
use celerity_client::{Client, SendOptions};

#[derive(Parser, Debug)]
#[command(about = "Throughput of redis+cluster:// with one and several queues")]
struct Args {
    /// Jobs per row.
    #[arg(long, default_value_t = 20_000)]
    jobs: usize,
    /// Queue counts, one row each.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1, 4])]
    queues: Vec<usize>,
    /// Worker processes (`-P`).
    #[arg(long, default_value_t = 2)]
    processes: usize,
    /// Jobs at once per process (`-c`).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// The celerity binary (default: target/release/celerity of this workspace).
    #[arg(long)]
    celerity_bin: Option<PathBuf>,
}

/// The servers of the cluster; killed (and the dir removed) on drop.
struct Cluster {
    nodes: Vec<Child>,
    dir: PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            let _ = n.kill();
            let _ = n.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const PORTS: std::ops::Range<u16> = 17150..17156;

fn cli(port: u16, args: &[&str]) -> String {
    Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn wait_until(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) -> Result<(), String> {
    let start = Instant::now();
    while !ok() {
        if start.elapsed() > limit {
            return Err(format!("{what}: not within {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn start_cluster() -> Result<Cluster, String> {
    let dir = std::env::temp_dir().join(format!("celerity-cluster-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let mut cluster = Cluster {
        nodes: Vec::new(),
        dir,
    };
    for port in PORTS {
        let node_dir = cluster.dir.join(port.to_string());
        std::fs::create_dir_all(&node_dir).map_err(|e| e.to_string())?;
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&node_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("redis-server: {e}"))?;
        cluster.nodes.push(child);
    }
    for port in PORTS {
        wait_until("redis-server up", Duration::from_secs(10), || {
            cli(port, &["PING"]).trim() == "PONG"
        })?;
    }
    let addrs: Vec<String> = PORTS.map(|p| format!("127.0.0.1:{p}")).collect();
    let out = Command::new("redis-cli")
        .arg("--cluster")
        .arg("create")
        .args(&addrs)
        .args(["--cluster-replicas", "1", "--cluster-yes"])
        .output()
        .map_err(|e| format!("redis-cli: {e}"))?;
    if !out.status.success() {
        return Err(format!("cluster create failed: {out:?}"));
    }
    wait_until(
        "cluster ok and replicas synced",
        Duration::from_secs(30),
        || {
            cli(PORTS.start, &["CLUSTER", "INFO"]).contains("cluster_state:ok")
                && PORTS.clone().all(|p| {
                    let r = cli(p, &["INFO", "replication"]);
                    r.contains("role:master") || r.contains("master_link_status:up")
                })
        },
    )?;
    Ok(cluster)
}

/// One row: jobs/s from the worker's start until every result is stored.
async fn row(args: &Args, exe: &PathBuf, url: &str, queues: usize) -> Result<f64, String> {
    let names: Vec<String> = (0..queues)
        .map(|i| format!("bench-{}-{i}", uuid::Uuid::new_v4().simple()))
        .collect();
    let broker = connect_broker(url).await.map_err(|e| e.to_string())?;
    let backend = connect_backend(url).await.map_err(|e| e.to_string())?;
    let client = Client::new(broker.clone(), Some(backend.clone()));
    let mut ids = Vec::with_capacity(args.jobs);
    let mut last_of_each = Vec::new();
    for (qi, q) in names.iter().enumerate() {
        let options = SendOptions::new().queue(q);
        let share = args.jobs / queues + usize::from(qi < args.jobs % queues);
        let batch: Vec<_> = (0..share)
            .map(|i| {
                options
                    .build(
                        "demo.add",
                        vec![json!(i), json!(1)],
                        Default::default(),
                        chrono::Utc::now(),
                    )
                    .map_err(|e| e.to_string())
            })
            .collect::<Result<_, _>>()?;
        ids.extend(batch.iter().map(|m| m.id().to_owned()));
        last_of_each.extend(batch.iter().rev().take(20).map(|m| m.id().to_owned()));
        client
            .send_batch(&batch, q)
            .await
            .map_err(|e| e.to_string())?;
    }
    let start = Instant::now();
    let mut worker = Command::new(exe)
        .args([
            "--broker",
            url,
            "--backend",
            url,
            "worker",
            "-Q",
            &names.join(","),
        ])
        .args([
            "-P",
            &args.processes.to_string(),
            "-c",
            &args.concurrency.to_string(),
        ])
        .env("CELERITY_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("{}: {e}", exe.display()))?;
    // Cheap probe first (the last jobs of each queue, taken last), then a full check.
    let probes: Vec<String> = last_of_each.clone();
    let mut pending = ids;
    let outcome = loop {
        if start.elapsed() > Duration::from_secs(600) {
            break Err(format!("{} jobs unfinished after 600 s", pending.len()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        if !all_done(&*backend, &probes).await {
            continue;
        }
        let mut still = Vec::new();
        for chunk in pending.chunks(2000) {
            if let Ok(metas) = backend.get_many(chunk).await {
                still.extend(
                    metas
                        .into_iter()
                        .filter(|m| m.status != State::Success)
                        .map(|m| m.task_id),
                );
            } else {
                still.extend(chunk.iter().cloned());
            }
        }
        pending = still;
        if pending.is_empty() {
            break Ok(args.jobs as f64 / start.elapsed().as_secs_f64());
        }
    };
    let _ = worker.kill();
    let _ = worker.wait();
    for q in &names {
        let _ = broker.purge(q).await;
    }
    outcome
}

/// True when every task in `ids` has a stored SUCCESS.
async fn all_done(backend: &dyn celerity_broker::ResultBackend, ids: &[String]) -> bool {
    backend
        .get_many(ids)
        .await
        .is_ok_and(|m| m.iter().all(|m| m.status == State::Success))
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let exe = match celerity_bench::procs::celerity_binary(args.celerity_bin.as_deref()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let cluster = match start_cluster() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cannot start the cluster: {e}");
            std::process::exit(2);
        }
    };
    let nodes: Vec<String> = PORTS.take(3).map(|p| format!("127.0.0.1:{p}")).collect();
    let url = format!("redis+cluster://{}/", nodes.join(","));
    println!("| queues | jobs | worker | jobs/s |\n|---|---|---|---|");
    for &queues in &args.queues {
        match row(&args, &exe, &url, queues.max(1)).await {
            Ok(rate) => println!(
                "| {queues} | {} | -P {} -c {} | {rate:.0} |",
                args.jobs, args.processes, args.concurrency
            ),
            Err(e) => println!("| {queues} | {} | — | failed: {e} |", args.jobs),
        }
    }
    drop(cluster);
}
