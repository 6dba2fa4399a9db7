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

use celerity_broker::testkit::{celery_python, delete_amqp_queue, delete_redis_prefix};
use celerity_broker::{connect_backend, connect_broker, State};
use celerity_client::{Client, ClientError, SendOptions};
use celerity_worker::{
    demo, run, Registry, Shutdown, Summary, TaskError, TaskOptions, WorkerConfig,
};

const REDIS: &str = "redis://127.0.0.1:6379/0";
/// Our spelling of the local RabbitMQ (vhost `/` percent-encoded).
const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// kombu's spelling of the same.
const PY_AMQP: &str = "amqp://guest:guest@127.0.0.1:5672//";
/// How long any single wait in these tests may take before the test fails.
const PATIENCE: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Redis,
    Amqp,
}

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

    /// Our result backend URL (Redis, this test's prefix).
    fn backend_url(&self) -> String {
        format!("{REDIS}?global_keyprefix={}", self.prefix)
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
            .env("INTEROP_BACKEND", REDIS)
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
        let (kind, prefix, queue) = (self.kind, self.prefix.clone(), self.queue.clone());
        // A runtime of its own: this may run inside a test's runtime, which must not be blocked on.
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                delete_redis_prefix(&prefix).await;
                if kind == Kind::Amqp {
                    delete_amqp_queue(&queue).await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

fn python_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
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
struct OurWorker {
    shutdown: Shutdown,
    handle: Option<tokio::task::JoinHandle<celerity_worker::error::Result<Summary>>>,
}

impl OurWorker {
    async fn start(env: &Env, registry: Registry, concurrency: usize) -> OurWorker {
        let broker = connect_broker(&env.broker_url()).await.unwrap();
        let backend = connect_backend(&env.backend_url()).await.unwrap();
        let shutdown = Shutdown::default();
        let config = WorkerConfig {
            queues: vec![env.queue.clone()],
            concurrency,
            hostname: format!("rs-{}@test", env.uid),
            grace: Duration::from_secs(10),
            ..WorkerConfig::default()
        };
        let handle = tokio::spawn(run(
            registry,
            broker,
            Some(backend),
            config,
            shutdown.clone(),
        ));
        OurWorker {
            shutdown,
            handle: Some(handle),
        }
    }

    /// Warm stop: finishes what runs, gives back what it holds; returns what it did.
    async fn stop(mut self) -> Summary {
        self.shutdown.warm.cancel();
        let handle = self.handle.take().expect("stopped once");
        tokio::time::timeout(PATIENCE, handle)
            .await
            .expect("our worker stops")
            .unwrap()
            .unwrap()
    }
}

impl Drop for OurWorker {
    fn drop(&mut self) {
        self.shutdown.warm.cancel();
        self.shutdown.cold.cancel();
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

// ---------------------------------------------------------------------------------------------
// 1 (and 3, first half). Python producer → our worker → Python's AsyncResult.get().

async fn python_producer_our_worker(kind: Kind) {
    let Some(python) = celery_python() else {
        return;
    };
    let env = Env::new(kind);
    let ours = demo_worker(&env, 4).await;

    let nested = json!({"list": [1, 2.5, true, null], "emoji": "🚀🎉", "deep": {"x": {"y": "ü"}}, "empty": {}});
    let calls = json!([
        {"via": "send_task", "name": "demo.add", "args": [2, 3]},
        {"via": "delay", "name": "demo.add", "args": [40, 2]},
        {"via": "send_task", "name": "demo.echo", "kwargs": {"name": "Zoë ☕", "n": 7}},
        {"via": "delay", "name": "demo.echo", "args": ["três ☃", [1, {"a": null}], -7, "tab\there"],
         "kwargs": {"nested": nested}},
        {"via": "apply_async", "name": "demo.mul", "args": [6, 7], "countdown": 2},
        {"via": "send_task", "name": "demo.add", "args": [1, 1], "expires": -30, "timeout": 3},
        {"via": "send_task", "name": "demo.add", "args": [5, 5], "expires": 120},
        {"via": "apply_async", "name": "demo.add", "args": [7, 8], "priority": 9},
        {"via": "send_task", "name": "demo.add", "args": [0.5, 0.25], "priority": 0},
        {"via": "send_task", "name": "demo.fail", "args": ["kaputt ☠ äöü"]},
        {"via": "send_task", "name": "demo.add", "args": ["a", 1]},
        {"via": "send_task", "name": "demo.flaky", "args": ["py-flaky", 2]},
    ]);
    let mut calls = calls;
    if kind == Kind::Redis {
        // Pickle is refused: not run, FAILURE stored (so get() raises), the message moved to the
        // dead-letter queue. (Redis only: there the dead-letter queue is under the test's prefix.)
        calls.as_array_mut().unwrap().push(
            json!({"via": "send_task", "name": "demo.add", "args": [1, 2], "serializer": "pickle"}),
        );
    }
    let got = env.python_calls(&python, &calls).await;
    let value = |i: usize| {
        assert_eq!(got[i]["ok"], json!(true), "call {i}: {}", got[i]);
        assert_eq!(got[i]["state"], json!("SUCCESS"), "call {i}: {}", got[i]);
        got[i]["value"].clone()
    };
    assert_eq!(value(0), json!(5));
    assert_eq!(value(1), json!(42));
    assert_eq!(
        value(2),
        json!({"args": [], "kwargs": {"name": "Zoë ☕", "n": 7}})
    );
    assert_eq!(
        value(3),
        json!({"args": ["três ☃", [1, {"a": null}], -7, "tab\there"], "kwargs": {"nested": nested}})
    );
    // Countdown: not run before sent_at + 2 s (Python's eta is computed after sent_at).
    assert_eq!(value(4), json!(42));
    let (sent, done) = (
        got[4]["sent_at"].as_f64().unwrap(),
        got[4]["date_done"].as_f64().unwrap(),
    );
    assert!(done >= sent + 2.0, "ran early: sent {sent}, done {done}");
    // An expires already past is never run. Our worker stores REVOKED for it, so Python's get()
    // raises TaskRevokedError. On RabbitMQ Celery also gives such a message a per-message TTL of
    // 0, so the broker may drop it before any worker sees it: then nothing is stored (PENDING),
    // exactly as with a Python worker.
    assert_eq!(got[5]["ok"], json!(false), "{}", got[5]);
    let revoked = got[5]["state"] == json!("REVOKED");
    if revoked {
        assert_eq!(got[5]["exc_class"], json!("TaskRevokedError"), "{}", got[5]);
    } else {
        assert_eq!(kind, Kind::Amqp, "{}", got[5]);
        assert_eq!(got[5]["state"], json!("PENDING"), "{}", got[5]);
    }
    assert_eq!(value(6), json!(10));
    assert_eq!(value(7), json!(15));
    assert_eq!(value(8), json!(0.75));
    // Our failures raise in Python with our type and message.
    assert_eq!(
        (
            &got[9]["state"],
            &got[9]["exc_class"],
            &got[9]["exc_module"],
            &got[9]["exc_message"]
        ),
        (
            &json!("FAILURE"),
            &json!("ValueError"),
            &json!("builtins"),
            &json!("kaputt ☠ äöü")
        ),
        "{}",
        got[9]
    );
    assert_eq!(got[10]["exc_class"], json!("TypeError"), "{}", got[10]);
    assert_eq!(
        got[10]["exc_message"],
        json!(r#"unsupported operand types: "a" and 1"#)
    );
    // A Python-sent retrying job retries on our worker (twice) and Python reads the final value.
    assert_eq!(value(11), json!({"key": "py-flaky", "runs": 3}));

    let pickled = kind == Kind::Redis;
    if pickled {
        assert_eq!(
            (
                &got[12]["state"],
                &got[12]["exc_class"],
                &got[12]["exc_module"]
            ),
            (
                &json!("FAILURE"),
                &json!("DecodeError"),
                &json!("kombu.exceptions")
            ),
            "{}",
            got[12]
        );
        let message = got[12]["exc_message"].as_str().unwrap();
        assert!(message.contains("pickle is never executed"), "{message}");
        let broker = connect_broker(&env.broker_url()).await.unwrap();
        assert_eq!(
            broker
                .queue_len(celerity_worker::DEAD_LETTER_QUEUE)
                .await
                .unwrap(),
            1
        );
        broker.close().await.unwrap();
    }

    let summary = ours.stop().await;
    assert_eq!(
        (
            summary.succeeded,
            summary.failed,
            summary.retried,
            summary.revoked,
            summary.rejected
        ),
        (9, 2, 2, u64::from(revoked), u64::from(pickled)),
        "{summary:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_producer_our_worker_redis() {
    python_producer_our_worker(Kind::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_producer_our_worker_rabbitmq() {
    python_producer_our_worker(Kind::Amqp).await;
}

// ---------------------------------------------------------------------------------------------
// 2. Our client → a Python worker → our AsyncResult::get.

async fn our_client_python_worker(kind: Kind) {
    let Some(python) = celery_python() else {
        return;
    };
    let env = Env::new(kind);
    let py = PyWorker::start(&env, &python).await;
    let client = env.client().await;
    let q = SendOptions::new().queue(&env.queue);
    let send = |name: &'static str, args: Vec<Value>, kwargs: Value, opts: SendOptions| {
        let client = &client;
        async move {
            let Value::Object(kwargs) = kwargs else {
                panic!("kwargs")
            };
            client.send_task(name, args, kwargs, &opts).await.unwrap()
        }
    };
    let nested = json!({"list": [1, 2.5, true, null], "emoji": "🚀", "deep": {"x": {"y": "ü"}}});
    let add = send("demo.add", vec![json!(2), json!(3)], json!({}), q.clone()).await;
    let echo = send(
        "demo.echo",
        vec![json!("Zoë ☕"), nested.clone()],
        json!({"k": "☃", "nested": nested}),
        q.clone(),
    )
    .await;
    let later = send(
        "demo.mul",
        vec![json!(6), json!(7)],
        json!({}),
        q.clone().countdown(Duration::from_secs(2)),
    )
    .await;
    let sent_later = chrono::Utc::now();
    let prio = send(
        "demo.add",
        vec![json!(1), json!(2)],
        json!({}),
        q.clone().priority(5),
    )
    .await;
    let expired = send(
        "demo.add",
        vec![json!(1), json!(1)],
        json!({}),
        q.clone().expires(celerity_client::Expires::At(
            chrono::Utc::now() - chrono::Duration::seconds(30),
        )),
    )
    .await;
    let fail = send("demo.fail", vec![json!("nope ☂ ü")], json!({}), q.clone()).await;
    // Python's demo.flaky calls self.retry: it retries on Python and we read the end result.
    let flaky = send(
        "demo.flaky",
        vec![json!("rs-flaky"), json!(2)],
        json!({}),
        q.clone(),
    )
    .await;

    let t = Some(PATIENCE);
    assert_eq!(add.get(t).await.unwrap(), json!(5));
    assert_eq!(
        echo.get(t).await.unwrap(),
        json!({"args": ["Zoë ☕", nested], "kwargs": {"k": "☃", "nested": nested}})
    );
    assert_eq!(later.get(t).await.unwrap(), json!(42));
    let done = later.meta().await.unwrap().date_done.unwrap();
    assert!(
        done >= sent_later + chrono::Duration::seconds(2) - chrono::Duration::milliseconds(100),
        "ran early: sent {sent_later}, done {done}"
    );
    assert_eq!(prio.get(t).await.unwrap(), json!(3));
    // An expires already past is never run: the Python worker stores REVOKED. On RabbitMQ our
    // client, like Celery, also sets a per-message TTL of 0, so the broker may drop it before any
    // worker sees it (nothing stored, as between two Python processes).
    match expired.get(Some(Duration::from_secs(5))).await {
        Err(ClientError::Revoked { task_id }) => assert_eq!(task_id, expired.id()),
        Err(ClientError::Timeout(_)) if kind == Kind::Amqp => {
            assert_eq!(expired.state().await.unwrap(), State::Pending)
        }
        other => panic!("expected Revoked, got {other:?}"),
    }
    match fail.get(t).await {
        Err(ClientError::TaskFailed { exception, .. }) => {
            assert_eq!(exception.exc_type, "ValueError");
            assert_eq!(exception.exc_module, "builtins");
            assert_eq!(exception.message(), "nope ☂ ü");
        }
        other => panic!("expected TaskFailed, got {other:?}"),
    }
    assert_eq!(
        flaky.get(t).await.unwrap(),
        json!({"key": "rs-flaky", "runs": 3})
    );
    let log = py.log();
    assert!(
        log.contains("demo.flaky") && log.contains("retry"),
        "the Python worker retried demo.flaky:\n{log}"
    );
    client.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_python_worker_redis() {
    our_client_python_worker(Kind::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_python_worker_rabbitmq() {
    our_client_python_worker(Kind::Amqp).await;
}

// ---------------------------------------------------------------------------------------------
// 3, second half. A retry our worker republished is run by a Python worker.

async fn our_retry_runs_on_python(kind: Kind) {
    let Some(python) = celery_python() else {
        return;
    };
    let mut env = Env::new(kind);
    env.visibility_timeout = Some(5);
    let runs = Arc::new(AtomicU32::new(0));
    let ours = OurWorker::start(&env, registry(&env, records().await, runs.clone()), 2).await;
    let client = env.client().await;
    let job = client
        .send_task(
            "interop.handoff",
            vec![json!("h")],
            Map::new(),
            &SendOptions::new().queue(&env.queue),
        )
        .await
        .unwrap();
    let until = tokio::time::Instant::now() + PATIENCE;
    while runs.load(Ordering::SeqCst) == 0 {
        assert!(
            tokio::time::Instant::now() < until,
            "our worker never ran it"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let summary = ours.stop().await;
    let ran_here = runs.load(Ordering::SeqCst);
    assert!(summary.retried >= 1, "{summary:?}");
    assert_eq!(summary.retried, u64::from(ran_here), "{summary:?}");
    assert_eq!(job.state().await.unwrap(), State::Retry);

    let _py = PyWorker::start(&env, &python).await;
    assert_eq!(
        job.get(Some(PATIENCE)).await.unwrap(),
        json!({"key": "h", "ran_on": "python", "retries": ran_here})
    );
    client.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_retry_runs_on_python_redis() {
    our_retry_runs_on_python(Kind::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_retry_runs_on_python_rabbitmq() {
    our_retry_runs_on_python(Kind::Amqp).await;
}

/// A retry a Python worker republished (with its ETA) is run by our worker.
async fn python_retry_runs_on_ours(kind: Kind) {
    let Some(python) = celery_python() else {
        return;
    };
    let mut env = Env::new(kind);
    env.visibility_timeout = Some(3);
    let mut py = PyWorker::start(&env, &python).await;
    let client = env.client().await;
    let job = client
        .send_task(
            "interop.to_rust",
            vec![json!("t")],
            Map::new(),
            &SendOptions::new().queue(&env.queue),
        )
        .await
        .unwrap();
    // Celery stores RETRY after it published the retry message.
    let until = tokio::time::Instant::now() + PATIENCE;
    while job.state().await.unwrap() != State::Retry {
        assert!(
            tokio::time::Instant::now() < until,
            "Python never retried it"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A warm stop: the first run is acked (a SIGKILL could leave it unacked beside its retry, and
    // then the original runs again, as between two Python workers), and the retry it holds for
    // its ETA goes back to the queue.
    py.warm_stop().await;
    let mut redis = records().await;
    let python_runs: u32 = redis::cmd("GET")
        .arg(format!("{}interop.to_rust.runs", env.prefix))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(python_runs >= 1);

    let ours = demo_worker(&env, 2).await;
    assert_eq!(
        job.get(Some(PATIENCE)).await.unwrap(),
        json!({"key": "t", "ran_on": "celerity", "retries": python_runs})
    );
    let summary = ours.stop().await;
    assert_eq!((summary.succeeded, summary.retried), (1, 0), "{summary:?}");
    client.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_retry_runs_on_ours_redis() {
    python_retry_runs_on_ours(Kind::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_retry_runs_on_ours_rabbitmq() {
    python_retry_runs_on_ours(Kind::Amqp).await;
}

// ---------------------------------------------------------------------------------------------
// 4. A mixed fleet drains one queue: nothing lost, nothing run twice; also with either SIGKILLed.

const BATCH: u64 = 500;

/// Which worker of the mixed fleet is SIGKILLed mid-batch.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Victim {
    Nobody,
    Python,
    Ours,
}

/// Our worker in a child process (this test binary re-run as [`child_worker_process`]), so that it
/// can be SIGKILLed; killed and reaped on drop.
struct OurChild {
    child: Child,
    reaped: bool,
}

impl OurChild {
    fn start(env: &Env) -> OurChild {
        let exe = std::env::current_exe().expect("the test binary");
        let child = std::process::Command::new(exe)
            .args([
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
            .stderr(Stdio::null())
            .spawn()
            .expect("start the child worker");
        OurChild {
            child,
            reaped: false,
        }
    }

    fn kill(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.reaped = true;
        }
    }
}

impl Drop for OurChild {
    fn drop(&mut self) {
        self.kill();
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

async fn scard(redis: &mut redis::aio::MultiplexedConnection, key: &str) -> u64 {
    redis::cmd("SCARD")
        .arg(key)
        .query_async(redis)
        .await
        .unwrap()
}

/// Whether a message with task id `id` waits in this test's Redis queue or `unacked` hash.
async fn in_redis_broker(
    redis: &mut redis::aio::MultiplexedConnection,
    env: &Env,
    id: &str,
) -> bool {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}{}*", env.prefix, env.queue))
        .query_async(redis)
        .await
        .unwrap();
    for key in keys {
        let items: Vec<String> = redis::cmd("LRANGE")
            .arg(&key)
            .arg(0)
            .arg(-1)
            .query_async(redis)
            .await
            .unwrap_or_default();
        if items.iter().any(|i| i.contains(id)) {
            return true;
        }
    }
    let unacked: Vec<String> = redis::cmd("HVALS")
        .arg(format!("{}unacked", env.prefix))
        .query_async(redis)
        .await
        .unwrap();
    unacked.iter().any(|i| i.contains(id))
}

async fn mixed_fleet(kind: Kind, victim: Victim) {
    let Some(python) = celery_python() else {
        return;
    };
    let mut env = Env::new(kind);
    env.visibility_timeout = Some(3);
    let mut py = PyWorker::start(&env, &python).await;
    let (mut ours, mut ours_child) = if victim == Victim::Ours {
        (None, Some(OurChild::start(&env)))
    } else {
        (Some(demo_worker(&env, 1).await), None)
    };
    let client = env.client().await;
    let options = SendOptions::new().queue(&env.queue);
    let batch: Vec<_> = (0..BATCH)
        .map(|n| {
            options
                .build(
                    "interop.record",
                    vec![json!(n), json!(3)],
                    Map::new(),
                    chrono::Utc::now(),
                )
                .unwrap()
        })
        .collect();
    client.send_batch(&batch, &env.queue).await.unwrap();

    let mut redis = records().await;
    let py_set = format!("{}interop.python", env.prefix);
    let our_set = format!("{}interop.rust", env.prefix);
    if victim != Victim::Nobody {
        let watched = if victim == Victim::Python {
            &py_set
        } else {
            &our_set
        };
        let until = tokio::time::Instant::now() + PATIENCE;
        while scard(&mut redis, watched).await < 25 {
            assert!(
                tokio::time::Instant::now() < until,
                "the {victim:?} worker ran fewer than 25 jobs"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        match victim {
            Victim::Python => py.kill(),
            Victim::Ours => ours_child.as_mut().expect("child worker").kill(),
            Victim::Nobody => unreachable!(),
        }
    }

    let backend = client.backend().unwrap().clone();
    // Jobs a killed *Python* worker lost on Redis: kombu pops with BRPOP and only then writes the
    // message into `unacked` (a separate pipeline), so a SIGKILL between the two loses it — a window
    // in Celery's consumer, not in ours (our pop-and-record is one Lua script). Such a job is in
    // neither the queue nor `unacked`; it is reported, and at most one is tolerated.
    let mut lost_by_kombu = Vec::new();
    for (n, m) in batch.iter().enumerate() {
        let meta = match backend.wait(m.id(), Some(PATIENCE)).await {
            Ok(meta) => meta,
            Err(e) if kind == Kind::Redis && victim == Victim::Python => {
                assert!(
                    !in_redis_broker(&mut redis, &env, m.id()).await,
                    "job {n} is still on the broker after {PATIENCE:?}: {e}"
                );
                lost_by_kombu.push(n as u64);
                continue;
            }
            Err(e) => panic!("job {n}: {e}"),
        };
        assert_eq!(
            (meta.status, meta.result),
            (State::Success, json!(n)),
            "job {n}"
        );
    }
    let summary = match ours.take() {
        Some(w) => Some(w.stop().await),
        None => None,
    };

    let runs: HashMap<u64, u64> = redis::cmd("HGETALL")
        .arg(format!("{}interop.runs", env.prefix))
        .query_async(&mut redis)
        .await
        .unwrap();
    let (by_python, by_us) = (
        scard(&mut redis, &py_set).await,
        scard(&mut redis, &our_set).await,
    );
    let lost: Vec<u64> = (0..BATCH)
        .filter(|n| !runs.contains_key(n) && !lost_by_kombu.contains(n))
        .collect();
    let twice: Vec<(u64, u64)> = runs
        .iter()
        .filter(|(_, c)| **c > 1)
        .map(|(n, c)| (*n, *c))
        .collect();
    eprintln!(
        "mixed fleet ({kind:?}, killed: {victim:?}): python ran {by_python}, ours ran {by_us}, \
         jobs run more than once: {twice:?}; lost by the killed Python worker between BRPOP and \
         its unacked write: {lost_by_kombu:?}; our summary {summary:?}"
    );
    assert!(lost.is_empty(), "jobs never run: {lost:?}");
    assert!(lost_by_kombu.len() <= 1, "{lost_by_kombu:?}");
    assert_eq!(
        runs.len() as u64 + lost_by_kombu.len() as u64,
        BATCH,
        "unknown job numbers recorded"
    );
    assert!(by_python > 0 && by_us > 0, "both workers took part");
    if victim == Victim::Nobody {
        assert!(twice.is_empty(), "run more than once: {twice:?}");
    } else {
        // Only the job the killed worker had in hand can run twice (prefetch 1, acks late): if it
        // had run but its SUCCESS was not stored yet, it comes back and the other worker runs it
        // again. (A redelivered job whose SUCCESS is stored is skipped by our worker; Celery 5.7
        // skips it only with `worker_deduplicate_successful_tasks`, off by default and here.)
        assert!(twice.len() <= 1, "run more than once: {twice:?}");
        assert!(twice.iter().all(|(_, c)| *c == 2), "{twice:?}");
    }
    assert_eq!(
        client.broker().queue_len(&env.queue).await.unwrap(),
        0,
        "nothing left waiting"
    );
    client.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_fleet_redis() {
    mixed_fleet(Kind::Redis, Victim::Nobody).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_fleet_rabbitmq() {
    mixed_fleet(Kind::Amqp, Victim::Nobody).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_fleet_python_killed_redis() {
    mixed_fleet(Kind::Redis, Victim::Python).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_fleet_python_killed_rabbitmq() {
    mixed_fleet(Kind::Amqp, Victim::Python).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_fleet_ours_killed_redis() {
    mixed_fleet(Kind::Redis, Victim::Ours).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_fleet_ours_killed_rabbitmq() {
    mixed_fleet(Kind::Amqp, Victim::Ours).await;
}

// ---------------------------------------------------------------------------------------------
// 5. Celery's CLI against our worker; ours against a Python worker.

async fn cli_both_ways(kind: Kind) {
    let Some(python) = celery_python() else {
        return;
    };
    let env = Env::new(kind);

    // `celery call` / `celery result` → our worker.
    let ours = demo_worker(&env, 2).await;
    let out = env
        .celery_cli(&python, &["call", "demo.add", "--args", "[20, 22]"])
        .await;
    assert!(out.status.success(), "celery call: {}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_owned();
    assert!(
        uuid::Uuid::parse_str(&id).is_ok(),
        "celery call printed {id:?}"
    );
    let out = env.celery_cli(&python, &["result", &id]).await;
    assert!(out.status.success(), "celery result: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "42");
    let out = env
        .celery_cli(
            &python,
            &[
                "call",
                "demo.echo",
                "--args",
                r#"["ü"]"#,
                "--kwargs",
                r#"{"k": [1, null]}"#,
            ],
        )
        .await;
    assert!(out.status.success(), "celery call: {}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_owned();
    let out = env.celery_cli(&python, &["result", &id]).await;
    assert!(out.status.success(), "celery result: {}", text(&out.stderr));
    // `celery result` prints the value's Python repr.
    assert_eq!(
        text(&out.stdout).trim(),
        "{'args': ['ü'], 'kwargs': {'k': [1, None]}}"
    );
    ours.stop().await;

    // `celerity call --wait` / `celerity result` → a Python worker.
    let _py = PyWorker::start(&env, &python).await;
    let out = env
        .celerity(&[
            "call",
            "demo.add",
            "--args",
            "[2, 3]",
            "-Q",
            &env.queue,
            "--wait",
            "--timeout",
            "60",
        ])
        .await;
    assert!(out.status.success(), "celerity call: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "5");
    let out = env
        .celerity(&["call", "demo.mul", "--args", "[6, 7]", "-Q", &env.queue])
        .await;
    assert!(out.status.success(), "celerity call: {}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_owned();
    let out = env
        .celerity(&["result", &id, "--wait", "--timeout", "60"])
        .await;
    assert!(
        out.status.success(),
        "celerity result: {}",
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout).trim(), "42");
    let out = env.celerity(&["result", &id, "--json"]).await;
    assert!(
        out.status.success(),
        "celerity result --json: {}",
        text(&out.stderr)
    );
    let doc: Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert_eq!(
        (&doc["status"], &doc["result"]),
        (&json!("SUCCESS"), &json!(42))
    );
    let out = env
        .celerity(&[
            "call",
            "demo.fail",
            "--args",
            r#"["cli ✗"]"#,
            "-Q",
            &env.queue,
            "--wait",
            "--timeout",
            "60",
        ])
        .await;
    assert!(!out.status.success(), "a failed job is a failing exit");
    assert!(
        text(&out.stderr).contains("ValueError: cli ✗"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_both_ways_redis() {
    cli_both_ways(Kind::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_both_ways_rabbitmq() {
    cli_both_ways(Kind::Amqp).await;
}
