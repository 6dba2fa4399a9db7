//! Worker processes: starting a Celery or Celerity worker for a setup, the resident memory of its
//! whole process tree (supervisor + children), each process's RSS and open file descriptors (for the
//! soak), and stopping it (warm, then killed if it hangs).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::error::{BenchError, Result};
use crate::setup::{Pool, Setup, System};

/// Where the two systems' programs are.
#[derive(Debug, Clone)]
pub struct Programs {
    /// The `celerity` binary.
    pub celerity: PathBuf,
    /// The Python of the pinned Celery venv.
    pub python: PathBuf,
    /// The directory holding `celery_bench.py`.
    pub bench_dir: PathBuf,
    /// How the Celerity worker runs for the throughput rows.
    pub celerity_shape: CelerityShape,
}

impl Programs {
    /// The environment the Celery side (worker and producer) reads its settings from.
    pub fn celery_env(&self, cmd: &mut Command, setup: &Setup) {
        let (backend, pg_schema) = setup.celery_backend();
        cmd.current_dir(&self.bench_dir)
            .env("BENCH_BROKER", setup.celery_broker_url())
            .env("BENCH_BACKEND", backend)
            .env("BENCH_PG_SCHEMA", pg_schema)
            .env("BENCH_PREFIX", &setup.prefix)
            .env("PYTHONDONTWRITEBYTECODE", "1");
    }
}

/// A running worker.
pub struct Worker {
    child: Child,
    pid: u32,
}

/// Celerity's worker shape: processes and jobs at once per process for the throughput rows.
#[derive(Debug, Clone, Copy)]
pub struct CelerityShape {
    pub processes: usize,
    pub concurrency: usize,
}

/// Celerity's jobs at once (one process) for the IO-bound row.
pub const CELERITY_IO_CONCURRENCY: usize = 10_000;

impl Worker {
    /// Starts a worker of `system` consuming `queue`. Logs at warning level for both systems
    /// (Celery's and Celerity's info level both log every job) to this process's stderr.
    pub fn start(
        programs: &Programs,
        system: System,
        setup: &Setup,
        queue: &str,
        pool: Pool,
    ) -> Result<Worker> {
        Worker::start_logged(programs, system, setup, queue, pool, Stdio::inherit())
    }

    /// [`Worker::start`], the worker's log going to `log` (e.g. a file).
    pub fn start_logged(
        programs: &Programs,
        system: System,
        setup: &Setup,
        queue: &str,
        pool: Pool,
        log: Stdio,
    ) -> Result<Worker> {
        let node = format!(
            "bench-{}@%h",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let mut cmd = match system {
            System::Celery => {
                let mut cmd = Command::new(&programs.python);
                programs.celery_env(&mut cmd, setup);
                cmd.args(["-m", "celery", "-A", "celery_bench", "worker", "-Q", queue])
                    .args(["-l", "WARNING", "-n", &node]);
                match pool {
                    Pool::TwoProcesses | Pool::TwoProcessesWithMetrics | Pool::Default => {
                        cmd.args(["-P", "prefork", "-c", "2"])
                    }
                    Pool::Io => cmd.args(["-P", "threads", "-c", "16"]),
                };
                cmd
            }
            System::Celerity => {
                let mut cmd = Command::new(&programs.celerity);
                cmd.env("CELERITY_LOG", "warn")
                    .arg("--broker")
                    .arg(setup.celerity_broker_url())
                    .arg("--backend")
                    .arg(setup.backend_url().unwrap_or_else(|| "none".into()))
                    .args(["worker", "-Q", queue, "-n", &node]);
                if pool == Pool::TwoProcessesWithMetrics {
                    cmd.args(["--metrics-addr", "127.0.0.1:0"]);
                }
                match pool {
                    Pool::TwoProcesses | Pool::TwoProcessesWithMetrics => cmd
                        .arg("-P")
                        .arg(programs.celerity_shape.processes.to_string())
                        .arg("-c")
                        .arg(programs.celerity_shape.concurrency.to_string()),
                    Pool::Io => cmd
                        .args(["-P", "0", "-c"])
                        .arg(CELERITY_IO_CONCURRENCY.to_string()),
                    Pool::Default => &mut cmd,
                };
                cmd
            }
        };
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .map_err(|e| BenchError::Setup(format!("starting the {system:?} worker: {e}")))?;
        let pid = child
            .id()
            .ok_or_else(|| BenchError::Setup("worker exited at once".into()))?;
        Ok(Worker { child, pid })
    }

    /// A worker started elsewhere (e.g. with another result backend, see `rpcrow`).
    pub fn from_child(child: Child) -> Result<Worker> {
        let pid = child
            .id()
            .ok_or_else(|| BenchError::Setup("worker exited at once".into()))?;
        Ok(Worker { child, pid })
    }

    /// Fails if the worker has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(status) => Err(BenchError::Setup(format!("the worker exited: {status}"))),
        }
    }

    /// The worker's process id (the supervisor's, where there is one).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// SIGTERM (warm shutdown) to the worker; after `grace`, SIGKILL to it and its descendants.
    pub async fn stop(mut self, grace: Duration) {
        let pids = tree(self.pid);
        signal(self.pid, libc::SIGTERM);
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            for p in pids.iter().rev() {
                signal(*p, libc::SIGKILL);
            }
            let _ = self.child.wait().await;
        }
        // Children the worker did not reap in time.
        for p in pids.iter().skip(1) {
            if Path::new(&format!("/proc/{p}")).exists() && parent_of(*p) == Some(1) {
                signal(*p, libc::SIGKILL);
            }
        }
    }
}

