//! Celerity beside real Python Celery 5.7 (the pinned venv), both ways, on Redis and on RabbitMQ
//! (results on Redis in both cases):
//!
//! - Python sends (`send_task`, `.delay()`, `.apply_async()` with countdown, expires, priority) and our
//!   worker runs: Python's `AsyncResult.get()` returns the value or raises our error type.
//! - Our client sends and a Python worker runs: our `AsyncResult::get` returns its value or its typed
//!   failure.
//! - Retries cross over: a Python-sent retrying job retries on our worker; a retry our worker
//!   republished is run by a Python worker, and one a Python worker republished (with its ETA) by
//!   ours.
//! - A mixed fleet (one Python worker, one of ours, one queue) drains a batch with nothing lost and
//!   nothing run twice; with either worker SIGKILLed mid-batch nothing is lost, and at most the
//!   killed worker's job in hand runs twice (counted and printed).
//! - Celery's own CLI (`celery call` / `celery result`) against our worker, ours against Python's.
//!
//! - The `rpc://` result backend both ways (`rpc_backend`).
//!
//! One module per behaviour: `python_producer`, `python_worker`, `retries`, `mixed_fleet`,
//! `celery_cli`, `rpc_backend`, `postgres_backend` (the same with results in PostgreSQL); this file holds the harness they share (and `child_worker_process`, which the
//! mixed-fleet tests run by that exact name).
//!
//! The Python side is `tests/python/interop_app.py` (the demo task names, same behaviour) and
//! `tests/python/interop_driver.py` (sends calls and prints what `get()` returned or raised). Every
//! test has its own queue and key prefix and removes them; every child process is killed and reaped
//! by a guard, also when the test fails. Set `CELERITY_NO_PYTHON=1` to skip (each test then only
//! prints a note).

use std::collections::HashMap;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};
use tokio::process::Command;

use celerity_broker::{connect_backend, connect_broker, State};
use celerity_client::{Client, ClientError, SendOptions};
use celerity_testsupport::{celery_python, text, ChildGuard, Cleanup, InProcessWorker};
use celerity_testsupport::{AMQP, PY_AMQP, REDIS};
use celerity_worker::{demo, Registry, Summary, TaskError, TaskOptions, WorkerConfig};

/// How long any single wait in these tests may take before the test fails.
const PATIENCE: Duration = Duration::from_secs(60);

/// The broker a test runs on (results are on Redis either way).
use celerity_testsupport::Transport as Kind;

/// One test's queue, key prefix and connection settings; removes them from the brokers on drop.
struct Env {
    kind: Kind,
    uid: String,
    queue: String,
    prefix: String,
    /// Redis visibility timeout (seconds) on both sides, for tests that need quick redelivery.
    visibility_timeout: Option<u32>,
    /// Removes the queue and keys on drop (false in a child process working for a test).
    owner: bool,
    /// The Python side's result backend when not this test's Redis (`rpc://`).
    py_backend: Option<&'static str>,
    /// Results in this PostgreSQL schema instead of Redis (`postgres_backend`); dropped with the env.
    pg: Option<celerity_testsupport::PgSchema>,
}

impl Env {
    fn new(kind: Kind) -> Env {
        let uid = format!("interop-{}", uuid::Uuid::new_v4().simple());
        Env {
            kind,
            queue: uid.clone(),
            prefix: format!("{uid}:"),
            uid,
            visibility_timeout: None,
            owner: true,
            py_backend: None,
            pg: None,
        }
    }

    /// Our broker URL.
    fn broker_url(&self) -> String {
        match self.kind {
            Kind::Redis => {
                let mut url = format!("{REDIS}?global_keyprefix={}", self.prefix);
                if let Some(vt) = self.visibility_timeout {
                    url.push_str(&format!("&visibility_timeout={vt}&restore_interval=1"));
                }
                url
            }
            Kind::Amqp => AMQP.to_owned(),
        }
    }

    /// Our result backend URL (Redis, this test's prefix; or its PostgreSQL schema).
    fn backend_url(&self) -> String {
        match &self.pg {
            Some(schema) => schema.url(""),
            None => format!("{REDIS}?global_keyprefix={}", self.prefix),
        }
    }

    async fn client(&self) -> Client {
        let broker = connect_broker(&self.broker_url()).await.unwrap();
        let backend = connect_backend(&self.backend_url()).await.unwrap();
        Client::new(broker, Some(backend))
    }

