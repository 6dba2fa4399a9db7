//! Result handles: the state and value of one job, read from the result backend.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;

use celerity_broker::{BrokerError, ResultBackend, State, TaskMeta};

use crate::error::{ClientError, Result};

/// A handle on one job's result. `T` is the type [`AsyncResult::get`] returns (`Value` when untyped).
pub struct AsyncResult<T> {
    pub(crate) id: String,
    pub(crate) backend: Option<Arc<dyn ResultBackend>>,
    pub(crate) _output: PhantomData<fn() -> T>,
}

impl<T> Clone for AsyncResult<T> {
    fn clone(&self) -> Self {
        AsyncResult {
            id: self.id.clone(),
            backend: self.backend.clone(),
            _output: PhantomData,
        }
    }
}

impl<T> std::fmt::Debug for AsyncResult<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncResult").field("id", &self.id).finish()
    }
}

impl<T> AsyncResult<T> {
    /// A handle on the result of job `task_id` stored in `backend`, with no broker: reading a
    /// result needs only the backend (as `celery result` does).
    pub fn from_backend(task_id: &str, backend: Arc<dyn ResultBackend>) -> AsyncResult<T> {
        AsyncResult {
            id: task_id.to_owned(),
            backend: Some(backend),
            _output: PhantomData,
        }
    }

    /// The task id.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn backend(&self) -> Result<&Arc<dyn ResultBackend>> {
        self.backend.as_ref().ok_or(ClientError::NoBackend)
    }

    /// The full stored meta (status, result, traceback, …); PENDING when nothing is stored.
    pub async fn meta(&self) -> Result<TaskMeta> {
        Ok(self.backend()?.get(&self.id).await?)
    }

    /// The current state.
    pub async fn state(&self) -> Result<State> {
        Ok(self.meta().await?.status)
    }

    /// True once the job succeeded, failed or was revoked.
    pub async fn ready(&self) -> Result<bool> {
        Ok(self.state().await?.is_ready())
    }

    /// Waits for the job to be ready and returns its meta, whatever the outcome.
    pub async fn wait_meta(&self, timeout: Option<Duration>) -> Result<TaskMeta> {
        match self.backend()?.wait(&self.id, timeout).await {
            Ok(meta) => Ok(meta),
            Err(BrokerError::Timeout(d)) => Err(ClientError::Timeout(d)),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes the stored result.
    pub async fn forget(&self) -> Result<()> {
        Ok(self.backend()?.forget(&self.id).await?)
    }

    /// The same handle with another output type.
    pub fn typed<U>(self) -> AsyncResult<U> {
        AsyncResult {
            id: self.id,
            backend: self.backend,
            _output: PhantomData,
        }
    }
}

impl<T: DeserializeOwned> AsyncResult<T> {
    /// Waits (at most `timeout`; `None` = forever) for the job to finish and returns its value.
    /// A failed job is [`ClientError::TaskFailed`] with the task's exception, a revoked one
    /// [`ClientError::Revoked`].
    pub async fn get(&self, timeout: Option<Duration>) -> Result<T> {
        let meta = self.wait_meta(timeout).await?;
        outcome(meta)
    }
}

/// Turns a ready meta into the value or the error it stands for.
pub fn outcome<T: DeserializeOwned>(meta: TaskMeta) -> Result<T> {
    match meta.status {
        State::Success => serde_json::from_value(meta.result).map_err(|e| {
            ClientError::Serde(format!(
                "result of task {} has an unexpected type: {e}",
                meta.task_id
            ))
        }),
        State::Revoked => Err(ClientError::Revoked {
            task_id: meta.task_id,
        }),
        _ => {
            let exception = meta.exception().unwrap_or_else(|| {
                celerity_broker::backend::ExceptionInfo::new(
                    "UnknownError",
                    match &meta.result {
                        Value::Null => format!("task ended in state {}", meta.status),
                        v => v.to_string(),
                    },
                    "celery.exceptions",
                )
            });
            Err(ClientError::TaskFailed {
                task_id: meta.task_id,
                exception,
                traceback: meta.traceback,
            })
        }
    }
}
