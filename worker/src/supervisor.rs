//! The parent process of a worker pool.
//!
//! It starts `processes` children — this same binary with the same arguments and
//! [`CHILD_ENV`] set — each a full worker with its own broker connection, and keeps them running.
//! Flags whose values are secrets (the broker and backend URLs, see [`ChildSecrets`]) are left out of a
//! child's arguments and given in its environment instead, where `ps` does not show them:
//! - a child that dies is restarted, with a backoff when it keeps dying soon after starting;
//! - a child that stops by itself with status 0 (recycled after `--max-tasks-per-child` or
//!   `--max-memory-per-child`) is replaced at once;
//! - a child running a job past its hard time limit is killed (a job that never yields cannot be
//!   stopped any other way); the job is stored as FAILURE (`TimeLimitExceeded`) and, when the broker
//!   delivers it again, the worker sees it is finished and drops it. The child's other unacked jobs are
//!   delivered again by the broker.
//! - the first SIGTERM/SIGINT asks every child for a warm shutdown, a second one for a cold one.
//!
//! The children share a wait lock (an unlinked file each of them opens for itself, named to them by
//! [`WAIT_LOCK_ENV`]), so that only one idle child at a time blocks on the broker for new work
//! (see `celerity_broker::wait_lock`).
//!
//! Children run in their own process group, so a Ctrl-C in a terminal reaches only the supervisor,
//! which forwards it once. Children report jobs that carry a hard time limit as JSON lines
//! ([`JobEvent`]) on their stdout; with metrics on, also their metrics every second, which the
//! supervisor adds up for the whole pool ([`PoolMetrics`]).

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::fd::AsRawFd;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::Instant;

use celerity_broker::backend::{ExceptionInfo, ReplyTo};
use celerity_broker::{ResultBackend, TaskMeta};

use crate::error::{Result, WorkerError};
use crate::metrics::{PoolMetrics, RestartCause};
use crate::report::JobEvent;
use crate::shutdown::Shutdown;

/// Set in a child's environment (to its slot number); a worker that sees it runs as a child.
pub const CHILD_ENV: &str = "CELERITY_WORKER_CHILD";
/// The exit status of a child stopped by a remote `shutdown` command: the supervisor then stops the
/// whole pool (and exits) instead of starting the child again.
pub const EXIT_STOP_POOL: u8 = 3;

/// Set in a child's environment to the descriptor number of the pool's wait lock file.
pub const WAIT_LOCK_ENV: &str = "CELERITY_POOL_WAIT_LOCK";

/// A child that lived at least this long resets the restart backoff.
const STABLE_AFTER: Duration = Duration::from_secs(30);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The flags of the supervisor's command line whose values are secrets (URLs with passwords): a
/// child's arguments leave them out (`--flag VALUE` and `--flag=VALUE`) and its environment carries
/// the values (`VARIABLE=value`), which the child's command line reads in their place. `Debug` shows
/// the flags and variables, never the values.
#[derive(Clone, Default)]
pub struct ChildSecrets {
    flags: Vec<(String, String, Option<String>)>,
}

impl ChildSecrets {
    pub fn new() -> ChildSecrets {
        ChildSecrets::default()
    }

    /// Leaves `long` (`--broker`) out of a child's arguments and sets `env` to `value` (the value in
    /// effect, from the flag or the environment; `None`: neither gave one, and nothing is set).
    pub fn flag(mut self, long: &str, env: &str, value: Option<&str>) -> ChildSecrets {
        self.flags
            .push((long.to_owned(), env.to_owned(), value.map(str::to_owned)));
        self
    }

    /// `args` without the secret flags and their values. Everything after `--` is kept as it is.
    fn strip(&self, args: &[OsString]) -> Vec<OsString> {
        let mut kept = Vec::with_capacity(args.len());
        let mut rest = args.iter();
        while let Some(arg) = rest.next() {
            let text = arg.to_str().unwrap_or_default();
            if text == "--" {
                kept.push(arg.clone());
                kept.extend(rest.cloned());
                break;
            }
            let secret = self.flags.iter().find_map(|(long, _, _)| {
                if text == long {
                    Some(true)
                } else {
                    text.strip_prefix(long.as_str())
                        .is_some_and(|v| v.starts_with('='))
                        .then_some(false)
                }
            });
            match secret {
                // `--flag VALUE`: the value goes too.
                Some(true) => {
                    rest.next();
                }
                Some(false) => {}
                None => kept.push(arg.clone()),
            }
        }
        kept
    }

