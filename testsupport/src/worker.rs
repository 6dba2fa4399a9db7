//! Our worker running inside the test's own process (feature `worker`): started on a broker and
//! backend with a registry and config, stopped warm by the test or cancelled when dropped.

use std::sync::Arc;
use std::time::Duration;

use celerity_broker::{Broker, ResultBackend};
use celerity_worker::{demo, run, Registry, Shutdown, Summary, WorkerConfig, WorkerError};
use tokio::task::JoinHandle;

/// A registry with the demo tasks (`demo::register`).
pub fn demo_registry() -> Registry {
    let mut registry = Registry::new();
    demo::register(&mut registry);
    registry
}

/// Our worker as a task of the test's runtime. [`InProcessWorker::stop`] stops it warm and returns
/// its summary; dropping it without stopping cancels it (warm and cold).
pub struct InProcessWorker {
    shutdown: Shutdown,
    handle: Option<JoinHandle<Result<Summary, WorkerError>>>,
}

impl InProcessWorker {
    /// Spawns `celerity_worker::run` with these parts.
    pub fn spawn(
        registry: Registry,
        broker: Arc<dyn Broker>,
        backend: Option<Arc<dyn ResultBackend>>,
        config: WorkerConfig,
    ) -> InProcessWorker {
        let shutdown = Shutdown::default();
        let handle = tokio::spawn(run(registry, broker, backend, config, shutdown.clone()));
        InProcessWorker {
            shutdown,
            handle: Some(handle),
        }
    }

    /// A worker with the demo tasks on `queue`, `concurrency` jobs at once, 5 s of grace.
    pub fn demo(
        broker: Arc<dyn Broker>,
        backend: Option<Arc<dyn ResultBackend>>,
        queue: &str,
        concurrency: usize,
    ) -> InProcessWorker {
        let config = WorkerConfig {
            queues: vec![queue.to_owned()],
            concurrency,
            grace: Duration::from_secs(5),
            ..WorkerConfig::default()
        };
        InProcessWorker::spawn(demo_registry(), broker, backend, config)
    }

    /// Its stop tokens (a test may cancel warm or cold itself).
    pub fn shutdown(&self) -> &Shutdown {
        &self.shutdown
    }

    /// Waits for the worker to end (after the test cancelled it); panics if it failed.
    pub async fn join(mut self) -> Summary {
        let handle = self.handle.take().expect("joined once");
        handle
            .await
            .expect("the worker task panicked")
            .expect("the worker failed")
    }

    /// Warm shutdown; panics if the worker failed.
    pub async fn stop(self) -> Summary {
        self.shutdown.warm.cancel();
        self.join().await
    }

    /// Warm shutdown that must end within `patience`; panics if it does not or the worker failed.
    pub async fn stop_within(self, patience: Duration) -> Summary {
        self.shutdown.warm.cancel();
        tokio::time::timeout(patience, self.join())
            .await
            .expect("our worker stops")
    }
}

impl Drop for InProcessWorker {
    fn drop(&mut self) {
        if self.handle.is_some() {
            self.shutdown.warm.cancel();
            self.shutdown.cold.cancel();
        }
    }
}
