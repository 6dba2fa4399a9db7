//! Finishing: what happens once a job has an outcome, up to its settle. A success sends the
//! workflow's next steps (before the result is stored, as Celery does), stores SUCCESS and joins
//! its chord; a failure is either retried (the message sent again with `retries + 1` and an ETA,
//! RETRY stored) or stored as FAILURE with the workflow's failure steps. Also here: the jobs that end
//! without running (revoked, dead-lettered) and the settle itself.

use std::time::Duration;

use chrono::Utc;
use serde_json::Value;

use celerity_broker::backend::{ExceptionInfo, ReplyTo};
use celerity_broker::limits::TooLarge;
use celerity_broker::protocol::TaskMessage;
use celerity_broker::{Delivery, Message, State, TaskMeta};

use celerity_client::MAX_DELAY;

use crate::canvas::Canvas;
use crate::jobs::Outcome;
use crate::metrics::inc;
use crate::registry::Registered;
use crate::results::{failure_meta, meta, Interrupted};
use crate::retry::{decide, random_unit, Decision};
use crate::task::TaskError;

use super::Processor;

/// How much of an oversized body the dead-letter copy keeps.
const DEAD_BODY_KEPT: usize = 64 * 1024;

/// What to do with a finished job's delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Next {
    /// Everything is done and stored: ack.
    Ack,
    /// A workflow step could not be done: give the job back after a pause, to be done again.
    Leave,
    /// A cold shutdown came before the outcome was stored: give the job back now.
    Requeue,
    /// A revoke with terminate stopped it: store REVOKED, then ack.
    Terminated,
}

impl From<Next> for Settle {
    fn from(next: Next) -> Settle {
        match next {
            Next::Ack => Settle::Ack,
            Next::Leave => Settle::Later,
            Next::Requeue => Settle::Requeue,
            // Settled by `skip_revoked`; as a plain settle it is an ack.
            Next::Terminated => Settle::Ack,
        }
    }
}

/// How a delivery is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Settle {
    Ack,
    /// Back to its queue now.
    Requeue,
    /// Back to its queue after [`GIVE_BACK_AFTER`] (sooner on cold shutdown), so a step that keeps
    /// failing is not retried in a tight loop.
    Later,
}

/// About how long a job whose workflow step failed waits before it goes back to its queue.
pub(super) const GIVE_BACK_AFTER: Duration = Duration::from_secs(2);

impl Processor {
    /// The workflow steps of a job that came from `queue`.
    pub(super) fn canvas<'a>(&'a self, queue: &'a str) -> Canvas<'a> {
        Canvas::new(&self.broker, &self.results, queue)
    }

    /// Stores STARTED for a task that tracks it.
    pub(super) async fn store_started(&self, message: &TaskMessage) -> Result<(), Interrupted> {
        let started =
            serde_json::json!({"pid": std::process::id(), "hostname": self.results.hostname()});
        self.results
            .store_outcome(meta(message, State::Started, started, None))
            .await
    }

