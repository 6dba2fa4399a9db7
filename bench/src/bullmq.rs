//! BullMQ (Node.js) as a peer on the same Redis: installs the pinned package on first use
//! (`scripts/bullmq-setup.sh`, under target/), starts its worker processes, and runs the shapes of
//! `bench/bullmq/bench.mjs` (bulk enqueue + drain with every result checked, sequential round trips),
//! all under a key prefix of the run's own that is deleted afterwards.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

use crate::error::{BenchError, Result};
use crate::procs;

/// How long a BullMQ worker may take to say it is ready.
const READY: Duration = Duration::from_secs(60);

/// Installs (or finds) the pinned BullMQ and returns the directory holding `bench.mjs`.
pub async fn install() -> Result<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/bullmq-setup.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .await
        .map_err(|e| BenchError::Setup(format!("{}: {e}", script.display())))?;
    let text = String::from_utf8_lossy(&out.stdout);
    match text.lines().last() {
        Some(dir) if out.status.success() => Ok(PathBuf::from(dir.trim())),
        _ => Err(BenchError::Setup(format!(
            "scripts/bullmq-setup.sh failed ({}); --skip-bullmq runs without BullMQ",
            out.status
        ))),
    }
}

/// Worker processes of one BullMQ queue, with the run's names; [`Bull::end`] stops them and deletes
/// the run's keys (they are also killed if this is dropped).
pub struct Bull {
    dir: PathBuf,
    queue: String,
    prefix: String,
    workers: Vec<Child>,
}

/// What one `add` run gives back.
pub struct AddRun {
    pub enqueue: f64,
    pub drain: f64,
    pub seconds: f64,
}

impl Bull {
    /// Starts `processes` Node worker processes with `concurrency` jobs at once each, on a queue and
    /// key prefix of their own, and waits until each is ready.
    pub async fn start(dir: &Path, processes: usize, concurrency: usize) -> Result<Bull> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let mut bull = Bull {
            dir: dir.to_path_buf(),
            queue: format!("bench.{}", &id[..12]),
            prefix: format!("bench-bull-{}", &id[..12]),
            workers: Vec::new(),
        };
        for _ in 0..processes.max(1) {
            let started = bull.spawn_worker(concurrency).await;
            if let Err(e) = started {
                bull.end().await;
                return Err(e);
            }
        }
        Ok(bull)
    }

    async fn spawn_worker(&mut self, concurrency: usize) -> Result<()> {
        let mut child = self
            .node("worker")
            .arg("--concurrency")
            .arg(concurrency.to_string())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| BenchError::Setup(format!("starting node: {e}")))?;
        let stdout = child.stdout.take();
        self.workers.push(child);
        let mut lines = BufReader::new(
            stdout.ok_or_else(|| BenchError::Setup("no stdout of the BullMQ worker".into()))?,
        )
        .lines();
        match tokio::time::timeout(READY, lines.next_line()).await {
            Ok(Ok(Some(line))) if line.contains("\"ready\"") => Ok(()),
            Ok(_) => Err(BenchError::Setup(
                "the BullMQ worker exited at start".into(),
            )),
            Err(_) => Err(BenchError::Timeout("BullMQ worker start".into())),
        }
    }

    /// `node bench.mjs <cmd> --queue … --prefix …`.
    fn node(&self, cmd: &str) -> Command {
        let mut c = Command::new("node");
        c.current_dir(&self.dir)
            .arg("bench.mjs")
            .arg(cmd)
            .args(["--queue", &self.queue, "--prefix", &self.prefix])
            .stdin(Stdio::null())
            .stderr(Stdio::inherit());
        c
    }

    /// Runs a one-shot command of bench.mjs and parses its JSON line; a failure carries the tail
    /// of the script's stderr.
    async fn run(&self, cmd: &str, args: &[&str]) -> Result<Value> {
        let out = self
            .node(cmd)
            .args(args)
            .stderr(Stdio::piped())
            .output()
            .await
            .map_err(|e| BenchError::Setup(format!("node: {e}")))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(12).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(BenchError::Check(format!(
                "BullMQ {cmd} failed ({}): {}",
                out.status,
                tail.join("\n")
            )));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(serde_json::from_str(text.lines().last().unwrap_or(""))?)
    }

    /// The worker processes' pids.
    pub fn pids(&self) -> Vec<u32> {
        self.workers.iter().filter_map(Child::id).collect()
    }

    /// Summed RSS of the worker processes (and anything they started), KiB.
    pub fn rss_kib(&self) -> u64 {
        self.pids().into_iter().map(procs::tree_rss_kib).sum()
    }

    /// `n` × add(i, i) by `addBulk` in batches of 1,000 while the workers drain; every return value
    /// checked by the script.
    pub async fn add(&self, n: usize) -> Result<AddRun> {
        let v = self.run("add", &["--jobs", &n.to_string()]).await?;
        let num = |k: &str| {
            v.get(k)
                .and_then(Value::as_f64)
                .ok_or_else(|| BenchError::Setup(format!("BullMQ add printed no {k}")))
        };
        Ok(AddRun {
            enqueue: num("enqueue")?,
            drain: num("drain")?,
            seconds: num("seconds")?,
        })
    }

    /// `calls` sequential add + waitUntilFinished: milliseconds, sorted.
    pub async fn latency(&self, calls: usize) -> Result<Vec<f64>> {
        let args = ["--calls", &calls.to_string()];
        // Tried once more after a failure (its stderr printed): one CI run saw a latency run exit
        // 1 once. Its jobs are its own (each call waits for its job), so a second try is clean.
        let v = match self.run("latency", &args).await {
            Err(BenchError::Check(first)) => {
                eprintln!("bench: {first}; trying once more");
                self.run("latency", &args).await?
            }
            other => other?,
        };
        let mut ms: Vec<f64> = v
            .get("ms")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default();
        if ms.len() != calls {
            return Err(BenchError::Setup(format!(
                "{} of {calls} BullMQ latency samples",
                ms.len()
            )));
        }
        ms.sort_by(f64::total_cmp);
        Ok(ms)
    }

    /// Stops the workers (SIGTERM, then SIGKILL after 10 s) and deletes the run's keys.
    pub async fn end(mut self) {
        for w in &self.workers {
            if let Some(pid) = w.id().and_then(|p| libc::pid_t::try_from(p).ok()) {
                // SAFETY: kill(2) on a child this harness spawned and has not reaped yet.
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                }
            }
        }
        for w in &mut self.workers {
            if tokio::time::timeout(Duration::from_secs(10), w.wait())
                .await
                .is_err()
            {
                let _ = w.kill().await;
            }
        }
        if let Err(e) = crate::probe::delete_prefix(&format!("{}:", self.prefix)).await {
            eprintln!("bench: deleting BullMQ keys {}: {e}", self.prefix);
        }
    }
}
