//! The fault campaign with real processes (issue 16's suite): a `celerity worker -P 2` pool on
//! Redis and on RabbitMQ (results on Redis) while the test breaks things.
//!
//! - `kill`: SIGKILL of random pool children and of the supervisor at random moments while a batch
//!   drains; every job ends with exactly one stored SUCCESS holding its value, the orphans of a
//!   killed supervisor end by themselves, and the jobs run twice stay within what was in flight.
//! - `restart`: the broker (a private `redis-server` or RabbitMQ node) restarted twice while a
//!   producer sends in a loop and the pool drains; every send that returned `Ok` has its result,
//!   every other send returned an error that says what failed.
//! - `netcut`: the pool, a producer and a result listener reach the broker and the backend only
//!   through proxies the test cuts (black hole, reset, a black hole that strands the open
//!   connections); 0 lost, no send hangs, nobody left deaf.
//! - `postgres_kill`: SIGKILL of the workers of a pool whose results go to PostgreSQL; one row per job.
//! - `beat`: two `celerity beat` processes while their broker (private `redis-server` or RabbitMQ
//!   node) is crashed and restarted; no tick twice, ticks missing only while it was down.
//!
//! How runs are counted: the pool logs at `info`, into one file shared by the supervisor and its
//! children (their stderr is the supervisor's, inherited, opened for append, so each log line is one
//! `write` and lines of different processes never mix). A worker logs `: succeeded id=<task id>` right
//! after the handler returned, before the result is stored and the job acked, so every run of a
//! handler that got as far as finishing is one such line, even in a process SIGKILLed a moment
//! later; a redelivered job found already finished is logged as `already finished` and not counted.
//! A job's duplicates are its `succeeded` lines minus one.
//!
//! The CI variants run about 2,000 jobs with 10 kills per broker. `CELERITY_LONG_FAULTS=1` runs the
//! long variants instead (10,000 jobs, more kills) and prints a table:
//!
//! ```sh
//! CELERITY_LONG_FAULTS=1 cargo test -p celerity --test faults -- --nocapture --test-threads 1
//! ```

mod beat;
mod kill;
mod netcut;
mod postgres_kill;
mod restart;
mod sentinel;

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use celerity_broker::{ResultBackend, State};
use celerity_testsupport::{celerity_command, ChildGuard};
use serde_json::Value;

/// True when the long variants are asked for (`CELERITY_LONG_FAULTS=1`).
fn long_run() -> bool {
    std::env::var("CELERITY_LONG_FAULTS").is_ok_and(|v| v == "1")
}

/// A small xorshift generator: the test's random moments and victims, reproducible from its seed
/// (`CELERITY_FAULTS_SEED`, else the clock; printed).
struct Rng(u64);

