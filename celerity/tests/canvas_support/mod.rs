//! What the two canvas interop suites share: where both sides connect (a queue and Redis key prefix
//! of the run's own), the Python side's commands (`tests/python`, the pinned Celery venv), and a
//! worker of each kind on the run's queue.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::task::JoinHandle;

use celerity_broker::{connect_backend, connect_broker};
use celerity_client::{Client, Signature};
use celerity_testsupport::{delete_amqp_queue, delete_redis_prefix, demo_registry, ChildGuard};
use celerity_testsupport::{AMQP, REDIS};
use celerity_worker::{Shutdown, Summary, WorkerConfig, WorkerError};
pub const WAIT: Option<Duration> = Some(Duration::from_secs(60));

fn python_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python")
}

/// A signature with positional arguments given as a JSON array.
pub fn s(task: &str, args: Value) -> Signature {
    Signature::new(
        task,
        args.as_array().cloned().unwrap_or_default(),
        Map::new(),
    )
}

/// Where both sides connect, and which Python driver script the suite runs.
#[derive(Clone)]
pub struct Setup {
    pub broker: String,
    pub backend: String,
    pub prefix: String,
    pub queue: String,
    driver: &'static str,
}

impl Setup {
    /// A fresh queue `<tag>-<uuid>` (also the Redis key prefix), on RabbitMQ or on Redis.
    pub fn new(amqp: bool, tag: &str, driver: &'static str) -> Setup {
        let queue = celerity_testsupport::unique(tag);
        let prefix = format!("{queue}:");
        let redis = format!("{REDIS}?global_keyprefix={prefix}");
        Setup {
            broker: if amqp { AMQP.to_owned() } else { redis.clone() },
            backend: redis,
            prefix,
            queue,
            driver,
        }
    }

    /// The venv's Python in `tests/python`, told where to connect.
    pub fn python(&self, python: &Path) -> Command {
        let mut c = Command::new(python);
        c.current_dir(python_dir())
            .env("PYTHONPATH", python_dir())
            .env(
                "CANVAS_BROKER",
                self.broker.split('?').next().unwrap_or_default(),
            )
            .env("CANVAS_BACKEND", REDIS)
            .env("CANVAS_PREFIX", &self.prefix)
            .env("CANVAS_QUEUE", &self.queue)
            .stdin(Stdio::null());
        c
    }

    /// Runs the driver script with `args`; its last stdout line, as JSON.
    pub async fn driver(&self, python: &Path, args: &[&str]) -> Value {
        let mut cmd = self.python(python);
        cmd.arg(self.driver).args(args);
        let (script, args) = (self.driver, format!("{args:?}"));
        tokio::task::spawn_blocking(move || {
            let out = cmd.output().unwrap_or_else(|e| panic!("run {script}: {e}"));
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{script} {args} failed: {}\n{stdout}",
                String::from_utf8_lossy(&out.stderr)
            );
            serde_json::from_str(stdout.lines().last().unwrap_or_default())
                .unwrap_or_else(|e| panic!("{e}: {stdout}"))
        })
        .await
        .unwrap()
    }

    pub async fn client(&self) -> Client {
        Client::new(
            connect_broker(&self.broker).await.unwrap(),
            Some(connect_backend(&self.backend).await.unwrap()),
        )
    }

    /// Our worker with the demo tasks on the run's queue (4 jobs at once); stop it with the
    /// returned `Shutdown`.
    pub fn our_worker(
        &self,
        client: &Client,
    ) -> (JoinHandle<Result<Summary, WorkerError>>, Shutdown) {
        let registry = demo_registry();
        let shutdown = Shutdown::default();
        let worker = tokio::spawn(celerity_worker::run(
            registry,
            client.broker().clone(),
            client.backend().cloned(),
            WorkerConfig {
                queues: vec![self.queue.clone()],
                concurrency: 4,
                grace: Duration::from_secs(5),
                ..WorkerConfig::default()
            },
            shutdown.clone(),
        ));
        (worker, shutdown)
    }

    /// A Python worker (`celery -A canvas_app worker`, 4 threads) on the run's queue.
    pub fn python_worker(&self, python: &Path) -> PythonWorker {
        PythonWorker(ChildGuard::spawn(
            self.python(python)
                .args(["-m", "celery", "-A", "canvas_app", "worker"])
                .args([
                    "-Q",
                    &self.queue,
                    "--pool",
                    "threads",
                    "-c",
                    "4",
                    "-l",
                    "warning",
                ])
                .stdout(Stdio::null()),
            "the Python worker",
        ))
    }

    pub async fn cleanup(&self) {
        if self.broker.starts_with("amqp") {
            delete_amqp_queue(&self.queue).await;
        }
        delete_redis_prefix(&self.prefix).await;
    }
}

/// A Python worker process, killed (by its pid) when dropped.
pub struct PythonWorker(#[allow(dead_code)] ChildGuard);