    /// A Python command with this test's configuration in its environment (see interop_app.py).
    fn python(&self, python: &Path) -> Command {
        let mut cmd = Command::new(python);
        cmd.current_dir(python_dir())
            .env("PYTHONPATH", python_dir())
            .env(
                "INTEROP_BROKER",
                match self.kind {
                    Kind::Redis => REDIS,
                    Kind::Amqp => PY_AMQP,
                },
            )
            .env(
                "INTEROP_BACKEND",
                match (&self.pg, self.py_backend) {
                    (Some(_), _) => celerity_testsupport::PY_POSTGRES,
                    (None, Some(backend)) => backend,
                    (None, None) => REDIS,
                },
            )
            .env(
                "INTEROP_PG_SCHEMA",
                self.pg.as_ref().map_or("", |s| s.name.as_str()),
            )
            .env("INTEROP_PREFIX", &self.prefix)
            .env("INTEROP_QUEUE", &self.queue)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        match self.visibility_timeout {
            Some(vt) => cmd.env("INTEROP_VT", vt.to_string()),
            None => cmd.env_remove("INTEROP_VT"),
        };
        cmd
    }

    /// `celerity <args>` (the real binary) with this test's broker and backend.
    async fn celerity(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_celerity"))
            .arg("--broker")
            .arg(self.broker_url())
            .arg("--backend")
            .arg(self.backend_url())
            .args(args)
            .env_remove("CELERITY_BROKER_URL")
            .env_remove("CELERITY_RESULT_BACKEND")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .expect("run celerity")
    }

    /// `python -m celery -A interop_app <args>` (Celery's own CLI).
    async fn celery_cli(&self, python: &Path, args: &[&str]) -> Output {
        self.python(python)
            .args(["-m", "celery", "-A", "interop_app"])
            .args(args)
            .output()
            .await
            .expect("run celery")
    }

    /// Sends `calls` from Python (interop_driver.py) and returns what each `get()` gave.
    async fn python_calls(&self, python: &Path, calls: &Value) -> Vec<Value> {
        let out = self
            .python(python)
            .arg(python_dir().join("interop_driver.py"))
            .arg(calls.to_string())
            .output()
            .await
            .expect("run interop_driver.py");
        assert!(
            out.status.success(),
            "interop_driver.py failed ({:?}): {}",
            out.status,
            text(&out.stderr)
        );
        let lines: Vec<Value> = text(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        assert_eq!(lines.len(), calls.as_array().map_or(0, Vec::len));
        lines
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if !self.owner {
            return;
        }
        let mut cleanup = Cleanup::new().redis_prefix(self.prefix.clone());
        if self.kind == Kind::Amqp {
            cleanup = cleanup.amqp_queue(self.queue.clone());
        }
        drop(cleanup);
    }
}

fn python_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python")
}

/// A `celery worker -P prefork -c 1` of the interop app on the test's queue; SIGKILLed and reaped on drop.
struct PyWorker {
    child: Child,
    log: PathBuf,
    reaped: bool,
}