    /// A run that returned `value`: next workflow steps, SUCCESS stored, chord joined.
    pub(super) async fn succeed(
        &self,
        message: &TaskMessage,
        queue: &str,
        value: Value,
        runtime: Duration,
        ignore_result: bool,
    ) -> Next {
        tracing::info!(
            id = message.id(),
            task = message.task(),
            runtime_ms = runtime.as_secs_f64() * 1e3,
            "succeeded"
        );
        self.events.succeeded(message.id(), &value, runtime);
        let canvas = self.canvas(queue);
        // Callbacks and the next chain step go out before the result is stored (as in Celery).
        let children = match canvas.dispatch_success(message, &value, false).await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(id = message.id(), error = %e, "could not send the workflow's next steps; giving the job back");
                return Next::Leave;
            }
        };
        let joined = message.embed.chord.is_object().then(|| value.clone());
        if !ignore_result {
            let mut m = meta(message, State::Success, value, None);
            m.children = children;
            if self.results.store_outcome(m).await.is_err() {
                return Next::Requeue;
            }
        }
        if let Some(value) = joined {
            let join = canvas.chord_part(message, State::Success, &value);
            if let Err(e) = Box::pin(join).await {
                tracing::error!(id = message.id(), error = %e, "chord join failed; giving the job back");
                return Next::Leave;
            }
        }
        self.jobs.count(Outcome::Succeeded);
        self.count(message, queue, |c| {
            inc(&c.succeeded);
            c.runtime.observe(runtime);
        });
        Next::Ack
    }

    /// A run that ended in `error`: retried or failed, as the task's options decide.
    pub(super) async fn fail(
        &self,
        message: &TaskMessage,
        task: &Registered,
        queue: &str,
        error: TaskError,
        runtime: Duration,
    ) -> Next {
        match decide(error, message.headers.retries, &task.options, random_unit()) {
            Decision::Retry { countdown, cause } => {
                Box::pin(self.retry(message, queue, countdown, &cause)).await
            }
            Decision::Fail(cause) => {
                tracing::warn!(id = message.id(), task = message.task(), runtime_ms = runtime.as_secs_f64() * 1e3, error = %cause, "failed");
                let exc = exception_of(&cause);
                let tb = traceback(message, &cause);
                self.events.failed("task-failed", message.id(), &exc, &tb);
                let stored = self
                    .results
                    .store_outcome(failure_meta(message, &exc, Some(tb.clone())))
                    .await;
                if stored.is_err() {
                    return Next::Requeue;
                }
                self.jobs.count(Outcome::Failed);
                self.count(message, queue, |c| c.failed(&exc.exc_type));
                let canvas = self.canvas(queue);
                if let Err(e) = Box::pin(canvas.on_failure(message, &exc, Some(&tb))).await {
                    tracing::error!(id = message.id(), error = %e, "workflow steps after a failure could not be done; giving the job back");
                    return Next::Leave;
                }
                Next::Ack
            }
        }
    }

    /// Sends the job again with `retries + 1`, due after `countdown`; stores RETRY.
    async fn retry(
        &self,
        message: &TaskMessage,
        queue: &str,
        countdown: Duration,
        cause: &TaskError,
    ) -> Next {
        let mut next = message.clone();
        next.headers.retries = next.headers.retries.saturating_add(1);
        next.headers.eta = Some(retry_eta(Utc::now(), countdown).fixed_offset());
        let started = std::time::Instant::now();
        if let Err(e) = self.broker.publish(queue, &next.encode()).await {
            tracing::error!(id = message.id(), error = %e, "could not send the retry; giving the job back");
            return Next::Leave;
        }
        if let Some(m) = &self.metrics {
            m.publish.observe(started.elapsed());
        }
        tracing::info!(id = message.id(), task = message.task(), retries = next.headers.retries, countdown_s = countdown.as_secs_f64(), reason = %cause, "retry");
        let exc = exception_of(cause);
        let tb = traceback(message, cause);
        self.events.failed("task-retried", message.id(), &exc, &tb);
        let stored = self
            .results
            .store_outcome(meta(message, State::Retry, exc.to_value(), Some(tb)))
            .await;
        if stored.is_err() {
            return Next::Requeue;
        }
        self.jobs.count(Outcome::Retried);
        self.count(message, queue, |c| {
            inc(&c.retried);
            inc(&c.sent);
        });
        Next::Ack
    }

    /// Stores REVOKED for a job that will not run (or was stopped) and acks it.
    pub(super) async fn skip_revoked(&self, delivery: Delivery, message: &TaskMessage, why: &str) {
        tracing::info!(
            id = message.id(),
            task = message.task(),
            why,
            "revoked; not running it"
        );
        self.events
            .revoked(message.id(), why == "terminated", false);
        let exc = ExceptionInfo::new("TaskRevokedError", why, "celery.exceptions");
        let stored = self
            .results
            .store_outcome(meta(message, State::Revoked, exc.to_value(), None))
            .await;
        if stored.is_err() {
            return self.settle(delivery, Settle::Requeue).await;
        }
        self.jobs.count(Outcome::Revoked);
        self.count(message, &delivery.queue, |c| inc(&c.revoked));
        let joined = self
            .canvas(&delivery.queue)
            .chord_part(message, State::Revoked, &exc.to_value())
            .await;
        if let Err(e) = joined {
            tracing::error!(id = message.id(), error = %e, "chord join failed; giving the job back");
            return self.settle(delivery, Settle::Later).await;
        }
        self.settle(delivery, Settle::Ack).await;
    }

    /// Copies an undecodable message to the dead-letter queue with the reason, stores a FAILURE
    /// (`DecodeError`) under its id if it has one, and acks it.
    pub(super) async fn dead_letter(&self, delivery: Delivery, kind: &'static str, reason: String) {
        let kept = delivery.message.clone();
        self.move_to_dead_letters(delivery, kept, kind, reason)
            .await;
    }

    /// A message whose body is over `max_message_size` is not parsed: it is dead-lettered with
    /// only the first [`DEAD_BODY_KEPT`] bytes of its body and its size in `x-celerity-dead-size`,
    /// and fails (`DecodeError` naming the limit) under the id its headers give, if any.
    pub(super) async fn dead_letter_oversized(&self, delivery: Delivery, too_large: TooLarge) {
        let mut kept = delivery.message.clone();
        kept.body.truncate(DEAD_BODY_KEPT);
        kept.headers
            .insert("x-celerity-dead-size".into(), Value::from(too_large.size));
        self.move_to_dead_letters(delivery, kept, "too_large", too_large.to_string())
            .await;
    }

    /// Stores the FAILURE (if the id is known), copies `kept` to the dead-letter queue with the
    /// reason and the queue it came from, then acks; given back if either fails. `kind` labels the
    /// dead-lettered metric.
    async fn move_to_dead_letters(
        &self,
        delivery: Delivery,
        mut kept: Message,
        kind: &'static str,
        reason: String,
    ) {
        let id = delivery.message.task_id().map(str::to_owned);
        let dead = self.dead_letter_queue.as_str();
        tracing::error!(queue = delivery.queue, id = ?id, reason, "message cannot be run (undecodable or too large); moving it to {dead}");
        if let Some(id) = &id {
            let exc = ExceptionInfo::new("DecodeError", reason.clone(), "kombu.exceptions");
            let mut failed = TaskMeta::failure(id.clone(), &exc, None);
            let props = &delivery.message.properties;
            failed.reply = props
                .reply_to
                .clone()
                .filter(|q| !q.is_empty())
                .map(|queue| ReplyTo {
                    queue,
                    correlation_id: props.correlation_id.clone().unwrap_or_else(|| id.clone()),
                });
            let stored = self.results.store_outcome(failed).await;
            if stored.is_err() {
                return self.settle(delivery, Settle::Requeue).await;
            }
        }
        self.jobs.count(Outcome::Rejected);
        if let Some(m) = &self.metrics {
            let name = delivery
                .message
                .headers
                .get("task")
                .and_then(Value::as_str)
                .unwrap_or_default();
            inc(&m.task(name, &delivery.queue).rejected);
            m.dead_lettered(kind);
        }
        kept.headers
            .insert("x-celerity-dead-reason".into(), Value::String(reason));
        kept.headers.insert(
            "x-celerity-dead-queue".into(),
            Value::String(delivery.queue.clone()),
        );
        match self.broker.dead_letter(dead, &kept).await {
            Ok(()) => self.settle(delivery, Settle::Ack).await,
            Err(e) => {
                // Keep it rather than lose it.
                tracing::error!(error = %e, "could not dead-letter the message; giving it back");
                self.settle(delivery, Settle::Later).await;
            }
        }
    }

    /// Acks or requeues `delivery`; a failed settle is logged (the broker delivers it again).
    pub(super) async fn settle(&self, delivery: Delivery, how: Settle) {
        if how == Settle::Later {
            let pause = celerity_broker::backoff::delay(0, GIVE_BACK_AFTER, GIVE_BACK_AFTER);
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = self.abort.cancelled() => {}
            }
        }
        let r = match how {
            Settle::Ack => delivery.ack().await,
            Settle::Requeue | Settle::Later => delivery.reject(true).await,
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, "could not settle a delivery; the broker will deliver it again");
        }
    }
}