    /// The variables a child gets.
    fn env(&self) -> impl Iterator<Item = (&str, &str)> {
        self.flags
            .iter()
            .filter_map(|(_, env, value)| Some((env.as_str(), value.as_deref()?)))
    }
}

impl std::fmt::Debug for ChildSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.flags.iter().map(|(long, env, _)| (long, env)))
            .finish()
    }
}

/// Runs `processes` children until `shutdown`, then waits for all of them to exit. With `metrics`,
/// the children's reports are added up there.
pub async fn supervise(
    processes: usize,
    backend: Option<Arc<dyn ResultBackend>>,
    secrets: ChildSecrets,
    shutdown: Shutdown,
    metrics: Option<Arc<PoolMetrics>>,
) -> Result<()> {
    if processes == 0 {
        return Err(WorkerError::Config(
            "a pool needs at least one process".into(),
        ));
    }
    let exe = std::env::current_exe().map_err(|e| {
        WorkerError::Config(format!("cannot find this program to start children: {e}"))
    })?;
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let args = secrets.strip(&args);
    // Kept open for as long as children may be started; without it every child waits on its own.
    let wait_lock = match wait_lock_file() {
        Ok(file) => Some(file),
        Err(e) => {
            tracing::warn!(error = %e, "no wait lock for the pool; every idle process waits on the broker");
            None
        }
    };
    let wait_lock_fd = wait_lock.as_ref().map(|f| f.as_raw_fd().to_string());
    let slot_args = |slot| SlotArgs {
        slot,
        exe: exe.clone(),
        args: args.clone(),
        secrets: secrets.clone(),
        wait_lock_fd: wait_lock_fd.clone(),
        backend: backend.clone(),
        shutdown: shutdown.clone(),
        metrics: metrics.clone(),
    };
    let mut slots = tokio::task::JoinSet::new();
    let mut slot_of = HashMap::new();
    for slot in 0..processes {
        slot_of.insert(slots.spawn(run_slot(slot_args(slot))).id(), slot);
    }
    tracing::info!(processes, "supervisor started");
    // A slot ends only on shutdown; one that ends otherwise (a panic) is started again, so the
    // supervisor never stops supervising while it should.
    while let Some(ended) = slots.join_next_with_id().await {
        let id = match ended {
            Ok((id, ())) => id,
            Err(e) => {
                tracing::error!(error = %e, "a pool slot ended abnormally");
                e.id()
            }
        };
        let Some(slot) = slot_of.remove(&id) else {
            continue;
        };
        if !shutdown.warm.is_cancelled() {
            tracing::error!(
                slot,
                "a pool slot stopped while the pool runs; restarting it"
            );
            slot_of.insert(slots.spawn(run_slot(slot_args(slot))).id(), slot);
        }
    }
    tracing::info!("all worker processes stopped");
    drop(wait_lock);
    Ok(())
}

/// The pool's wait lock: a file in the temporary directory, unlinked at once (nothing is left
/// behind however the supervisor ends), its descriptor inherited by the children.
fn wait_lock_file() -> std::io::Result<std::fs::File> {
    let path = std::env::temp_dir().join(format!(
        "celerity-pool-{}-{}.lock",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    std::fs::remove_file(&path)?;
    // std opens files close-on-exec; the children need this one.
    // SAFETY: fcntl on a descriptor this function owns; no memory is passed.
    let cleared = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFD, 0) };
    if cleared == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}

/// In a child: its own handle on the pool's wait lock, if the supervisor passed one.
pub fn inherited_wait_lock() -> Option<Arc<celerity_broker::WaitLock>> {
    let fd: i32 = std::env::var(WAIT_LOCK_ENV).ok()?.parse().ok()?;
    match celerity_broker::WaitLock::reopen_inherited(fd) {
        Ok(lock) => Some(lock),
        Err(e) => {
            tracing::warn!(error = %e, "cannot open the pool's wait lock; waiting on the broker alone");
            None
        }
    }
}

