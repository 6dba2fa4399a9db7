//! The result backend seam, task states and Celery's result meta document.
//!
//! A worker stores a [`TaskMeta`] for each state change of a task; a client reads it back or waits for
//! it to become ready. The document is Celery's (`status`, `result`, `traceback`, `children`,
//! `date_done`, `task_id`, plus `group_id`/`parent_id`/extended fields), so Python's
//! `AsyncResult(id).get()` reads what we store and we read what Celery stores.

pub mod chord;
pub mod memory;
mod memory_chord;
pub mod meta;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "amqp")]
pub mod rpc;

use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::BoxFuture;

use crate::error::Result;

pub use chord::{ChordEntry, ChordJoin, ChordPart};
pub use meta::{ExceptionInfo, ReplyTo, State, TaskMeta};

/// Default time a stored result lives (Celery's `result_expires`: one day).
pub const DEFAULT_RESULT_EXPIRES: Duration = Duration::from_secs(86_400);

/// Where task results live.
#[async_trait]
pub trait ResultBackend: Send + Sync + 'static {
    /// A short name for logs: `memory`, `redis`, `rpc`.
    fn backend(&self) -> &'static str;

    /// Called before jobs are sent through a client using this backend (Celery's
    /// `on_task_call`). A backend that receives results as reply messages (`rpc://`) makes sure
    /// its reply queue exists and is consumed, remembers `task_ids` as its own, and returns the
    /// queue the jobs must name as `reply_to`. Others return `None` (the default).
    async fn prepare_send(&self, task_ids: &[&str]) -> Result<Option<String>> {
        let _ = task_ids;
        Ok(None)
    }

    /// False for a backend that cannot join a chord (`rpc://`, as in Celery): clients refuse to
    /// send a chord through it.
    fn joins_chords(&self) -> bool {
        true
    }

    /// Stores one state of a task and notifies waiters. A task whose stored state is already
    /// `SUCCESS` keeps it: later writes for that id are dropped (Celery's guard against duplicate
    /// deliveries). Returns once the write is durable in the backend.
    async fn store(&self, meta: &TaskMeta) -> Result<()>;

    /// Stores many states in as few round trips as the backend allows, with the same rules as
    /// [`ResultBackend::store`].
    async fn store_many(&self, metas: &[TaskMeta]) -> Result<()> {
        for meta in metas {
            self.store(meta).await?;
        }
        Ok(())
    }

    /// The current state of a task; `PENDING` (with a null result) when nothing is stored.
    async fn get(&self, task_id: &str) -> Result<TaskMeta>;

    /// The current states of many tasks, in order, in as few round trips as the backend allows.
    async fn get_many(&self, task_ids: &[String]) -> Result<Vec<TaskMeta>> {
        let mut out = Vec::with_capacity(task_ids.len());
        for id in task_ids {
            out.push(self.get(id).await?);
        }
        Ok(out)
    }

    /// Waits until the task is in a ready state (SUCCESS, FAILURE, REVOKED) and returns it.
    /// Uses the backend's notifications, with a slow poll as a safety net; never a busy loop.
    /// `None` waits forever; on timeout returns [`crate::BrokerError::Timeout`].
    async fn wait(&self, task_id: &str, timeout: Option<Duration>) -> Result<TaskMeta>;

    /// Runs `publish` (the send of the job `task_id`) while already watching for its result, and
    /// returns the result as [`ResultBackend::wait`] does. A backend with notifications starts
    /// listening before the job is sent, so the result is pushed the moment it is stored. A result
    /// that arrives before `publish` has finished (say, before the broker's publish confirm) is
    /// returned at once: the job ran, so the broker had it. An error from `publish` is returned.
    async fn wait_after(
        &self,
        task_id: &str,
        timeout: Option<Duration>,
        publish: BoxFuture<'_, Result<()>>,
    ) -> Result<TaskMeta> {
        publish.await?;
        self.wait(task_id, timeout).await
    }

    /// Deletes what is stored for a task.
    async fn forget(&self, task_id: &str) -> Result<()>;

    /// Closes connections.
    async fn close(&self) -> Result<()>;

    /// Records how many header members a chord waits for (Celery's `set_chord_size`: the `.s` key),
    /// and clears any old claim of a reused group id. Called before the header is sent.
    async fn set_chord_size(&self, group_id: &str, size: usize) -> Result<()>;

    /// Adds a header member's outcome to its chord's join (idempotent per member, see
    /// [`chord`]) and says whether this member completed it.
    async fn chord_part_return(&self, part: &ChordPart) -> Result<ChordJoin>;

    /// Clears a completed join (if `claim` still holds it) and marks the chord done.
    async fn chord_done(&self, group_id: &str, claim: &str) -> Result<()>;

    /// Saves a group's member ids under its id (Celery's `GroupResult.save()`).
    async fn save_group(&self, group_id: &str, task_ids: &[String]) -> Result<()>;

    /// The member ids of a saved group; `None` if nothing is saved.
    async fn restore_group(&self, group_id: &str) -> Result<Option<Vec<String>>>;

    /// Deletes a saved group.
    async fn forget_group(&self, group_id: &str) -> Result<()>;

    /// Deletes results older than the backend's `result_expires`, for a backend whose server does
    /// not expire them by itself (Celery's `backend_cleanup`); returns how many records went. Redis
    /// and RabbitMQ expire results themselves, so the default does nothing.
    async fn cleanup(&self) -> Result<u64> {
        Ok(0)
    }
}
