//! Admission: what happens to a delivery before its task may run. In order: check its size (a body
//! over `max_message_size` is dead-lettered without being parsed), decode it (an undecodable message
//! is dead-lettered), start showing it to `inspect`, skip it if the backend
//! already holds its final state (finishing its workflow steps instead), if it was revoked, if its
//! task is unknown (FAILURE) or if it expired (REVOKED); wait for its ETA (or park it on the broker
//! when it is far off; fail it when it is over 100 years away); then wait for the task's rate limit and a free slot, and check the revoke
//! once more. Every path that does not admit the job settles it (or leaves it for redelivery).

use chrono::Utc;
use tokio::time::Instant;

use celerity_broker::backend::ExceptionInfo;
use celerity_broker::protocol::TaskMessage;
use celerity_broker::{Delivery, State};
use celerity_client::MAX_DELAY;

use crate::jobs::{JobGuard, Outcome};
use crate::metrics::inc;
use crate::registry::Registered;
use crate::results::{failure_meta, meta, Interrupted};

use super::finish::Settle;
use super::invoke::renew_lease;
use super::{Admitted, Processor};

impl Processor {
    /// Takes `delivery` up to the moment its task can run; `None` if it was settled (or left for
    /// redelivery) instead.
    pub(super) async fn admit(&self, delivery: Delivery) -> Option<Admitted> {
        if let Err(too_large) = self.broker.limits().check(&delivery.message) {
            Box::pin(self.dead_letter_oversized(delivery, too_large)).await;
            return None;
        }
        let message = match TaskMessage::decode(&delivery.message) {
            Ok(m) => m,
            Err(e) => {
                Box::pin(self.dead_letter(delivery, dead_reason(&e), e.to_string())).await;
                return None;
            }
        };
        tracing::info!(
            id = message.id(),
            task = message.task(),
            queue = delivery.queue,
            redelivered = delivery.redelivered,
            "received"
        );
        let guard = self.jobs.track(&message, &delivery);
        self.count(&message, &delivery.queue, |c| inc(&c.received));
        self.events.received(&message);
        let delivery = self.skip_finished(delivery, &message).await?;
        if self.jobs.is_revoked(message.id()) {
            Box::pin(self.skip_revoked(delivery, &message, "revoked")).await;
            return None;
        }
        let Some(task) = self.registry.get(message.task()).cloned() else {
            Box::pin(self.refuse_unregistered(delivery, &message)).await;
            return None;
        };
        let delivery = self.skip_expired(delivery, &message).await?;
        let delivery = self.wait_until_due(delivery, &message, &guard).await?;
        self.wait_for_turn(delivery, message, task, guard).await
    }

    /// A redelivered job (or any workflow child: a crash can make its parent send it twice) whose
    /// final state is already stored is not run again; its workflow steps are redone instead.
    async fn skip_finished(&self, delivery: Delivery, message: &TaskMessage) -> Option<Delivery> {
        if !delivery.redelivered && message.headers.parent_id.is_none() {
            return Some(delivery);
        }
        let done = match self.results.finished(message.id()).await {
            Ok(Some(done)) => done,
            Ok(None) => return Some(delivery),
            Err(Interrupted) => {
                self.settle(delivery, Settle::Requeue).await;
                return None;
            }
        };
        tracing::warn!(
            id = message.id(),
            task = message.task(),
            "already finished; not running it again"
        );
        let canvas = self.canvas(&delivery.queue);
        if let Err(e) = Box::pin(canvas.replay(message, &done)).await {
            tracing::error!(id = message.id(), error = %e, "could not finish the workflow steps; giving the job back");
            self.settle(delivery, Settle::Later).await;
            return None;
        }
        self.settle(delivery, Settle::Ack).await;
        None
    }

    /// A job of a task this worker does not know fails with Celery's `NotRegistered`.
    async fn refuse_unregistered(&self, delivery: Delivery, message: &TaskMessage) {
        tracing::error!(
            id = message.id(),
            task = message.task(),
            "received unregistered task; failing it"
        );
        let exc = ExceptionInfo::new(
            "NotRegistered",
            format!("'{}'", message.task()),
            "celery.exceptions",
        );
        self.fail_unrun(delivery, message, exc).await;
    }

    /// A job due more than [`MAX_DELAY`] (100 years) from now — a unit mix-up or a hostile
    /// message — fails (`ValueError`) instead of being held or parked for ever, as the client
    /// refuses to send one.
    async fn refuse_far_eta(&self, delivery: Delivery, message: &TaskMessage, eta: &str) {
        tracing::error!(
            id = message.id(),
            task = message.task(),
            eta,
            "ETA more than 100 years away; failing it"
        );
        let exc = ExceptionInfo::new(
            "ValueError",
            format!("eta {eta} is more than 100 years away"),
            "builtins",
        );
        self.fail_unrun(delivery, message, exc).await;
    }

    /// Fails a job that will not run with `exc`: FAILURE stored, the workflow's failure steps
    /// done, then acked (given back if the backend or the steps cannot be reached).
    async fn fail_unrun(&self, delivery: Delivery, message: &TaskMessage, exc: ExceptionInfo) {
        self.events.failed("task-failed", message.id(), &exc, "");
        let stored = self
            .results
            .store_outcome(failure_meta(message, &exc, None))
            .await;
        if stored.is_err() {
            return self.settle(delivery, Settle::Requeue).await;
        }
        self.jobs.count(Outcome::Failed);
        self.count(message, &delivery.queue, |c| c.failed(&exc.exc_type));
        let canvas = self.canvas(&delivery.queue);
        if let Err(e) = Box::pin(canvas.on_failure(message, &exc, None)).await {
            tracing::error!(id = message.id(), error = %e, "workflow steps after a failure could not be done; giving the job back");
            return self.settle(delivery, Settle::Later).await;
        }
        self.settle(delivery, Settle::Ack).await;
    }