struct SlotArgs {
    slot: usize,
    wait_lock_fd: Option<String>,
    exe: std::path::PathBuf,
    /// The supervisor's arguments without the secret flags.
    args: Vec<OsString>,
    secrets: ChildSecrets,
    backend: Option<Arc<dyn ResultBackend>>,
    shutdown: Shutdown,
    metrics: Option<Arc<PoolMetrics>>,
}

/// Makes the child get SIGTERM (a warm shutdown) when the supervisor dies, however it dies, so no
/// worker process runs on as an orphan. Linux only; elsewhere a no-op.
fn die_with_parent(command: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: getpid is async-signal-safe and touches no memory of ours.
        let parent = unsafe { libc::getpid() };
        // SAFETY: the closure runs in the forked child before exec and calls only prctl and getppid,
        // which are async-signal-safe; it allocates nothing.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                // The supervisor died before the prctl took effect: do not start an orphan.
                if libc::getppid() != parent {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = command;
}

/// Keeps one child alive until shutdown.
async fn run_slot(a: SlotArgs) {
    let mut backoff = Duration::from_secs(1);
    loop {
        if a.shutdown.warm.is_cancelled() {
            return;
        }
        let mut command = Command::new(&a.exe);
        if let Some(fd) = &a.wait_lock_fd {
            command.env(WAIT_LOCK_ENV, fd);
        }
        command
            .args(&a.args)
            .envs(a.secrets.env())
            .env(CHILD_ENV, a.slot.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0);
        die_with_parent(&mut command);
        let mut child = match command.spawn() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(slot = a.slot, error = %e, "cannot start a worker process; retrying");
                if wait_or_shutdown(&a.shutdown, backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        let pid = child.id();
        tracing::info!(slot = a.slot, pid, "worker process started");
        if let Some(m) = &a.metrics {
            m.started(a.slot);
        }
        let started = Instant::now();
        let mut recycling = None;
        let end = watch_child(&a, &mut child, &mut recycling).await;
        let lived = started.elapsed();
        if let Some(m) = &a.metrics {
            m.ended(a.slot, end.cause(recycling.as_deref()));
        }
        match end {
            End::Shutdown => return,
            End::StopPool => {
                tracing::warn!(
                    slot = a.slot,
                    pid,
                    "stopped by remote control; stopping the pool"
                );
                a.shutdown.warm.cancel();
                return;
            }
            End::Recycled => {
                tracing::info!(
                    slot = a.slot,
                    pid,
                    "worker process recycled; starting a new one"
                );
                backoff = Duration::from_secs(1);
            }
            End::Killed => backoff = Duration::from_secs(1),
            End::Died(status) => {
                if lived >= STABLE_AFTER {
                    backoff = Duration::from_secs(1);
                }
                tracing::error!(slot = a.slot, pid, %status, restart_in_s = backoff.as_secs_f64(), "worker process died; restarting it");
                if wait_or_shutdown(&a.shutdown, backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

enum End {
    Shutdown,
    /// The child was told to stop by remote control: the whole pool stops.
    StopPool,
    Recycled,
    Killed,
    Died(std::process::ExitStatus),
}

impl End {
    /// Why the child is replaced (`None`: it is not); `recycling` is the cause it gave, if any.
    fn cause(&self, recycling: Option<&str>) -> Option<RestartCause> {
        use std::os::unix::process::ExitStatusExt;
        match self {
            End::Shutdown | End::StopPool => None,
            End::Recycled => Some(match recycling {
                Some("max_tasks") => RestartCause::MaxTasks,
                Some("max_memory") => RestartCause::MaxMemory,
                _ => RestartCause::Exit,
            }),
            End::Killed => Some(RestartCause::HardTimeLimit),
            End::Died(status) if status.signal().is_some() => Some(RestartCause::Signal),
            End::Died(_) => Some(RestartCause::Exit),
        }
    }
}

/// What the supervisor knows of a job with a hard time limit: task, queue, limit, deadline.
/// The jobs with a hard time limit running in a child: id → (task, queue, hard limit, deadline,
/// where its sender waits for the result).
type Running = HashMap<String, (String, String, f64, Instant, Option<ReplyTo>)>;

/// Follows one child until it exits: reads its reports, enforces hard time limits, forwards
/// shutdown signals. `recycling` gets the cause the child gives when it recycles itself.
async fn watch_child(a: &SlotArgs, child: &mut Child, recycling: &mut Option<String>) -> End {
    let pid = child.id().and_then(|p| i32::try_from(p).ok());
    let mut lines = child.stdout.take().map(|out| BufReader::new(out).lines());
    let mut running = Running::new();
    let mut warm_sent = false;
    let mut cold_sent = false;
    loop {
        let next_deadline = running.values().map(|(_, _, _, d, _)| *d).min();
        tokio::select! {
            status = child.wait() => {
                // Its last lines (the final metrics, why it recycled) may still be in the pipe.
                drain(a, &mut lines, &mut running, recycling).await;
                let Ok(status) = status else { return End::Died(std::process::ExitStatus::default()) };
                if warm_sent || a.shutdown.warm.is_cancelled() {
                    return End::Shutdown;
                }
                if status.code() == Some(i32::from(EXIT_STOP_POOL)) {
                    return End::StopPool;
                }
                return if status.success() { End::Recycled } else { End::Died(status) };
            }
            line = next_line(&mut lines) => match line {
                Some(line) => on_line(a, &line, &mut running, recycling),
                None => lines = None,
            },
            _ = sleep_until_opt(next_deadline) => {
                let now = Instant::now();
                let overdue: Vec<(String, String, String, f64, Option<ReplyTo>)> = running
                    .iter()
                    .filter(|(_, (_, _, _, d, _))| *d <= now)
                    .map(|(id, (task, queue, hard, _, reply))| (id.clone(), task.clone(), queue.clone(), *hard, reply.clone()))
                    .collect();
                for (id, task, _, hard, _) in &overdue {
                    tracing::error!(id, task, hard_limit_s = hard, pid, "hard time limit exceeded; killing the worker process");
                }
                let _ = child.start_kill();
                let _ = child.wait().await;
                for (id, task, queue, hard, reply) in overdue {
                    store_time_limit(a.backend.as_deref(), &id, hard, reply).await;
                    if let Some(m) = &a.metrics {
                        m.time_limit_failure(a.slot, &task, &queue);
                    }
                }
                return End::Killed;
            }
            _ = a.shutdown.warm.cancelled(), if !warm_sent => {
                warm_sent = true;
                signal(pid, libc::SIGTERM);
            }
            _ = a.shutdown.cold.cancelled(), if !cold_sent => {
                cold_sent = true;
                signal(pid, libc::SIGTERM);
            }
        }
    }
}

/// Handles one line a child wrote.
fn on_line(a: &SlotArgs, line: &str, running: &mut Running, recycling: &mut Option<String>) {
    match serde_json::from_str::<JobEvent>(line) {
        Ok(JobEvent::Started {
            id,
            task,
            queue,
            hard,
            reply,
        }) => match deadline_after(hard) {
            Some(deadline) => {
                running.insert(id, (task, queue, hard, deadline, reply));
            }
            None => {
                tracing::warn!(
                    id,
                    task,
                    hard_limit_s = hard,
                    "hard time limit out of range; not enforced"
                )
            }
        },
        Ok(JobEvent::Finished { id }) => {
            running.remove(&id);
        }
        Ok(JobEvent::Metrics { snapshot }) => {
            if let Some(m) = &a.metrics {
                m.report(a.slot, snapshot);
            }
        }
        Ok(JobEvent::Recycling { cause }) => *recycling = Some(cause),
        Err(_) => tracing::debug!(line, "ignoring a line a worker process printed"),
    }
}

/// Reads what an exited child left in its pipe (at most a second's worth of waiting).
async fn drain<R: tokio::io::AsyncBufRead + Unpin>(
    a: &SlotArgs,
    lines: &mut Option<tokio::io::Lines<R>>,
    running: &mut Running,
    recycling: &mut Option<String>,
) {
    let Some(l) = lines else { return };
    let deadline = Instant::now() + Duration::from_secs(1);
    while let Ok(Ok(Some(line))) = tokio::time::timeout_at(deadline, l.next_line()).await {
        on_line(a, &line, running, recycling);
    }
}

/// When a job with `hard` seconds to run must be over; `None` for a limit that is not a positive
/// number of seconds this clock can reach (a message may say anything).
fn deadline_after(hard: f64) -> Option<Instant> {
    let limit = Duration::try_from_secs_f64(hard).ok()?;
    Instant::now().checked_add(limit)
}

async fn next_line<R: tokio::io::AsyncBufRead + Unpin>(
    lines: &mut Option<tokio::io::Lines<R>>,
) -> Option<String> {
    match lines {
        Some(l) => l.next_line().await.ok().flatten(),
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// True if shutdown came first.
async fn wait_or_shutdown(shutdown: &Shutdown, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = shutdown.warm.cancelled() => true,
    }
}

fn signal(pid: Option<i32>, sig: libc::c_int) {
    if let Some(pid) = pid {
        // SAFETY: kill(2) takes a pid and a signal number and touches no memory of ours.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// Stores the FAILURE Celery stores for a job killed at its hard time limit.
async fn store_time_limit(
    backend: Option<&dyn ResultBackend>,
    id: &str,
    hard: f64,
    reply: Option<ReplyTo>,
) {
    let Some(backend) = backend else { return };
    let exc = ExceptionInfo {
        exc_type: "TimeLimitExceeded".into(),
        exc_message: vec![json!(hard)],
        exc_module: "billiard.exceptions".into(),
    };
    let tb = format!("Traceback (most recent call last):\n  celerity worker process killed at the hard time limit\nTimeLimitExceeded: {hard}\n");
    let mut meta = TaskMeta::failure(id, &exc, Some(tb));
    meta.reply = reply;
    if let Err(e) = backend.store(&meta).await {
        tracing::error!(id, error = %e, "could not store the time-limit failure");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_flags_are_left_out_of_a_childs_arguments_and_given_in_its_environment() {
        let secrets = ChildSecrets::new()
            .flag("--broker", "B_URL", Some("amqp://u:pw@h//"))
            .flag("--backend", "R_URL", Some("redis://:pw2@h/0"))
            .flag("--other", "O_URL", None);
        let args: Vec<OsString> = [
            "--broker",
            "amqp://u:pw@h//",
            "worker",
            "--backend=redis://:pw2@h/0",
            "-P",
            "2",
            "--brokers-are-not-it",
            "--broker=",
            "--",
            "--broker",
            "x",
        ]
        .map(OsString::from)
        .into();
        let kept: Vec<OsString> = [
            "worker",
            "-P",
            "2",
            "--brokers-are-not-it",
            "--",
            "--broker",
            "x",
        ]
        .map(OsString::from)
        .into();
        assert_eq!(secrets.strip(&args), kept);
        assert_eq!(
            secrets.env().collect::<Vec<_>>(),
            [("B_URL", "amqp://u:pw@h//"), ("R_URL", "redis://:pw2@h/0")]
        );
        assert!(!format!("{secrets:?}").contains("pw"));
        // A flag given last, its value missing (clap would have refused it): nothing to take.
        let trailing: Vec<OsString> = ["worker", "--broker"].map(OsString::from).into();
        assert_eq!(secrets.strip(&trailing), [OsString::from("worker")]);
    }

    #[test]
    fn absurd_hard_limits_have_no_deadline_and_do_not_panic() {
        for hard in [1e19, 1e300, f64::MAX, f64::INFINITY, f64::NAN, -1.0] {
            assert_eq!(deadline_after(hard), None, "{hard}");
        }
        let d = deadline_after(0.5).map(|d| d.saturating_duration_since(Instant::now()));
        assert!(d.is_some_and(|d| d <= Duration::from_millis(500)));
    }
}