/// When a retry sent at `now` is due: `countdown` later, at most [`MAX_DELAY`] (a task may ask for
/// any countdown; the clock cannot count past some of them).
fn retry_eta(now: chrono::DateTime<Utc>, countdown: Duration) -> chrono::DateTime<Utc> {
    let wait = countdown.min(MAX_DELAY);
    chrono::Duration::from_std(wait)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .unwrap_or(now)
}

fn exception_of(e: &TaskError) -> ExceptionInfo {
    match e {
        TaskError::Failed {
            exc_type,
            message,
            module,
            ..
        } => ExceptionInfo::new(exc_type.clone(), message.clone(), module.clone()),
        TaskError::Retry { .. } => {
            ExceptionInfo::new("Retry", "retry requested", "celery.exceptions")
        }
    }
}

/// A Python-style traceback text: what the Celery result's `traceback` field holds.
fn traceback(message: &TaskMessage, e: &TaskError) -> String {
    let mut tb = format!(
        "Traceback (most recent call last):\n  celerity task \"{}\", id {}\n",
        message.task(),
        message.id()
    );
    if let TaskError::Failed { causes, .. } = e {
        for c in causes.iter().rev() {
            tb.push_str(&format!("  caused by: {c}\n"));
        }
    }
    tb.push_str(&format!("{e}\n"));
    tb
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_absurd_retry_countdown_is_capped_not_a_panic() {
        let now = Utc::now();
        // Before: `now + Duration::from_std(1e15 s)` panicked the job's task.
        for huge in [Duration::from_secs(1_000_000_000_000_000), Duration::MAX] {
            let eta = retry_eta(now, huge);
            assert!(
                eta > now && eta <= now + chrono::Duration::from_std(MAX_DELAY).unwrap_or_default()
            );
        }
        assert_eq!(
            retry_eta(now, Duration::from_secs(5)),
            now + chrono::Duration::seconds(5)
        );
    }
}
