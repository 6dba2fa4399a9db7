//! What a task sees and returns: [`TaskContext`], [`TaskError`], per-task [`TaskOptions`], and the
//! [`Handler`] seam the registry stores (a task over JSON arguments).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use celerity_broker::protocol::TaskHeaders;
use celerity_client::Task;

use crate::args::from_call;

/// What a running task knows about its own call.
#[derive(Clone, Debug)]
pub struct TaskContext {
    pub(crate) headers: Arc<TaskHeaders>,
    pub(crate) cancel: CancellationToken,
    pub(crate) queue: Arc<str>,
}

impl TaskContext {
    /// A context for running a task outside a worker (tests, inline calls).
    pub fn detached(headers: TaskHeaders) -> Self {
        TaskContext {
            headers: Arc::new(headers),
            cancel: CancellationToken::new(),
            queue: Arc::from(""),
        }
    }

    /// The task id.
    pub fn id(&self) -> &str {
        &self.headers.id
    }

    /// The registered name.
    pub fn name(&self) -> &str {
        &self.headers.task
    }

    /// How many times this job was retried before this run.
    pub fn retries(&self) -> u32 {
        self.headers.retries
    }

    /// All headers of the message.
    pub fn headers(&self) -> &TaskHeaders {
        &self.headers
    }

    /// The queue the job came from.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Fires when the job is to stop: soft time limit, revoke with terminate, cold shutdown.
    pub fn cancellation(&self) -> &CancellationToken {
        &self.cancel
    }

    /// An error that asks the worker to run the job again after `countdown` (Celery's default is
    /// 180 s when `None`). Use it as `return Err(ctx.retry(Some(Duration::from_secs(5))))`.
    pub fn retry(&self, countdown: Option<Duration>) -> TaskError {
        TaskError::Retry {
            countdown,
            reason: None,
        }
    }
}

/// How a task can end other than with a value.
///
/// Any `std::error::Error` converts into [`TaskError::Failed`] with `?`, named after its type.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskError {
    /// The task failed; stored as a Celery exception (`exc_type`, `exc_message`, `exc_module`).
    Failed {
        exc_type: String,
        message: String,
        module: String,
        causes: Vec<String>,
    },
    /// Run the job again later.
    Retry {
        countdown: Option<Duration>,
        reason: Option<Box<TaskError>>,
    },
}

impl TaskError {
    /// A failure with an exception type name and a message (module `builtins`, like Python's own).
    pub fn new(exc_type: impl Into<String>, message: impl Into<String>) -> Self {
        TaskError::Failed {
            exc_type: exc_type.into(),
            message: message.into(),
            module: "builtins".into(),
            causes: Vec::new(),
        }
    }

    /// A failure whose type lives in another module (e.g. `celery.exceptions`).
    pub fn in_module(
        exc_type: impl Into<String>,
        message: impl Into<String>,
        module: impl Into<String>,
    ) -> Self {
        TaskError::Failed {
            exc_type: exc_type.into(),
            message: message.into(),
            module: module.into(),
            causes: Vec::new(),
        }
    }

    /// The exception type name (`Retry` for retries).
    pub fn exc_type(&self) -> &str {
        match self {
            TaskError::Failed { exc_type, .. } => exc_type,
            TaskError::Retry { .. } => "Retry",
        }
    }
}

impl std::fmt::Display for TaskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TaskError::Failed {
                exc_type, message, ..
            } => write!(f, "{exc_type}: {message}"),
            TaskError::Retry { countdown, .. } => write!(f, "Retry in {countdown:?}"),
        }
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for TaskError {
    fn from(e: E) -> Self {
        let full = std::any::type_name::<E>();
        let short = full.split("::").last().unwrap_or(full);
        let short = short.split('<').next().unwrap_or(short).to_owned();
        let mut causes = Vec::new();
        let mut source = e.source();
        while let Some(s) = source {
            causes.push(s.to_string());
            source = s.source();
        }
        TaskError::Failed {
            exc_type: short,
            message: e.to_string(),
            module: "builtins".into(),
            causes,
        }
    }
}

