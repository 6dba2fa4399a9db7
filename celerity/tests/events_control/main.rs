//! Celery events and remote control against the real thing, on Redis and on RabbitMQ:
//!
//! - our worker with task events on → a Python `app.events.Receiver` feeding `app.events.State`
//!   (what Flower and `celery events` run) lists our node as alive and our jobs with their events
//!   (sent/received/started/succeeded, failed, retried, revoked) and final states;
//! - Python's `celery inspect ping` (the real CLI) and `app.control.inspect().registered()/active()`
//!   get answers from our worker;
//! - `celerity inspect ping/registered/revoked` (the real binary) is answered by a Python Celery
//!   worker (which learned our revoked ids at startup through mingle's `hello`), and by ours; `celerity control rate-limit` / `pool-grow` change our worker, as `inspect stats` and
//!   `inspect registered` then show.
//!
//! - `celerity worker -P 2` shows up as two nodes, one per child process;
//! - Flower 2.2 (its own venv, `scripts/flower-venv.sh`) lists our node online with its registered
//!   tasks, pool and queues, and our job as SUCCESS with its result.
//!
//! Every test has its own node name and queue (and on Redis its own `global_keyprefix`, deleted at
//! the end). `CELERITY_NO_PYTHON=1` skips the Python halves; otherwise a missing Celery venv fails.
//!
//! One module per behaviour: `events`, `python_inspect`, `celerity_control`, `pool_and_flower`; each
//! check runs once per transport from the `redis` and `amqp` modules at the end of this file, which
//! also holds the harness they share.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use celerity_broker::protocol::event::EVENT_EXCHANGE;
use celerity_broker::{connect_broker, Broker};
use celerity_client::control::Target;
use celerity_client::{Client, Expires, SendOptions};
use celerity_testsupport::{celery_python, demo_registry, Cleanup, InProcessWorker, Transport};
use celerity_testsupport::{AMQP, PY_AMQP, REDIS};
use celerity_worker::events::EventsConfig;
use celerity_worker::WorkerConfig;
use serde_json::{json, Map, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

/// A bound so a broken test fails instead of hanging (not a speed assertion).
const PATIENCE: Duration = Duration::from_secs(30);

/// One test's names; cleans up on drop.
struct Env {
    transport: Transport,
    uid: String,
    queue: String,
}

impl Env {
    fn new(transport: Transport) -> Self {
        let uid = uuid::Uuid::new_v4().simple().to_string();
        Env {
            transport,
            queue: format!("evctl-{uid}"),
            uid,
        }
    }

    fn prefix(&self) -> String {
        format!("evctl:{}:", self.uid)
    }

    fn url(&self) -> String {
        match self.transport {
            Transport::Redis => format!("{REDIS}?global_keyprefix={}", self.prefix()),
            Transport::Amqp => AMQP.into(),
        }
    }

    /// Broker URL and key prefix as Python takes them.
    fn python_broker(&self) -> (String, String) {
        match self.transport {
            Transport::Redis => (REDIS.into(), self.prefix()),
            Transport::Amqp => (PY_AMQP.into(), String::new()),
        }
    }

    /// Our worker's node name.
    fn node(&self) -> String {
        format!("rs-{}@test", self.uid)
    }

    async fn broker(&self) -> Arc<dyn Broker> {
        connect_broker(&self.url()).await.unwrap()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let cleanup = match self.transport {
            Transport::Redis => Cleanup::new().redis_prefix(self.prefix()),
            Transport::Amqp => Cleanup::new()
                .amqp_queue(self.queue.clone())
                .amqp_queue(format!("{}-py", self.queue)),
        };
        drop(cleanup);
    }
}

/// Our worker in this process (demo tasks, task events on), stopped warm on [`OurWorker::stop`].
struct OurWorker(InProcessWorker);

impl OurWorker {
    async fn start(env: &Env, concurrency: usize) -> OurWorker {
        Self::start_with(env, |c| c.concurrency = concurrency).await
    }

    /// Starts with the test defaults changed by `adjust`.
    async fn start_with(env: &Env, adjust: impl FnOnce(&mut WorkerConfig)) -> OurWorker {
        let mut config = WorkerConfig {
            queues: vec![env.queue.clone()],
            concurrency: 2,
            hostname: env.node(),
            // Long enough for a job held by a rate limit to get its turn during a warm stop.
            grace: Duration::from_secs(30),
            events: EventsConfig {
                task_events: true,
                heartbeat: true,
            },
            ..WorkerConfig::default()
        };
        adjust(&mut config);
        let worker = OurWorker(InProcessWorker::spawn(
            demo_registry(),
            env.broker().await,
            None,
            config,
        ));
        worker.wait_until_answering(env).await;
        worker
    }

    /// Pings until the worker's remote control answers (it subscribes as it starts).
    async fn wait_until_answering(&self, env: &Env) {
        let client = Client::new(env.broker().await, None);
        let target = Target {
            destination: vec![env.node()],
            timeout: Duration::from_millis(500),
        };
        let until = tokio::time::Instant::now() + PATIENCE;
        loop {
            let replies = client
                .control_call("ping", Map::new(), &target)
                .await
                .unwrap();
            if !replies.is_empty() {
                assert_eq!(replies[0].node, env.node());
                assert_eq!(replies[0].value, json!({"ok": "pong"}));
                return;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "our worker never answered ping"
            );
        }
    }

    async fn stop(self) -> celerity_worker::Summary {
        self.0.stop().await
    }
}

/// Runs the real `celerity` binary; returns (exit ok, stdout).
async fn celerity(env: &Env, args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_celerity"))
        .arg("--broker")
        .arg(env.url())
        .args(args)
        .env_remove("CELERITY_BROKER_URL")
        .env_remove("CELERITY_RESULT_BACKEND")
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Runs `celerity inspect|control … --json -d <node>` and returns that node's reply.
async fn celerity_json(env: &Env, node: &str, args: &[&str]) -> Value {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--json", "-d", node, "-t", "10"]);
    let (ok, out) = celerity(env, &all).await;
    assert!(ok, "celerity {args:?} failed: {out}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    v[node].clone()
}

/// A module the `celery` CLI can load with `-A`.
const PY_APP: &str = r#"
import os
from celery import Celery
app = Celery('evctl_app', broker=os.environ['EVCTL_BROKER'])
if os.environ.get('EVCTL_PREFIX'):
    app.conf.broker_transport_options = {'global_keyprefix': os.environ['EVCTL_PREFIX']}

@app.task(name='py.add')
def add(x, y):
    return x + y
"#;

/// A directory holding the app module (removed on drop).
struct PyApp(std::path::PathBuf);

impl PyApp {
    fn new(env: &Env) -> Self {
        let dir = std::env::temp_dir().join(format!("evctl-{}", env.uid));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("evctl_app.py"), PY_APP).unwrap();
        PyApp(dir)
    }

    /// `celery` of the venv, in the app's directory, pointed at this test's broker.
    fn celery(&self, python: &std::path::Path, env: &Env) -> tokio::process::Command {
        let (url, prefix) = env.python_broker();
        let mut c = tokio::process::Command::new(python.with_file_name("celery"));
        c.current_dir(&self.0)
            .env("EVCTL_BROKER", url)
            .env("EVCTL_PREFIX", prefix)
            .args(["-A", "evctl_app"]);
        c
    }
}

impl Drop for PyApp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

mod celerity_control;
mod events;
mod pool_and_flower;
mod python_inspect;
use celerity_control::*;
use events::*;
use pool_and_flower::*;
use python_inspect::*;

mod redis {
    use super::*;

    fn env() -> Env {
        Env::new(Transport::Redis)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn scheduled_jobs_are_listed() {
        super::scheduled_jobs_are_listed(env()).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn flower_lists_our_worker() {
        super::flower_lists_our_worker(env()).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn pool_children_are_nodes() {
        super::pool_children_are_nodes(env()).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn events_reach_a_python_receiver() {
        super::events_reach_a_python_receiver(env()).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn python_inspects_our_worker() {
        super::python_inspects_our_worker(env()).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn celerity_inspects_a_python_worker() {
        super::celerity_inspects_a_python_worker(env()).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn celerity_controls_our_worker() {
        super::celerity_controls_our_worker(env()).await
    }
}

mod amqp {
    use super::*;

    fn env() -> Env {
        Env::new(Transport::Amqp)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn scheduled_jobs_are_listed() {
        super::scheduled_jobs_are_listed(env()).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn flower_lists_our_worker() {
        super::flower_lists_our_worker(env()).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn pool_children_are_nodes() {
        super::pool_children_are_nodes(env()).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn events_reach_a_python_receiver() {
        super::events_reach_a_python_receiver(env()).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn python_inspects_our_worker() {
        super::python_inspects_our_worker(env()).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn celerity_inspects_a_python_worker() {
        super::celerity_inspects_a_python_worker(env()).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn celerity_controls_our_worker() {
        super::celerity_controls_our_worker(env()).await
    }
}
