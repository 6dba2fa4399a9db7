//! Where a worker process writes outcomes: the result backend (if any), and Celery's result
//! documents for a job's states.
//!
//! A job is acked only once its outcome is durable, so a backend write (and the read that tells a
//! redelivered job it already finished) is retried here until it succeeds — with a growing, jittered
//! pause (at most [`RETRY_MAX`]) — for as long as the job holds its delivery. Only a cold shutdown
//! cuts the wait short ([`Interrupted`]); the job is then given back to the broker, never acked. A
//! backend outage therefore holds jobs in their slots (the fetcher takes no more than the slots
//! allow) and loses none.

use std::future::Future;
use std::time::Duration;

use serde_json::Value;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

use celerity_broker::backend::{ExceptionInfo, ReplyTo};
use celerity_broker::backoff::Backoff;
use celerity_broker::protocol::TaskMessage;
use celerity_broker::{ResultBackend, State, TaskMeta};

use crate::metrics::WorkerMetrics;

/// The first pause before a backend call is tried again.
pub(crate) const RETRY_BASE: Duration = Duration::from_millis(100);
/// The longest pause between two tries.
pub(crate) const RETRY_MAX: Duration = Duration::from_secs(10);
/// Tries logged one by one before only every tenth is.
const LOGGED_TRIES: u32 = 5;

/// A backend call was cut short by a cold shutdown: the job must be given back, not acked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("interrupted by shutdown while the result backend was unavailable")]
pub(crate) struct Interrupted;

/// The result backend of one worker process (none: results are not kept).
#[derive(Clone)]
pub(crate) struct ResultStore {
    backend: Option<Arc<dyn ResultBackend>>,
    /// Our node name, written into the results of jobs we ran.
    hostname: String,
    /// Fired on cold shutdown: stop waiting for the backend.
    abort: CancellationToken,
    /// Where store latencies and sent messages are counted (metrics on).
    metrics: Option<Arc<WorkerMetrics>>,
}

impl ResultStore {
    pub fn new(
        backend: Option<Arc<dyn ResultBackend>>,
        hostname: String,
        abort: CancellationToken,
        metrics: Option<Arc<WorkerMetrics>>,
    ) -> Self {
        ResultStore {
            backend,
            hostname,
            abort,
            metrics,
        }
    }

    /// The metrics jobs count into, if on.
    pub fn metrics(&self) -> Option<&Arc<WorkerMetrics>> {
        self.metrics.as_ref()
    }

    /// Our node name.
    pub fn hostname(&self) -> &str {
        &self.hostname
    }

    /// The backend, for the workflow steps that need more than a store (chord joins, reads).
    pub fn backend(&self) -> Option<&Arc<dyn ResultBackend>> {
        self.backend.as_ref()
    }

    /// Stores the outcome of a job this worker ran, naming this node as its `worker` (Celery's
    /// extended-result field; Python: `AsyncResult.worker`).
    pub async fn store_outcome(&self, mut meta: TaskMeta) -> Result<(), Interrupted> {
        if self.backend.is_none() {
            return Ok(());
        }
        meta.extra
            .entry("worker")
            .or_insert_with(|| Value::String(self.hostname.clone()));
        self.store(&meta).await
    }

    /// Stores `meta`, trying until the backend takes it (see the module doc).
    pub async fn store(&self, meta: &TaskMeta) -> Result<(), Interrupted> {
        let Some(backend) = &self.backend else {
            return Ok(());
        };
        self.until_done("storing a result", &meta.task_id, || async {
            let started = std::time::Instant::now();
            let r = backend.store(meta).await;
            if let (Ok(()), Some(m)) = (&r, &self.metrics) {
                m.result_store.observe(started.elapsed());
            }
            r
        })
        .await
    }

    /// The final state the backend already holds for this id, if any (a redelivery of a job that
    /// ended, e.g. one whose process was killed for its hard time limit, or whose ack was lost).
    /// Read until the backend answers: an unanswered read is not "not finished".
    pub async fn finished(&self, id: &str) -> Result<Option<TaskMeta>, Interrupted> {
        let Some(backend) = &self.backend else {
            return Ok(None);
        };
        let meta = self
            .until_done("reading a result", id, || backend.get(id))
            .await?;
        Ok(Some(meta).filter(|m| m.status.is_ready()))
    }

    /// Runs `call` until it succeeds or a cold shutdown comes.
    async fn until_done<T, F, Fut>(&self, what: &str, id: &str, call: F) -> Result<T, Interrupted>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = celerity_broker::Result<T>>,
    {
        let mut backoff = Backoff::new(RETRY_BASE, RETRY_MAX);
        loop {
            match call().await {
                Ok(v) => {
                    if backoff.attempts() > 0 {
                        tracing::info!(id, tries = backoff.attempts() + 1, "{what} succeeded");
                    }
                    return Ok(v);
                }
                Err(e) => {
                    let pause = backoff.next();
                    let tries = backoff.attempts();
                    if tries <= LOGGED_TRIES || tries.is_multiple_of(10) {
                        tracing::warn!(id, error = %e, tries, retry_in_ms = pause.as_millis() as u64, "{what} failed; the job keeps its delivery and tries again");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = self.abort.cancelled() => return Err(Interrupted),
                    }
                }
            }
        }
    }
}

/// The meta Celery stores for a state of this message (with group_id/parent_id when set), with
/// the message's reply address (`reply_to`, `correlation_id` or else the task id) for a backend
/// that answers the sender directly (`rpc://`).
pub(crate) fn meta(
    message: &TaskMessage,
    status: State,
    result: Value,
    traceback: Option<String>,
) -> TaskMeta {
    let mut m = TaskMeta::with_state(message.id(), status, result);
    m.traceback = traceback;
    m.reply = reply_to(message);
    if let Some(g) = &message.headers.group {
        m.extra.insert("group_id".into(), Value::String(g.clone()));
    }
    if let Some(p) = &message.headers.parent_id {
        m.extra.insert("parent_id".into(), Value::String(p.clone()));
    }
    m
}

/// Where the sender of `message` listens for its result, if it said.
pub(crate) fn reply_to(message: &TaskMessage) -> Option<ReplyTo> {
    let queue = message
        .properties
        .reply_to
        .clone()
        .filter(|q| !q.is_empty())?;
    let correlation_id = message
        .properties
        .correlation_id
        .clone()
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| message.id().to_owned());
    Some(ReplyTo {
        queue,
        correlation_id,
    })
}

/// The FAILURE meta of this message.
pub(crate) fn failure_meta(
    message: &TaskMessage,
    exc: &ExceptionInfo,
    traceback: Option<String>,
) -> TaskMeta {
    meta(message, State::Failure, exc.to_value(), traceback)
}
