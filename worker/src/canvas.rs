//! What the worker does for workflows once a job has an outcome: Celery's canvas, on the worker side.
//!
//! - **Success**: callbacks (`embed.callbacks`) are sent with the result put in front of their args
//!   (unless immutable), then the next chain step (`embed.chain[-1]`) with the rest of the chain.
//!   Like Celery 5.7, this happens *before* the SUCCESS is stored, and the sent children go in the
//!   stored meta's `children`. Then, if the job is a chord header member (`embed.chord`), its outcome
//!   joins the chord.
//! - **Failure** (after the FAILURE is stored): the chord join gets the failure; the rest of the chain
//!   is marked FAILURE with the same exception (so the chain's handle, the last step, reports it); the
//!   errbacks (`embed.errbacks`) are sent with the failed task's id as their first argument — how
//!   Celery calls errbacks that are tasks (it cannot call a Python function in our process).
//! - **Chord join**: see [`celerity_broker::backend::chord`]. The member that completes the count
//!   gets every entry in `group_index` order and sends the body with the list of results. If any
//!   member failed or was revoked, the body is stored as FAILURE with a `ChordError` naming that
//!   member (`Dependency <id> raised ValueError('…')`, as Celery words it), its errbacks are sent and
//!   its own chain is failed.
//!
//! - **Nested canvases**: a callback, the next chain step or a chord body may itself be a group,
//!   chain or chord (Celery sends `subtask_type` "group"/"chain"/"chord" dicts there, e.g. the
//!   next step of `chain(a, group(b, c))`, or the chord Celery makes of `chain(a, group(…), d)`).
//!   They are applied as Celery's canvas applies them (see [`celerity_client::canvas_plan`]): a
//!   group's members each get the parent result in front, a chord records its size and then sends
//!   its header the same way, a chain sends its first step carrying the rest.
//!
//! ## Crashes and redelivery
//!
//! The job's message is acked only after all of the above (acks late). Where a crash can land:
//! - *before the children are sent*: nothing happened yet; the redelivered job runs again.
//! - *after sending children, before storing*: the job runs again and sends the same children again
//!   (same frozen ids). The duplicate child is skipped by the worker that receives it, because a job
//!   with a `parent_id` (any workflow child) is checked against the backend before it runs, and one
//!   already finished is not run again. Only if both copies start at the same moment can it run twice.
//! - *after storing, before the join or before the ack*: the redelivered job is not run again (its
//!   result is final), but [`Canvas::replay`] does the rest once more: children whose frozen id is
//!   still PENDING (and that are not listed in the stored `children`) are sent, and the outcome joins
//!   the chord again. The join is idempotent: entries are deduplicated by `task_id:group_index`, so a
//!   member is never counted twice, and once a chord's body was sent a `done` marker makes later
//!   joins no-ops.
//! - *after the join completed, before the body was sent*: the claim belongs to the completing
//!   member (its token is derived from the member's id), so that member's redelivery re-enters the
//!   claim and sends the body. If the crash lands between sending the body and clearing the join,
//!   the redelivery sends the body again with the same frozen id, and the duplicate is skipped as
//!   above. The body therefore runs once.

use std::sync::Arc;

use serde_json::Value;

use celerity_broker::backend::{ChordEntry, ChordJoin, ChordPart, ExceptionInfo};
use celerity_broker::protocol::{Signature, TaskMessage};
use celerity_broker::{Broker, ResultBackend, State, TaskMeta};
use celerity_client::canvas::Call;
use celerity_client::canvas_plan::{self as plan, Action};

use crate::error::Result;
use crate::error::WorkerError;
use crate::results::{ResultStore, RETRY_BASE, RETRY_MAX};

/// Tries of a chord join before the job is given back to be delivered again.
const JOIN_TRIES: u32 = 5;