/// Per-task settings (Celery's task options).
#[derive(Debug, Clone, PartialEq)]
pub struct TaskOptions {
    /// Retries allowed after the first run (`None` = unlimited). Celery's default is 3.
    pub max_retries: Option<u32>,
    /// Countdown of a retry that names none (Celery: 180 s).
    pub default_retry_delay: Duration,
    /// Exponential backoff for automatic retries: `factor * 2^retries`, capped, with full jitter.
    pub retry_backoff: Option<Duration>,
    pub retry_backoff_max: Duration,
    pub retry_jitter: bool,
    /// Exception type names that trigger an automatic retry (`"*"` = any failure).
    pub autoretry_for: Vec<String>,
    /// Cancel the job and fail it after this long.
    pub soft_time_limit: Option<Duration>,
    /// Kill the job's process after this long (enforced by the supervisor).
    pub time_limit: Option<Duration>,
    /// Ack only after the result is stored (default); false acks before running.
    pub acks_late: bool,
    /// Store no result.
    pub ignore_result: bool,
    /// Store STARTED when the job begins.
    pub track_started: bool,
    /// At most this many starts per interval in this process, e.g. "100/s", "10/m".
    pub rate_limit: Option<crate::limits::RateLimit>,
}

impl Default for TaskOptions {
    fn default() -> Self {
        TaskOptions {
            max_retries: Some(3),
            default_retry_delay: Duration::from_secs(180),
            retry_backoff: None,
            retry_backoff_max: Duration::from_secs(600),
            retry_jitter: true,
            autoretry_for: Vec::new(),
            soft_time_limit: None,
            time_limit: None,
            acks_late: true,
            ignore_result: false,
            track_started: false,
            rate_limit: None,
        }
    }
}

/// A task as the registry stores it: takes Celery's JSON arguments, returns a JSON value.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    async fn call(
        &self,
        ctx: TaskContext,
        args: Vec<Value>,
        kwargs: Map<String, Value>,
    ) -> Result<Value, TaskError>;
}

/// A typed task implementation: the client's [`Task`] declaration plus the code that runs it.
pub trait Run: Task {
    /// Runs one job.
    fn run(
        &self,
        ctx: TaskContext,
        args: Self::Args,
    ) -> impl Future<Output = Result<Self::Output, TaskError>> + Send;

    /// This task's options.
    fn options(&self) -> TaskOptions {
        TaskOptions::default()
    }
}

fn bad_arguments(name: &str, e: crate::args::ArgsError) -> TaskError {
    TaskError::new("TypeError", format!("{name}(): {e}"))
}

fn to_value<O: Serialize>(o: O) -> Result<Value, TaskError> {
    serde_json::to_value(o)
        .map_err(|e| TaskError::new("EncodeError", format!("cannot serialize the result: {e}")))
}

pub(crate) struct RunHandler<T>(pub T);

#[async_trait]
impl<T: Run> Handler for RunHandler<T> {
    async fn call(
        &self,
        ctx: TaskContext,
        args: Vec<Value>,
        kwargs: Map<String, Value>,
    ) -> Result<Value, TaskError> {
        let a: T::Args = from_call(&args, &kwargs).map_err(|e| bad_arguments(T::NAME, e))?;
        to_value(self.0.run(ctx, a).await?)
    }
}

pub(crate) struct FnHandler<F, A> {
    pub name: String,
    pub f: F,
    pub _args: std::marker::PhantomData<fn(A)>,
}

#[async_trait]
impl<F, A, O, Fut> Handler for FnHandler<F, A>
where
    F: Fn(TaskContext, A) -> Fut + Send + Sync + 'static,
    A: DeserializeOwned + Send + 'static,
    O: Serialize + Send + 'static,
    Fut: Future<Output = Result<O, TaskError>> + Send + 'static,
{
    async fn call(
        &self,
        ctx: TaskContext,
        args: Vec<Value>,
        kwargs: Map<String, Value>,
    ) -> Result<Value, TaskError> {
        let a: A = from_call(&args, &kwargs).map_err(|e| bad_arguments(&self.name, e))?;
        to_value((self.f)(ctx, a).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_convert_with_their_type_name() {
        let e: TaskError = "x".parse::<i32>().unwrap_err().into();
        assert_eq!(e.exc_type(), "ParseIntError");
        assert!(e.to_string().starts_with("ParseIntError: invalid digit"));
        assert_eq!(
            TaskError::new("ValueError", "bad").to_string(),
            "ValueError: bad"
        );
    }
}
