//! The error type of the client crate.

use std::time::Duration;

use celerity_broker::backend::ExceptionInfo;
use celerity_broker::BrokerError;

/// What can go wrong sending a job or reading its result.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The broker or backend failed (connection, protocol, …).
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The job ran and failed; carries the task's exception as Celery stores it.
    #[error("task {task_id} failed: {exception}")]
    TaskFailed {
        task_id: String,
        exception: ExceptionInfo,
        traceback: Option<String>,
    },
    /// The job was revoked (or expired) and will not run.
    #[error("task {task_id} was revoked")]
    Revoked { task_id: String },
    /// The result did not become ready in time.
    #[error("timed out after {0:?} waiting for the result")]
    Timeout(Duration),
    /// Results were asked for but no result backend is configured.
    #[error("no result backend configured (pass --backend / CELERITY_RESULT_BACKEND, or a redis:// broker)")]
    NoBackend,
    /// Arguments or a result could not be converted to or from JSON.
    #[error("{0}")]
    Serde(String),
    /// An option or argument is not valid.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A chord (or a group chained to a task, which Celery turns into a chord) was sent through a
    /// result backend that cannot join one (`rpc://`, as in Celery). Nothing was sent.
    #[error("the {backend}:// result backend cannot join a chord (nor a group chained to a task, which is a chord), as in Celery: nothing was sent; use a redis:// or db+postgresql:// result backend for chords")]
    ChordsUnsupported { backend: &'static str },
    /// Some members of a group failed or were revoked; each one is named.
    #[error("group {group_id}: {} of {total} member(s) failed: {}", failed.len(), MemberFailure::list(failed))]
    GroupFailed {
        group_id: String,
        total: usize,
        failed: Vec<MemberFailure>,
    },
}

/// One failed member of a group.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberFailure {
    /// Position in the group.
    pub index: usize,
    pub task_id: String,
    pub state: celerity_broker::State,
    pub exception: ExceptionInfo,
}

impl MemberFailure {
    fn list(failed: &[MemberFailure]) -> String {
        failed
            .iter()
            .map(|f| format!("#{} {} {}: {}", f.index, f.task_id, f.state, f.exception))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Result alias of this crate.
pub(crate) type Result<T, E = ClientError> = std::result::Result<T, E>;
