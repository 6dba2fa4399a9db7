//! The janitor: deletes expired results from a result backend that does not expire them by itself
//! (PostgreSQL), as Celery beat's daily `celery.backend_cleanup` does. Each worker process runs one
//! round every [`crate::WorkerConfig::cleanup_every`] (an hour by default); the delete is keyed on
//! `date_done`, so rounds from many processes at once only repeat a cheap query. A failed round is
//! logged and the next one tries again; it never touches a job.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use celerity_broker::ResultBackend;

/// The running janitor of one worker process.
pub(crate) struct Janitor {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Janitor {
    /// Starts the loop: the first round after `every`, then one every `every`.
    pub(crate) fn start(backend: Arc<dyn ResultBackend>, every: Duration) -> Self {
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(backend, every, stop.clone()));
        Janitor { stop, task }
    }

    /// Stops the loop (a round under way is abandoned: the delete is one statement, all or nothing).
    pub(crate) async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

async fn run(backend: Arc<dyn ResultBackend>, every: Duration, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            outcome = backend.cleanup() => exec_done(backend.backend(), outcome),
        }
    }
}

/// Logs one round's outcome.
fn exec_done(backend: &str, outcome: celerity_broker::Result<u64>) {
    match outcome {
        Ok(0) => {}
        Ok(n) => tracing::info!(backend, deleted = n, "expired results deleted"),
        Err(e) => {
            tracing::warn!(backend, error = %e, "deleting expired results failed; will try again")
        }
    }
}