    /// A job past its `expires` is stored as REVOKED (`TaskRevokedError: expired`) and not run.
    async fn skip_expired(&self, delivery: Delivery, message: &TaskMessage) -> Option<Delivery> {
        match message.headers.expires {
            Some(expires) if expires.to_utc() <= Utc::now() => {}
            _ => return Some(delivery),
        }
        tracing::info!(
            id = message.id(),
            task = message.task(),
            "expired before it ran; revoked"
        );
        self.events.revoked(message.id(), false, true);
        let exc = ExceptionInfo::new("TaskRevokedError", "expired", "celery.exceptions");
        let stored = self
            .results
            .store_outcome(meta(message, State::Revoked, exc.to_value(), None))
            .await;
        if stored.is_err() {
            self.settle(delivery, Settle::Requeue).await;
            return None;
        }
        self.jobs.count(Outcome::Revoked);
        self.count(message, &delivery.queue, |c| inc(&c.revoked));
        self.settle(delivery, Settle::Ack).await;
        None
    }

    /// A job with an ETA waits for it: parked on the broker when it is further than `park_after`
    /// away (and the transport can), else held here with its lease renewed.
    async fn wait_until_due(
        &self,
        delivery: Delivery,
        message: &TaskMessage,
        guard: &JobGuard,
    ) -> Option<Delivery> {
        let Some(eta) = message.headers.eta else {
            return Some(delivery);
        };
        let wait = (eta.to_utc() - Utc::now()).to_std().unwrap_or_default();
        if wait > MAX_DELAY {
            Box::pin(self.refuse_far_eta(delivery, message, &eta.to_rfc3339())).await;
            return None;
        }
        let due = std::time::SystemTime::now() + wait;
        if wait > self.park_after && delivery.can_park(due) {
            match delivery.park(due).await {
                Ok(()) => {
                    tracing::info!(id = message.id(), task = message.task(), eta = %eta, "not due yet; parked on the broker")
                }
                Err(e) => {
                    tracing::warn!(id = message.id(), error = %e, "could not park a job that is not due; the broker will deliver it again")
                }
            }
            return None;
        }
        guard.scheduled();
        if !Box::pin(self.hold_until_due(&delivery, eta.to_utc())).await {
            self.settle(delivery, Settle::Requeue).await;
            return None;
        }
        guard.reserved();
        Some(delivery)
    }

    /// Waits until `eta` while widening the prefetch window by one (so waiting jobs do not take
    /// slots from due ones) and renewing the delivery's lease. False if shutdown interrupted it.
    async fn hold_until_due(&self, delivery: &Delivery, eta: chrono::DateTime<Utc>) -> bool {
        let Ok(wait) = (eta - Utc::now()).to_std() else {
            return true;
        };
        let _ = self.window.send(1);
        let deadline = Instant::now() + wait;
        let every = delivery.renew_every().unwrap_or(wait);
        let due = loop {
            let tick = deadline.min(Instant::now() + every);
            tokio::select! {
                _ = tokio::time::sleep_until(tick) => {
                    if tick >= deadline { break true; }
                    if let Err(e) = delivery.keep_alive().await {
                        tracing::warn!(error = %e, "could not renew the lease of a job waiting for its ETA");
                    }
                }
                _ = self.abort.cancelled() => break false,
            }
        };
        let _ = self.window.send(-1);
        due
    }

    /// Waits for the task's rate limit and a free slot, renewing the job's lease meanwhile; checks
    /// the revoke again after the wait.
    async fn wait_for_turn(
        &self,
        delivery: Delivery,
        message: TaskMessage,
        task: Registered,
        guard: JobGuard,
    ) -> Option<Admitted> {
        let turn = async {
            if let Some(bucket) = self.buckets.get(message.task()) {
                bucket.acquire().await;
            }
            self.slots.clone().acquire_owned().await.ok()
        };
        // Waiting for its turn can take long: the job's lease is renewed meanwhile, so the broker
        // does not hand it to another worker.
        let slot = tokio::select! {
            slot = turn => slot,
            never = renew_lease(Some(&delivery)) => match never {},
            _ = self.abort.cancelled() => None,
        };
        let Some(slot) = slot else {
            self.settle(delivery, Settle::Requeue).await;
            return None;
        };
        // A revoke may have come while the job waited for its ETA or a slot.
        if self.jobs.is_revoked(message.id()) {
            Box::pin(self.skip_revoked(delivery, &message, "revoked")).await;
            return None;
        }
        Some(Admitted {
            delivery,
            message,
            task,
            guard,
            slot,
        })
    }
}

/// The `reason` label of a dead-lettered message: what kind of undecodable it was.
fn dead_reason(e: &celerity_broker::BrokerError) -> &'static str {
    use celerity_broker::BrokerError;
    match e {
        BrokerError::ContentType(_) => "content_type",
        BrokerError::Malformed(_) => "malformed",
        _ => "other",
    }
}