/// The workflow steps of one job, sent from the queue it came from.
pub(crate) struct Canvas<'a> {
    broker: &'a Arc<dyn Broker>,
    results: &'a ResultStore,
    /// Where children go when their signature names no queue: the queue this job came from.
    queue: &'a str,
}

impl<'a> Canvas<'a> {
    /// The workflow steps of a job that came from `queue`.
    pub(crate) fn new(
        broker: &'a Arc<dyn Broker>,
        results: &'a ResultStore,
        queue: &'a str,
    ) -> Self {
        Canvas {
            broker,
            results,
            queue,
        }
    }

    fn backend(&self) -> Option<&'a Arc<dyn ResultBackend>> {
        self.results.backend()
    }
}

impl Canvas<'_> {
    fn call<'m>(&'m self, message: &'m TaskMessage, front: Option<&'m Value>) -> Call<'m> {
        Call {
            parent_result: front,
            parent_id: Some(message.id()),
            root_id: Some(message.headers.root_id.as_deref().unwrap_or(message.id())),
            chain: None,
            default_queue: Some(self.queue),
        }
    }

    /// Applies a signature — a task, or a group / chain / chord (see
    /// [`celerity_client::canvas_plan`]) — and returns its result tuple for `children`.
    async fn publish(&self, sig: &Signature, call: &Call<'_>) -> Result<Value> {
        let planned = plan::plan(sig, call)?;
        for action in planned.actions {
            match action {
                Action::ChordSize { group_id, size } => {
                    let backend = self
                        .backend()
                        .ok_or(celerity_client::ClientError::NoBackend)?;
                    backend.set_chord_size(&group_id, size).await?;
                }
                Action::Publish { message: m, queue } => {
                    let started = std::time::Instant::now();
                    self.broker.publish(&queue, &m.encode()).await?;
                    if let Some(metrics) = self.results.metrics() {
                        metrics.publish.observe(started.elapsed());
                        crate::metrics::inc(&metrics.task(m.task(), &queue).sent);
                    }
                    tracing::debug!(id = m.id(), task = m.task(), queue, parent = ?call.parent_id, "workflow step sent");
                }
            }
        }
        Ok(planned.child)
    }

    /// True if a frozen child has not been seen by any worker yet (so it may be sent again). A read
    /// that fails is an error, not an answer: the job is given back and asks again later.
    async fn still_pending(&self, sig: &Signature) -> Result<bool> {
        match (plan::result_id(sig), self.backend()) {
            (Some(id), Some(b)) => Ok(b.get(&id).await?.status == State::Pending),
            _ => Ok(true),
        }
    }

    /// Sends the callbacks and the next chain step of a job that returned `value`; returns the
    /// `children` to store. With `only_pending`, children already known to the backend are skipped
    /// (used on redelivery). An error leaves the job unacked, to be delivered again.
    pub(crate) async fn dispatch_success(
        &self,
        message: &TaskMessage,
        value: &Value,
        only_pending: bool,
    ) -> Result<Value> {
        if message.embed.callbacks.is_null() && message.embed.chain.is_null() {
            return Ok(Value::Array(Vec::new()));
        }
        // Boxed: a plain job's future (spawned per delivery) stays small.
        Box::pin(self.send_successors(message, value, only_pending)).await
    }

    async fn send_successors(
        &self,
        message: &TaskMessage,
        value: &Value,
        only_pending: bool,
    ) -> Result<Value> {
        let mut children = Vec::new();
        for cb in Signature::list_from_value(&message.embed.callbacks)? {
            if only_pending && !self.still_pending(&cb).await? {
                continue;
            }
            match self.publish(&cb, &self.call(message, Some(value))).await {
                Ok(child) => children.push(child),
                Err(crate::WorkerError::Client(e)) => {
                    tracing::error!(id = message.id(), callback = cb.task, error = %e, "callback cannot be sent; skipped")
                }
                Err(e) => return Err(e),
            }
        }
        let mut chain = Signature::list_from_value(&message.embed.chain)?;
        if let Some(next) = chain.pop() {
            if !only_pending || self.still_pending(&next).await? {
                let mut call = self.call(message, Some(value));
                call.chain = Some(chain.iter().map(Signature::to_value).collect());
                match self.publish(&next, &call).await {
                    Ok(child) => children.push(child),
                    Err(crate::WorkerError::Client(e)) => {
                        tracing::error!(id = message.id(), step = next.task, error = %e, "next chain step cannot be sent; the chain stops here")
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(Value::Array(children))
    }

    /// After a FAILURE was stored: join the chord, fail the rest of the chain, send the errbacks.
    pub(crate) async fn on_failure(
        &self,
        message: &TaskMessage,
        exc: &ExceptionInfo,
        traceback: Option<&str>,
    ) -> Result<()> {
        self.chord_part(message, State::Failure, &exc.to_value())
            .await?;
        let chain = Signature::list_from_value(&message.embed.chain)?;
        self.fail_chain(&chain, exc, traceback).await?;
        let id = Value::String(message.id().to_owned());
        for eb in Signature::list_from_value(&message.embed.errbacks)? {
            self.send_errback(&eb, message, &id).await?;
        }
        Ok(())
    }

    async fn send_errback(&self, eb: &Signature, message: &TaskMessage, id: &Value) -> Result<()> {
        match self.publish(eb, &self.call(message, Some(id))).await {
            Ok(_) => Ok(()),
            Err(crate::WorkerError::Client(e)) => {
                tracing::error!(id = message.id(), errback = eb.task, error = %e, "errback cannot be sent; skipped");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Marks every remaining step of a chain FAILURE with `exc` (Celery's `_fail_chain`).
    async fn fail_chain(
        &self,
        chain: &[Signature],
        exc: &ExceptionInfo,
        traceback: Option<&str>,
    ) -> Result<()> {
        for step in chain {
            for id in plan::leaf_ids(step) {
                let mut m = TaskMeta::failure(&id, exc, traceback.map(str::to_owned));
                if let Some(g) = step.options.get("group_id").filter(|g| g.is_string()) {
                    m.extra.insert("group_id".into(), g.clone());
                }
                self.results
                    .store(&m)
                    .await
                    .map_err(|_| WorkerError::Interrupted)?;
            }
        }
        Ok(())
    }

    /// Adds a chord header member's outcome to the join; the member that completes it sends the
    /// body (or fails it). Nothing to do for a job that is not a chord member.
    pub(crate) async fn chord_part(
        &self,
        message: &TaskMessage,
        state: State,
        result: &Value,
    ) -> Result<()> {
        if !message.embed.chord.is_object() {
            return Ok(());
        }
        let (Some(group_id), Some(backend)) = (&message.headers.group, self.backend()) else {
            tracing::error!(
                id = message.id(),
                "chord member without a group id or a result backend; the chord cannot join"
            );
            return Ok(());
        };
        let part = ChordPart {
            group_id: group_id.clone(),
            task_id: message.id().to_owned(),
            group_index: message.headers.group_index,
            state,
            result: result.clone(),
        };
        let mut attempt = 0;
        let join = loop {
            match backend.chord_part_return(&part).await {
                Ok(j) => break j,
                Err(e) if attempt + 1 < JOIN_TRIES => {
                    tracing::warn!(id = message.id(), error = %e, attempt, "chord join failed; retrying");
                    let pause = celerity_broker::backoff::delay(attempt, RETRY_BASE, RETRY_MAX);
                    tokio::time::sleep(pause).await;
                    attempt += 1;
                }
                Err(e) => return Err(e.into()),
            }
        };
        let ChordJoin::Complete { entries, claim } = join else {
            tracing::debug!(
                id = message.id(),
                group = group_id,
                ?join,
                "chord part returned"
            );
            return Ok(());
        };
        let body = Signature::from_value(&message.embed.chord)?;
        let failed = entries
            .iter()
            .find(|e| matches!(e.state, State::Failure | State::Revoked));
        match failed {
            Some(f) => self.fail_chord_body(message, group_id, &body, f).await?,
            None => {
                let results = Value::Array(entries.into_iter().map(|e| e.result).collect());
                self.send_chord_body(message, group_id, &body, &results)
                    .await?;
            }
        }
        backend.chord_done(group_id, &claim).await?;
        Ok(())
    }

    /// A completed chord whose member `failed` failed or was revoked: the body is stored as
    /// FAILURE with Celery's `ChordError`, its errbacks are sent and its own chain is failed.
    async fn fail_chord_body(
        &self,
        message: &TaskMessage,
        group_id: &str,
        body: &Signature,
        failed: &ChordEntry,
    ) -> Result<()> {
        let cause = ExceptionInfo::from_value(&failed.result).unwrap_or_else(|| {
            ExceptionInfo::new("Exception", failed.result.to_string(), "builtins")
        });
        let exc = ExceptionInfo::new(
            "ChordError",
            format!("Dependency {} raised {}", failed.task_id, cause.repr()),
            "celery.exceptions",
        );
        tracing::warn!(
            group = group_id,
            failed = failed.task_id,
            "chord failed: {exc}"
        );
        let errbacks = match body.options.get("link_error").cloned().unwrap_or_default() {
            one @ Value::Object(_) => Value::Array(vec![one]),
            other => other,
        };
        let errbacks = Signature::list_from_value(&errbacks)?;
        for body_id in plan::leaf_ids(body) {
            let mut m = TaskMeta::failure(&body_id, &exc, None);
            m.extra
                .insert("group_id".into(), Value::String(group_id.to_owned()));
            self.results
                .store(&m)
                .await
                .map_err(|_| WorkerError::Interrupted)?;
            let id = Value::String(body_id.clone());
            for eb in &errbacks {
                self.send_errback(eb, message, &id).await?;
            }
        }
        let chain = body.options.get("chain").cloned().unwrap_or_default();
        self.fail_chain(&Signature::list_from_value(&chain)?, &exc, None)
            .await?;
        Ok(())
    }

    /// A completed chord with every member successful: the body gets their `results` in order.
    async fn send_chord_body(
        &self,
        message: &TaskMessage,
        group_id: &str,
        body: &Signature,
        results: &Value,
    ) -> Result<()> {
        match self.publish(body, &self.call(message, Some(results))).await {
            Ok(child) => {
                tracing::info!(group = group_id, body = %child, "chord complete; body sent");
                Ok(())
            }
            Err(crate::WorkerError::Client(e)) => {
                tracing::error!(group = group_id, error = %e, "chord body cannot be sent");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// For a redelivered job whose result is already final: redo what may not have happened before
    /// the crash (see the module doc). Never runs the job again.
    pub(crate) async fn replay(&self, message: &TaskMessage, stored: &TaskMeta) -> Result<()> {
        match stored.status {
            State::Success => {
                let sent_before = stored.children.as_array().is_some_and(|c| !c.is_empty());
                if !sent_before {
                    self.dispatch_success(message, &stored.result, true).await?;
                }
                self.chord_part(message, State::Success, &stored.result)
                    .await
            }
            State::Failure | State::Revoked => {
                self.chord_part(message, stored.status.clone(), &stored.result)
                    .await?;
                let exc = stored.exception().unwrap_or_else(|| {
                    ExceptionInfo::new("Exception", stored.result.to_string(), "builtins")
                });
                let chain = Signature::list_from_value(&message.embed.chain)?;
                self.fail_chain(&chain, &exc, stored.traceback.as_deref())
                    .await?;
                let id = Value::String(message.id().to_owned());
                for eb in Signature::list_from_value(&message.embed.errbacks)? {
                    if self.still_pending(&eb).await? {
                        self.send_errback(&eb, message, &id).await?;
                    }
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}