impl PyWorker {
    async fn start(env: &Env, python: &Path) -> PyWorker {
        let log = std::env::temp_dir().join(format!("{}-{}.log", env.uid, uuid::Uuid::new_v4()));
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd: std::process::Command = env.python(python).into_std();
        let child = cmd
            // prefork -c 1, not solo: Celery 5.7's solo pool on RabbitMQ stalls for seconds at a
            // time with a full queue (seen with Python's own producer too).
            .args([
                "-m",
                "celery",
                "-A",
                "interop_app",
                "worker",
                "-P",
                "prefork",
                "-c",
                "1",
            ])
            .args(["-Q", &env.queue, "-n", &format!("py-{}@%h", env.uid)])
            .args([
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ])
            .args(["-l", "INFO"])
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .process_group(0)
            .spawn()
            .expect("start celery worker");
        let mut worker = PyWorker {
            child,
            log,
            reaped: false,
        };
        let until = tokio::time::Instant::now() + PATIENCE;
        while !worker.log().contains(" ready.") {
            if let Ok(Some(status)) = worker.child.try_wait() {
                panic!("celery worker exited ({status}):\n{}", worker.log());
            }
            assert!(
                tokio::time::Instant::now() < until,
                "celery worker not ready:\n{}",
                worker.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        worker
    }

    /// SIGTERM (Celery's warm shutdown: the running job finishes and is acked, prefetched ones go
    /// back to the broker) and wait for the exit.
    async fn warm_stop(&mut self) {
        // SAFETY: kill(2) on our own, not yet reaped child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let until = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.reaped = true;
                assert!(status.success(), "celery worker exited with {status}");
                return;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "celery worker did not stop:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL to the worker and its pool process (no warm or cold shutdown: they just
    /// disappear), and reap.
    fn kill(&mut self) {
        if self.reaped {
            return;
        }
        // SAFETY: killpg(2) on the process group this child leads (spawned with process_group(0));
        // the group id cannot be reused before the leader is reaped just below.
        unsafe { libc::killpg(self.child.id() as libc::pid_t, libc::SIGKILL) };
        let _ = self.child.wait();
        self.reaped = true;
    }
}

impl Drop for PyWorker {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- celery worker log ---\n{}", self.log());
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Our worker, in this process; stopped (cold) on drop if the test did not stop it.
struct OurWorker(InProcessWorker);

impl OurWorker {
    async fn start(env: &Env, registry: Registry, concurrency: usize) -> OurWorker {
        let broker = connect_broker(&env.broker_url()).await.unwrap();
        let backend = connect_backend(&env.backend_url()).await.unwrap();
        let config = WorkerConfig {
            queues: vec![env.queue.clone()],
            concurrency,
            hostname: format!("rs-{}@test", env.uid),
            grace: Duration::from_secs(10),
            ..WorkerConfig::default()
        };
        OurWorker(InProcessWorker::spawn(
            registry,
            broker,
            Some(backend),
            config,
        ))
    }

    /// Warm stop: finishes what runs, gives back what it holds; returns what it did.
    async fn stop(self) -> Summary {
        self.0.stop_within(PATIENCE).await
    }
}

/// The demo tasks plus this suite's test-only ones (same names as in interop_app.py):
/// `interop.record(n, ms)` counts a run of job `n` in Redis, `interop.handoff(key)` always retries
/// here (counting its runs in `handoff_runs`) so that a Python worker finishes it, and
/// `interop.to_rust(key)` ends here what always retries on Python.
fn registry(
    env: &Env,
    records: redis::aio::MultiplexedConnection,
    handoff_runs: Arc<AtomicU32>,
) -> Registry {
    let mut r = Registry::new();
    demo::register(&mut r);
    let prefix = env.prefix.clone();
    r.register_fn(
        "interop.record",
        TaskOptions::default(),
        move |_, (n, ms): (u64, u64)| {
            let mut c = records.clone();
            let prefix = prefix.clone();
            async move {
                let _: () = redis::pipe()
                    .hincr(format!("{prefix}interop.runs"), n.to_string(), 1)
                    .sadd(format!("{prefix}interop.rust"), n.to_string())
                    .query_async(&mut c)
                    .await
                    .map_err(|e| TaskError::new("RedisError", e.to_string()))?;
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(n)
            }
        },
    );
    r.register_fn(
        "interop.to_rust",
        TaskOptions::default(),
        |ctx, (key,): (String,)| async move {
            Ok(json!({"key": key, "ran_on": "celerity", "retries": ctx.retries()}))
        },
    );
    r.register_fn(
        "interop.handoff",
        TaskOptions {
            autoretry_for: vec!["HandOff".into()],
            max_retries: None,
            default_retry_delay: Duration::from_secs(1),
            ..TaskOptions::default()
        },
        move |_, (key,): (String,)| {
            let runs = handoff_runs.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Err::<Value, _>(TaskError::new("HandOff", format!("{key}: not here")))
            }
        },
    );
    r
}

async fn records() -> redis::aio::MultiplexedConnection {
    redis::Client::open(REDIS)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn demo_worker(env: &Env, concurrency: usize) -> OurWorker {
    let reg = registry(env, records().await, Arc::new(AtomicU32::new(0)));
    OurWorker::start(env, reg, concurrency).await
}

/// Our worker in a child process (this test binary re-run as [`child_worker_process`]), so that it
/// can be SIGKILLed; killed and reaped on drop.
struct OurChild(ChildGuard);

impl OurChild {
    fn start(env: &Env) -> OurChild {
        let exe = std::env::current_exe().expect("the test binary");
        let mut cmd = std::process::Command::new(exe);
        cmd.args([
            "child_worker_process",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env("INTEROP_CHILD_KIND", format!("{:?}", env.kind))
        .env("INTEROP_CHILD_UID", &env.uid)
        .env(
            "INTEROP_CHILD_VT",
            env.visibility_timeout
                .map(|v| v.to_string())
                .unwrap_or_default(),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        OurChild(ChildGuard::spawn(&mut cmd, "the child worker"))
    }

    fn kill(&mut self) {
        self.0.kill();
    }
}

/// Not a test: the body of [`OurChild`] (run with `--ignored --exact` and `INTEROP_CHILD_*` set).
/// Runs our worker with the suite's registry on the parent test's queue until it is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the child process of the mixed-fleet tests, not a test of its own"]
async fn child_worker_process() {
    let (Ok(kind), Ok(uid)) = (
        std::env::var("INTEROP_CHILD_KIND"),
        std::env::var("INTEROP_CHILD_UID"),
    ) else {
        return;
    };
    let mut env = Env::new(if kind == "Redis" {
        Kind::Redis
    } else {
        Kind::Amqp
    });
    env.queue = uid.clone();
    env.prefix = format!("{uid}:");
    env.uid = uid;
    env.visibility_timeout = std::env::var("INTEROP_CHILD_VT")
        .ok()
        .and_then(|v| v.parse().ok());
    // The parent owns (and removes) the queue and keys.
    env.owner = false;
    let ours = demo_worker(&env, 1).await;
    tokio::time::sleep(PATIENCE).await;
    ours.stop().await;
}

mod celery_cli;
mod mixed_fleet;
mod postgres_backend;
mod python_producer;
mod python_worker;
mod retries;
mod rpc_backend;