impl Rng {
    fn new(what: &str) -> Rng {
        let seed = std::env::var("CELERITY_FAULTS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            });
        eprintln!("{what}: seed {seed} (CELERITY_FAULTS_SEED)");
        Rng(seed | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in `lo..hi` (`hi > lo`).
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}

/// A running `celerity worker -P <processes>` supervisor, its log (and its children's) appended to
/// `log`; SIGKILLed with its children on drop.
struct Pool {
    supervisor: ChildGuard,
    /// False once the supervisor was killed on purpose: its children are left to end by themselves.
    kill_children: bool,
}

impl Pool {
    fn start(
        broker: &str,
        backend: &str,
        queue: &str,
        processes: usize,
        concurrency: usize,
        log: &Path,
    ) -> Pool {
        Pool::start_with(broker, backend, queue, processes, concurrency, log, &[])
    }

    /// As [`Pool::start`], with `extra` worker flags (e.g. `-n NAME@%h`).
    fn start_with(
        broker: &str,
        backend: &str,
        queue: &str,
        processes: usize,
        concurrency: usize,
        log: &Path,
        extra: &[&str],
    ) -> Pool {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open the pool's log file");
        let mut cmd = celerity_command(env!("CARGO_BIN_EXE_celerity"));
        cmd.args([
            "--broker",
            broker,
            "--backend",
            backend,
            "worker",
            "-Q",
            queue,
        ])
        .args(["-P", &processes.to_string(), "-c", &concurrency.to_string()])
        .args(extra)
        .env("CELERITY_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::from(file));
        Pool {
            supervisor: ChildGuard::spawn(&mut cmd, "celerity worker"),
            kill_children: true,
        }
    }

    fn pid(&self) -> i32 {
        self.supervisor.id() as i32
    }

    /// The supervisor's children now.
    fn children(&self) -> Vec<i32> {
        children_of(self.pid())
    }

    /// Waits (at most 30 s) until it has `n` children; returns them.
    fn wait_for_children(&self, n: usize) -> Vec<i32> {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let c = self.children();
            if c.len() >= n || Instant::now() > until {
                return c;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILLs the supervisor alone (its children are left to die by themselves) and reaps it;
    /// returns the children it had.
    fn kill_supervisor(mut self) -> Vec<i32> {
        let orphans = self.children();
        self.kill_children = false;
        self.supervisor.kill();
        orphans
    }

    /// SIGTERM, then waits (at most 60 s) for the warm shutdown; true if it exited 0.
    fn stop(mut self) -> bool {
        signal(self.pid(), libc::SIGTERM);
        let until = Instant::now() + Duration::from_secs(60);
        while Instant::now() < until {
            if let Ok(Some(status)) = self.supervisor.child().try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        if !self.kill_children {
            return;
        }
        for pid in self.children() {
            signal(pid, libc::SIGKILL);
        }
    }
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) with a pid and a signal number; no memory is shared.
    unsafe { libc::kill(pid, sig) };
}

/// The children of process `pid` (`pgrep -P`).
fn children_of(pid: i32) -> Vec<i32> {
    let Ok(out) = Command::new("pgrep")
        .arg("-P")
        .arg(pid.to_string())
        .output()
    else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// True while `pid` is a running (not zombie) `celerity` process.
fn alive_celerity(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "<pid> (<comm>) <state> …": the comm may hold spaces, the state follows its last ')'.
    let Some((head, tail)) = stat.rsplit_once(')') else {
        return false;
    };
    let state = tail.trim_start().chars().next();
    head.contains("(celerity") && !matches!(state, Some('Z' | 'X'))
}

/// The children of killed supervisors; any still running when this drops (the test failed) is
/// SIGKILLed, so a failing run leaves no worker behind.
#[derive(Default)]
struct Orphans(Vec<i32>);

impl Drop for Orphans {
    fn drop(&mut self) {
        for pid in &self.0 {
            if alive_celerity(*pid) {
                signal(*pid, libc::SIGKILL);
            }
        }
    }
}

/// The orphans in `pids` still running after `patience`.
fn surviving(pids: &[i32], patience: Duration) -> Vec<i32> {
    let until = Instant::now() + patience;
    loop {
        let alive: Vec<i32> = pids
            .iter()
            .copied()
            .filter(|p| alive_celerity(*p))
            .collect();
        if alive.is_empty() || Instant::now() > until {
            return alive;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What the pool's log says about each task id (see the module doc).
#[derive(Default)]
struct LogCounts {
    /// Runs of its handler that got to the end.
    runs: HashMap<String, usize>,
    /// Deliveries of it that a worker received (a redelivery after a kill counts again).
    received: HashMap<String, usize>,
    /// Redeliveries found already finished (not run again).
    skipped: usize,
}

impl LogCounts {
    fn read(log: &Path) -> LogCounts {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let mut counts = LogCounts::default();
        for line in text.lines() {
            let line = strip_ansi(line);
            if line.contains(": already finished; not running it again") {
                counts.skipped += 1;
                continue;
            }
            // The message right after the target (`…::finish: succeeded id=…`): other lines say
            // "succeeded" too ("storing a result succeeded").
            let map = if line.contains(": succeeded id=") {
                &mut counts.runs
            } else if line.contains(": received id=") {
                &mut counts.received
            } else {
                continue;
            };
            if let Some(id) = field(&line, "id") {
                *map.entry(id).or_insert(0) += 1;
            }
        }
        counts
    }

    /// Runs beyond the first, over the jobs in `ids`.
    fn duplicates<'a>(&self, ids: impl Iterator<Item = &'a String>) -> usize {
        ids.filter_map(|id| self.runs.get(id))
            .map(|n| n.saturating_sub(1))
            .sum()
    }

    /// Deliveries beyond the first, over all jobs.
    fn redeliveries(&self) -> usize {
        self.received.values().map(|n| n.saturating_sub(1)).sum()
    }
}

/// The value of `name=…` in a log line, without quotes.
fn field(line: &str, name: &str) -> Option<String> {
    let at = line.find(&format!(" {name}="))?;
    let rest = &line[at + name.len() + 2..];
    let value = rest.split_whitespace().next()?;
    Some(value.trim_matches('"').to_owned())
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Polls the backend until every job in `expected` (id → value) is SUCCESS, or `patience` has
/// passed; returns the jobs that are not SUCCESS with their value by then (id, what is stored).
async fn unfinished(
    backend: &Arc<dyn ResultBackend>,
    expected: &HashMap<String, Value>,
    patience: Duration,
) -> Vec<(String, String)> {
    let until = Instant::now() + patience;
    let mut pending: Vec<&String> = expected.keys().collect();
    loop {
        let mut still = Vec::new();
        for id in pending {
            match backend.get(id).await {
                Ok(m) if m.status == State::Success && m.result == expected[id] => {}
                _ => still.push(id),
            }
        }
        pending = still;
        if pending.is_empty() || Instant::now() > until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut left = Vec::new();
    for id in pending {
        let stored = match backend.get(id).await {
            Ok(m) => format!("{:?} {}", m.status, m.result),
            Err(e) => format!("unreadable: {e}"),
        };
        left.push((id.clone(), stored));
    }
    left
}

/// The number of stored results under `prefix` on the Redis at `url`.
async fn stored_results(url: &str, prefix: &str) -> usize {
    let client = redis::Client::open(url).expect("redis url");
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis connection");
    let mut cursor: u64 = 0;
    let mut n = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}celery-task-meta-*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut c)
            .await
            .expect("scan");
        n += keys.len();
        cursor = next;
        if cursor == 0 {
            return n;
        }
    }
}

/// A log file of the test's own in the temporary directory; removed on drop unless the test
/// panicked or `CELERITY_FAULTS_KEEP_LOGS` is set (then its path is printed, to read).
struct LogFile(PathBuf);

impl LogFile {
    fn new(tag: &str) -> LogFile {
        LogFile(std::env::temp_dir().join(format!("{tag}.log")))
    }
}

impl Drop for LogFile {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("CELERITY_FAULTS_KEEP_LOGS").is_some() {
            eprintln!("pool log kept at {}", self.0.display());
        } else {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// One line of a run's table.
struct Row {
    broker: &'static str,
    fault: &'static str,
    jobs: usize,
    /// Kills or restarts.
    faults: usize,
    lost: usize,
    duplicates: usize,
    /// What else the run counted (send errors, orphans, …).
    note: String,
    seconds: f64,
}

/// Prints `rows` as a Markdown table (the README's Reliability section takes it as it is).
fn print_table(rows: &[Row]) {
    println!("\n| broker | fault | jobs | kills/restarts | lost | duplicates | seconds | notes |");
    println!("|---|---|---:|---:|---:|---:|---:|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.1} | {} |",
            r.broker, r.fault, r.jobs, r.faults, r.lost, r.duplicates, r.seconds, r.note
        );
    }
}