/// The Python of the pinned Celery venv (`scripts/celery-venv.sh` creates it once and prints its
/// path last). The bench finds it itself rather than through the broker crate's `testkit` feature:
/// building the bench beside `celerity` must not change the features, so the symbol names, of the
/// crates the `celerity` binary is made of (`celerity/symbol-order.txt` names them).
pub fn celery_python() -> Result<PathBuf> {
    if std::env::var_os("CELERITY_NO_PYTHON").is_some() {
        return Err(BenchError::Setup(
            "no Python Celery (CELERITY_NO_PYTHON is set)".into(),
        ));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/celery-venv.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| BenchError::Setup(format!("running {}: {e}", script.display())))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    match stdout.lines().last().map(str::trim) {
        Some(path) if out.status.success() && !path.is_empty() => Ok(PathBuf::from(path)),
        _ => Err(BenchError::Setup(format!(
            "{} failed ({}) or printed no path",
            script.display(),
            out.status
        ))),
    }
}

/// The `celerity` binary under test: `explicit` if given, else the workspace's release build;
/// `Err` with the message to print when it is not there.
pub fn celerity_binary(
    explicit: Option<&std::path::Path>,
) -> std::result::Result<std::path::PathBuf, String> {
    let path = explicit.map_or_else(
        || std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/celerity"),
        std::path::Path::to_path_buf,
    );
    if path.exists() {
        Ok(path)
    } else {
        Err(format!(
            "{} not found: cargo build --release -p celerity (or --celerity-bin)",
            path.display()
        ))
    }
}

/// Resident memory of process `pid` and all its descendants, in KiB.
pub fn tree_rss_kib(pid: u32) -> u64 {
    tree(pid).iter().map(|&p| rss_of(p)).sum()
}

fn signal(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) with a pid this harness started; no memory is shared.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// The direct children of `pid` (from /proc), lowest pid first.
pub fn children(pid: u32) -> Vec<u32> {
    let mut out: Vec<u32> = parents()
        .into_iter()
        .filter(|(_, pp)| *pp == pid)
        .map(|(p, _)| p)
        .collect();
    out.sort_unstable();
    out
}

/// Resident memory (`VmRSS`) of one process in KiB, `None` once it has gone.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Open file descriptors of one process (entries of `/proc/<pid>/fd`), `None` once it has gone.
pub fn fd_count(pid: u32) -> Option<u64> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(dir.flatten().count() as u64)
}

/// (pid, parent pid) of every process (from /proc).
fn parents() -> Vec<(u32, u32)> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            if let Some(p) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            {
                if let Some(pp) = parent_of(p) {
                    parents.push((p, pp));
                }
            }
        }
    }
    parents
}

/// `pid` and all its descendants (from /proc).
pub fn tree(pid: u32) -> Vec<u32> {
    let parents = parents();
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let cur = out[i];
        out.extend(parents.iter().filter(|(_, pp)| *pp == cur).map(|(p, _)| *p));
        i += 1;
    }
    out
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: the fields after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

fn rss_of(pid: u32) -> u64 {
    rss_kib(pid).unwrap_or(0)
}
