//! Where a worker process writes outcomes: the result backend (if any), with the one
//! store-with-retry loop the processor and the workflow steps share, and the result documents Celery
//! stores for a job's states.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use celerity_broker::backend::ExceptionInfo;
use celerity_broker::protocol::TaskMessage;
use celerity_broker::{ResultBackend, State, TaskMeta};

/// Attempts at one backend write before it is given up.
pub(crate) const ATTEMPTS: u32 = 5;

/// The result backend of one worker process (none: results are not kept).
#[derive(Clone)]
pub(crate) struct ResultStore {
    backend: Option<Arc<dyn ResultBackend>>,
    /// Our node name, written into the results of jobs we ran.
    hostname: String,
}

impl ResultStore {
    pub fn new(backend: Option<Arc<dyn ResultBackend>>, hostname: String) -> Self {
        ResultStore { backend, hostname }
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
    pub async fn store_outcome(&self, mut meta: TaskMeta) {
        if self.backend.is_none() {
            return;
        }
        meta.extra
            .entry("worker")
            .or_insert_with(|| Value::String(self.hostname.clone()));
        self.store(&meta).await;
    }

    /// Stores `meta`, retrying a failed write a few times with a growing pause; the job's message
    /// stays unacked meanwhile.
    pub async fn store(&self, meta: &TaskMeta) {
        let Some(backend) = &self.backend else { return };
        for attempt in 0..ATTEMPTS {
            match backend.store(meta).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(id = meta.task_id, error = %e, attempt, "storing a result failed");
                    tokio::time::sleep(retry_delay(attempt)).await;
                }
            }
        }
        tracing::error!(id = meta.task_id, "giving up storing a result");
    }

    /// The final state the backend already holds for this id, if any (a redelivery of a job that
    /// ended, e.g. one whose process was killed for its hard time limit, or whose ack was lost).
    pub async fn finished(&self, id: &str) -> Option<TaskMeta> {
        let backend = self.backend.as_ref()?;
        backend.get(id).await.ok().filter(|m| m.status.is_ready())
    }
}

/// The pause before retry `attempt` (0-based) of a backend call.
pub(crate) fn retry_delay(attempt: u32) -> Duration {
    Duration::from_millis(100u64 << attempt.min(6))
}

/// The meta Celery stores for a state of this message (with group_id/parent_id when set).
pub(crate) fn meta(
    message: &TaskMessage,
    status: State,
    result: Value,
    traceback: Option<String>,
) -> TaskMeta {
    let mut m = TaskMeta::with_state(message.id(), status, result);
    m.traceback = traceback;
    if let Some(g) = &message.headers.group {
        m.extra.insert("group_id".into(), Value::String(g.clone()));
    }
    if let Some(p) = &message.headers.parent_id {
        m.extra.insert("parent_id".into(), Value::String(p.clone()));
    }
    m
}

/// The FAILURE meta of this message.
pub(crate) fn failure_meta(
    message: &TaskMessage,
    exc: &ExceptionInfo,
    traceback: Option<String>,
) -> TaskMeta {
    meta(message, State::Failure, exc.to_value(), traceback)
}
