//! The processor: takes one delivery from decode to settle, in phases that each have a file:
//!
//! - [`admit`](self::admit): decode (undecodable → dead-lettered), skip what is finished, revoked,
//!   unknown or expired, wait for the ETA (or park it on the broker), then for the rate limit and a
//!   free slot;
//! - [`invoke`](self::invoke): run the task's handler under its soft time limit, renewing the
//!   delivery's lease, reporting a hard time limit to the supervisor, stopped by a cold shutdown or a
//!   revoke with terminate;
//! - [`finish`](self::finish): on success send the workflow's next steps and store SUCCESS; on
//!   failure retry or store FAILURE and run the failure steps; count the outcome; then settle.
//!
//! The message is acked only after its outcome is stored (acks late), so a process that dies
//! mid-job leaves the job to be delivered again. Bad input never takes the worker down: an
//! undecodable message is copied to the dead-letter queue and acked, and so is one whose body is
//! over the broker's `max_message_size` (not parsed; only its first 64 KiB kept); an unknown task or arguments of
//! the wrong type fail the job (FAILURE stored) and ack it; a panic in a task is a FAILURE.

mod admit;
mod finish;
mod invoke;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use celerity_broker::protocol::TaskMessage;
use celerity_broker::{Broker, Delivery};

use crate::events::EventSender;
use crate::jobs::{JobGuard, Jobs};
use crate::limits::RateLimits;
use crate::metrics::{inc, TaskCounters, WorkerMetrics};
use crate::registry::{Registered, Registry};
use crate::report::Reporter;
use crate::results::ResultStore;

use self::finish::{Next, Settle};
use self::invoke::Ran;

/// Where undecodable and oversized messages are copied before they are acked, unless
/// [`crate::WorkerConfig::dead_letter_queue`] names another queue.
pub const DEAD_LETTER_QUEUE: &str = "celerity.deadletter";

/// Shared by every job of one worker process.
pub(crate) struct Processor {
    pub registry: Arc<Registry>,
    pub broker: Arc<dyn Broker>,
    pub results: ResultStore,
    /// Running jobs at once.
    pub slots: Arc<Semaphore>,
    pub buckets: Arc<RateLimits>,
    /// Celery events (task events only when enabled).
    pub events: EventSender,
    /// Asks the fetcher to widen (+1) or narrow (-1) the prefetch window while a job waits for its ETA.
    pub window: mpsc::UnboundedSender<isize>,
    /// Fired on cold shutdown: running jobs stop and are given back.
    pub abort: CancellationToken,
    /// The in-flight state: held jobs, revoked ids, counters.
    pub jobs: Arc<Jobs>,
    /// In a supervised child: where to report jobs that have a hard time limit, so the supervisor can
    /// kill this process when one overruns.
    pub reporter: Option<Reporter>,
    /// A job due later than this is parked on the broker (where it can) instead of held here.
    pub park_after: Duration,
    /// Where undecodable and oversized messages go ([`DEAD_LETTER_QUEUE`] by default).
    pub dead_letter_queue: String,
    /// Where jobs are counted (metrics on).
    pub metrics: Option<Arc<WorkerMetrics>>,
}

/// A job that passed admission and holds a slot: it runs now.
pub(crate) struct Admitted {
    delivery: Delivery,
    message: TaskMessage,
    task: Registered,
    /// Shows the job to `inspect` until the end.
    guard: JobGuard,
    slot: OwnedSemaphorePermit,
}

impl Processor {
    /// Counts into the counters of `message`'s task from `queue`, if metrics are on.
    pub(crate) fn count(&self, message: &TaskMessage, queue: &str, f: impl FnOnce(&TaskCounters)) {
        if let Some(m) = &self.metrics {
            f(&m.task(message.task(), queue));
        }
    }

    /// Processes one delivery to the end. Never panics, never returns an error: problems are stored,
    /// logged and the message is settled.
    pub async fn handle(&self, delivery: Delivery) {
        if let Some(job) = self.admit(delivery).await {
            self.run(job).await;
        }
    }

    async fn run(&self, job: Admitted) {
        let Admitted {
            delivery,
            message,
            task,
            guard,
            slot: _slot,
        } = job;
        let queue = delivery.queue.clone();
        let mut delivery = Some(delivery);
        if !task.options.acks_late {
            if let Some(d) = delivery.take() {
                self.settle(d, Settle::Ack).await;
            }
        }
        let ignore_result = message
            .headers
            .ignore_result
            .unwrap_or(task.options.ignore_result);
        let cancel = self.abort.child_token();
        let finishing = async {
            if task.options.track_started
                && !ignore_result
                && self.store_started(&message).await.is_err()
            {
                return Next::Requeue;
            }
            guard.started(cancel.clone());
            self.count(&message, &queue, |c| inc(&c.started));
            self.events.started(message.id());
            let ran = self.invoke(&message, &task, &queue, &cancel).await;
            self.outcome(ran, &message, &task, &queue, ignore_result)
                .await
        };
        // The delivery's lease is renewed from the start to the stored outcome, however long the
        // result backend makes that take.
        let next = tokio::select! {
            next = finishing => next,
            never = invoke::renew_lease(delivery.as_ref()) => match never {},
        };
        let Some(d) = delivery else { return };
        match next {
            Next::Terminated => Box::pin(self.skip_revoked(d, &message, "terminated")).await,
            next => self.settle(d, next.into()).await,
        }
    }

    /// What to do after a run: store and follow up its outcome.
    async fn outcome(
        &self,
        ran: Ran,
        message: &TaskMessage,
        task: &Registered,
        queue: &str,
        ignore_result: bool,
    ) -> Next {
        match ran {
            Ran::Interrupted => {
                tracing::warn!(
                    id = message.id(),
                    task = message.task(),
                    "interrupted by shutdown; giving it back"
                );
                Next::Requeue
            }
            Ran::Terminated => {
                tracing::warn!(
                    id = message.id(),
                    task = message.task(),
                    "terminated by revoke"
                );
                Next::Terminated
            }
            Ran::Finished(Ok(value), runtime) => {
                self.succeed(message, queue, value, runtime, ignore_result)
                    .await
            }
            Ran::Finished(Err(error), runtime) => {
                self.fail(message, task, queue, error, runtime).await
            }
        }
    }
}
