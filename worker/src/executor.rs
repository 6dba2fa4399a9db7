//! Runs one delivery: decode → look up → checks (expired, not yet due) → run under limits → store the
//! result → ack. The message is acked only after its outcome is stored (acks late), so a process that
//! dies mid-job leaves the job to be delivered again.
//!
//! Bad input never takes the worker down: an undecodable message is copied to the dead-letter queue
//! and acked; an unknown task or arguments of the wrong type fail the job (FAILURE stored) and ack it;
//! a panic in a task is a FAILURE.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures_util::FutureExt;
use serde_json::Value;
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use celerity_broker::backend::ExceptionInfo;
use celerity_broker::protocol::TaskMessage;
use celerity_broker::{Broker, Delivery, ResultBackend, State, TaskMeta};

use crate::control::ControlState;
use crate::events::EventSender;
use crate::limits::RateLimits;
use crate::registry::{Registered, Registry};
use crate::retry::{decide, random_unit, Decision};
use crate::task::{TaskContext, TaskError};

/// Where undecodable messages are copied before they are acked.
pub const DEAD_LETTER_QUEUE: &str = "celerity.deadletter";

/// Counters the executor keeps (read by the worker for its summary and by monitors).
#[derive(Debug, Default)]
pub struct Counters {
    pub succeeded: std::sync::atomic::AtomicU64,
    pub failed: std::sync::atomic::AtomicU64,
    pub retried: std::sync::atomic::AtomicU64,
    pub revoked: std::sync::atomic::AtomicU64,
    pub rejected: std::sync::atomic::AtomicU64,
}

/// Shared by every job of one worker process.
pub(crate) struct Executor {
    pub registry: Arc<Registry>,
    pub broker: Arc<dyn Broker>,
    pub backend: Option<Arc<dyn ResultBackend>>,
    pub hostname: String,
    /// Running jobs at once.
    pub slots: Arc<Semaphore>,
    pub buckets: Arc<RateLimits>,
    /// Celery events (task events only when enabled).
    pub events: EventSender,
    /// Asks the fetcher to widen (+1) or narrow (-1) the prefetch window while a job waits for its ETA.
    pub window: mpsc::UnboundedSender<isize>,
    /// Fired on cold shutdown: running jobs stop and are given back.
    pub abort: CancellationToken,
    pub counters: Arc<Counters>,
    /// In a supervised child: where to report jobs that have a hard time limit, so the supervisor can
    /// kill this process when one overruns.
    pub reporter: Option<Reporter>,
    /// A job due later than this is parked on the broker (where it can) instead of held here.
    pub park_after: Duration,
    /// Revoked ids and running jobs, shared with remote control.
    pub control: Arc<ControlState>,
}

/// Writes [`JobEvent`]s to this process's stdout, one JSON line each, for the supervisor.
///
/// The write is synchronous on purpose: it must reach the supervisor before the job starts, even
/// when the job then blocks the thread it runs on (the case hard time limits exist for).
#[derive(Debug, Clone, Copy, Default)]
pub struct Reporter;

impl Reporter {
    pub fn send(&self, event: &JobEvent) {
        use std::io::Write;
        let Ok(mut line) = serde_json::to_vec(event) else {
            return;
        };
        line.push(b'\n');
        let mut out = std::io::stdout().lock();
        if out.write_all(&line).and_then(|()| out.flush()).is_err() {
            tracing::warn!("cannot report to the supervisor (stdout closed)");
        }
    }
}

/// What a supervised child tells its supervisor about jobs with a hard time limit.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum JobEvent {
    /// A job started and must be done within `hard` seconds.
    Started { id: String, task: String, hard: f64 },
    /// That job is over (whatever the outcome).
    Finished { id: String },
}

impl Counters {
    /// Jobs handled so far, whatever their outcome (the `processed` of worker events).
    pub fn processed(&self) -> u64 {
        use std::sync::atomic::Ordering::Relaxed;
        self.succeeded.load(Relaxed)
            + self.failed.load(Relaxed)
            + self.retried.load(Relaxed)
            + self.revoked.load(Relaxed)
    }
}

fn bump(c: &std::sync::atomic::AtomicU64) {
    c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

impl Executor {
    /// Processes one delivery to the end. Never panics, never returns an error: problems are stored,
    /// logged and the message is settled.
    pub async fn handle(&self, delivery: Delivery) {
        let message = match TaskMessage::decode(&delivery.message) {
            Ok(m) => m,
            Err(e) => return Box::pin(self.dead_letter(delivery, e.to_string())).await,
        };
        tracing::info!(
            id = message.id(),
            task = message.task(),
            queue = delivery.queue,
            redelivered = delivery.redelivered,
            "received"
        );
        // Shown to `inspect` until this function returns; a task-received event if enabled.
        let job = self.control.track(&message, &delivery);
        self.events.received(&message);
        // Workflow children (parent_id set) are checked too: a crash can make their parent send
        // them twice (see the canvas module).
        if delivery.redelivered || message.headers.parent_id.is_some() {
            if let Some(done) = self.finished(message.id()).await {
                tracing::warn!(
                    id = message.id(),
                    task = message.task(),
                    "already finished; not running it again"
                );
                let canvas = self.canvas(&delivery.queue);
                if let Err(e) = Box::pin(canvas.replay(&message, &done)).await {
                    tracing::error!(id = message.id(), error = %e, "could not finish the workflow steps; leaving the job to be redelivered");
                    return;
                }
                return self.settle(delivery, Settle::Ack).await;
            }
        }
        if self.control.is_revoked(message.id()) {
            return Box::pin(self.skip_revoked(delivery, &message, "revoked")).await;
        }
        let Some(task) = self.registry.get(message.task()).cloned() else {
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
            self.events.failed("task-failed", message.id(), &exc, "");
            self.store(failure_meta(&message, &exc, None)).await;
            bump(&self.counters.failed);
            let canvas = self.canvas(&delivery.queue);
            if let Err(e) = Box::pin(canvas.on_failure(&message, &exc, None)).await {
                tracing::error!(id = message.id(), error = %e, "workflow steps after a failure could not be done; leaving the job to be redelivered");
                return;
            }
            return self.settle(delivery, Settle::Ack).await;
        };
        if let Some(expires) = message.headers.expires {
            if expires.to_utc() <= Utc::now() {
                tracing::info!(
                    id = message.id(),
                    task = message.task(),
                    "expired before it ran; revoked"
                );
                self.events.revoked(message.id(), false, true);
                let exc = ExceptionInfo::new("TaskRevokedError", "expired", "celery.exceptions");
                self.store(meta(&message, State::Revoked, exc.to_value(), None))
                    .await;
                bump(&self.counters.revoked);
                return self.settle(delivery, Settle::Ack).await;
            }
        }
        if let Some(eta) = message.headers.eta {
            let wait = (eta.to_utc() - Utc::now()).to_std().unwrap_or_default();
            let due = std::time::SystemTime::now() + wait;
            if wait > self.park_after && delivery.can_park(due) {
                return match delivery.park(due).await {
                    Ok(()) => {
                        tracing::info!(id = message.id(), task = message.task(), eta = %eta, "not due yet; parked on the broker")
                    }
                    Err(e) => {
                        tracing::warn!(id = message.id(), error = %e, "could not park a job that is not due; the broker will deliver it again")
                    }
                };
            }
            job.scheduled();
            if !Box::pin(self.hold_until_due(&delivery, eta.to_utc())).await {
                return self.settle(delivery, Settle::Requeue).await;
            }
            job.reserved();
        }
        if let Some(bucket) = self.buckets.get(message.task()) {
            tokio::select! {
                _ = bucket.acquire() => {}
                _ = self.abort.cancelled() => return self.settle(delivery, Settle::Requeue).await,
            }
        }
        let Ok(_slot) = self.slots.clone().acquire_owned().await else {
            return self.settle(delivery, Settle::Requeue).await;
        };
        // Checked again now: a revoke may have come while the job waited for its ETA or a slot.
        if self.control.is_revoked(message.id()) {
            return Box::pin(self.skip_revoked(delivery, &message, "revoked")).await;
        }
        self.run(delivery, message, task).await;
    }

    async fn run(&self, delivery: Delivery, message: TaskMessage, task: Registered) {
        let ignore_result = message
            .headers
            .ignore_result
            .unwrap_or(task.options.ignore_result);
        let mut delivery = Some(delivery);
        if !task.options.acks_late {
            if let Some(d) = delivery.take() {
                self.settle(d, Settle::Ack).await;
            }
        }
        if task.options.track_started && !ignore_result {
            let started = serde_json::json!({"pid": std::process::id(), "hostname": self.hostname});
            self.store(meta(&message, State::Started, started, None))
                .await;
        }
        let cancel = self.abort.child_token();
        let _running = self.control.started(message.id(), cancel.clone());
        self.events.started(message.id());
        let ctx = TaskContext {
            headers: Arc::new(message.headers.clone()),
            cancel: cancel.clone(),
            queue: Arc::from(delivery.as_ref().map_or("", |d| d.queue.as_str())),
        };
        let soft = message
            .headers
            .timelimit
            .1
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
            .or(task.options.soft_time_limit);
        let started = Instant::now();
        let hard = message
            .headers
            .timelimit
            .0
            .or(task.options.time_limit.map(|d| d.as_secs_f64()))
            .filter(|h| *h > 0.0);
        if let (Some(hard), Some(r)) = (hard, &self.reporter) {
            r.send(&JobEvent::Started {
                id: message.id().to_owned(),
                task: message.task().to_owned(),
                hard,
            });
        }
        let _report_finish = hard
            .and(self.reporter)
            .map(|r| FinishReport(r, message.id().to_owned()));
        let handler = AssertUnwindSafe(task.handler.call(
            ctx,
            message.args.clone(),
            message.kwargs.clone(),
        ))
        .catch_unwind();
        // Renew the delivery's lease while the job runs, so a long job is never handed to another worker.
        let lease = delivery.as_ref();
        let run = async move {
            let keep_alive = async {
                let Some((d, every)) = lease.and_then(|d| d.renew_every().map(|e| (d, e))) else {
                    return std::future::pending().await;
                };
                loop {
                    tokio::time::sleep(every).await;
                    if let Err(e) = d.keep_alive().await {
                        tracing::warn!(error = %e, "could not renew the lease of a running job");
                    }
                }
            };
            tokio::select! {
                r = handler => r,
                never = keep_alive => never,
            }
        };
        let outcome = tokio::select! {
            // Checked first: a job stopped by a cold shutdown is given back, whatever it returned.
            biased;
            _ = self.abort.cancelled() => {
                tracing::warn!(id = message.id(), task = message.task(), "interrupted by shutdown; giving it back");
                if let Some(d) = delivery.take() {
                    self.settle(d, Settle::Requeue).await;
                }
                return;
            }
            // Only a revoke with terminate cancels the job's own token while it runs.
            _ = cancel.cancelled() => {
                tracing::warn!(id = message.id(), task = message.task(), "terminated by revoke");
                if let Some(d) = delivery.take() {
                    Box::pin(self.skip_revoked(d, &message, "terminated")).await;
                }
                return;
            }
            r = run => match r {
                Ok(r) => r,
                Err(panic) => Err(TaskError::new("Panic", panic_message(&panic))),
            },
            _ = sleep_opt(soft) => {
                cancel.cancel();
                Err(TaskError::in_module("SoftTimeLimitExceeded", format!("SoftTimeLimitExceeded({:?})", soft.unwrap_or_default()), "celery.exceptions"))
            }
        };
        let runtime = started.elapsed();
        match outcome {
            Ok(value) => {
                tracing::info!(
                    id = message.id(),
                    task = message.task(),
                    runtime_ms = runtime.as_secs_f64() * 1e3,
                    "succeeded"
                );
                self.events.succeeded(message.id(), &value, runtime);
                let queue = delivery
                    .as_ref()
                    .map_or(celerity_client::DEFAULT_QUEUE, |d| d.queue.as_str());
                let canvas = self.canvas(queue);
                // Callbacks and the next chain step go out before the result is stored (as in Celery).
                let children = match canvas.dispatch_success(&message, &value, false).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::error!(id = message.id(), error = %e, "could not send the workflow's next steps; leaving the job to be redelivered");
                        return;
                    }
                };
                let joined = if message.embed.chord.is_object() {
                    Some(value.clone())
                } else {
                    None
                };
                if !ignore_result {
                    let mut m = meta(&message, State::Success, value, None);
                    m.children = children;
                    self.store(m).await;
                }
                if let Some(value) = joined {
                    let join = canvas.chord_part(&message, State::Success, &value);
                    if let Err(e) = Box::pin(join).await {
                        tracing::error!(id = message.id(), error = %e, "chord join failed; leaving the job to be redelivered");
                        return;
                    }
                }
                bump(&self.counters.succeeded);
            }
            Err(error) => {
                match decide(error, message.headers.retries, &task.options, random_unit()) {
                    Decision::Retry { countdown, cause } => {
                        let queue = delivery.as_ref().map(|d| d.queue.as_str());
                        let retry = self.republish_retry(&message, queue, countdown);
                        if let Err(e) = Box::pin(retry).await {
                            tracing::error!(id = message.id(), error = %e, "could not send the retry; leaving the job to be redelivered");
                            return;
                        }
                        tracing::info!(id = message.id(), task = message.task(), retries = message.headers.retries + 1, countdown_s = countdown.as_secs_f64(), reason = %cause, "retry");
                        let exc = exception_of(&cause);
                        self.events.failed(
                            "task-retried",
                            message.id(),
                            &exc,
                            &traceback(&message, &cause),
                        );
                        self.store(meta(
                            &message,
                            State::Retry,
                            exc.to_value(),
                            Some(traceback(&message, &cause)),
                        ))
                        .await;
                        bump(&self.counters.retried);
                    }
                    Decision::Fail(cause) => {
                        tracing::warn!(id = message.id(), task = message.task(), runtime_ms = runtime.as_secs_f64() * 1e3, error = %cause, "failed");
                        let exc = exception_of(&cause);
                        let tb = traceback(&message, &cause);
                        self.events.failed("task-failed", message.id(), &exc, &tb);
                        self.store(failure_meta(&message, &exc, Some(tb.clone())))
                            .await;
                        bump(&self.counters.failed);
                        let queue = delivery
                            .as_ref()
                            .map_or(celerity_client::DEFAULT_QUEUE, |d| d.queue.as_str());
                        let canvas = self.canvas(queue);
                        let after = canvas.on_failure(&message, &exc, Some(&tb));
                        if let Err(e) = Box::pin(after).await {
                            tracing::error!(id = message.id(), error = %e, "workflow steps after a failure could not be done; leaving the job to be redelivered");
                            return;
                        }
                    }
                }
            }
        }
        if let Some(d) = delivery {
            self.settle(d, Settle::Ack).await;
        }
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

    async fn republish_retry(
        &self,
        message: &TaskMessage,
        queue: Option<&str>,
        countdown: Duration,
    ) -> celerity_broker::Result<()> {
        let mut next = message.clone();
        next.headers.retries += 1;
        next.headers.eta = Some(
            (Utc::now() + chrono::Duration::from_std(countdown).unwrap_or_default()).fixed_offset(),
        );
        let queue = queue.unwrap_or(celerity_client::DEFAULT_QUEUE);
        self.broker.publish(queue, &next.encode()).await
    }

    /// Stores REVOKED for a job that will not run (or was stopped) and acks it.
    async fn skip_revoked(&self, delivery: Delivery, message: &TaskMessage, why: &str) {
        tracing::info!(
            id = message.id(),
            task = message.task(),
            why,
            "revoked; not running it"
        );
        self.events
            .revoked(message.id(), why == "terminated", false);
        let exc = ExceptionInfo::new("TaskRevokedError", why, "celery.exceptions");
        self.store(meta(message, State::Revoked, exc.to_value(), None))
            .await;
        bump(&self.counters.revoked);
        let joined = self
            .canvas(&delivery.queue)
            .chord_part(message, State::Revoked, &exc.to_value())
            .await;
        if let Err(e) = joined {
            tracing::error!(id = message.id(), error = %e, "chord join failed; leaving the job to be redelivered");
            return;
        }
        self.settle(delivery, Settle::Ack).await;
    }

    /// The final state the backend already holds for this id, if any (a redelivery of a job that
    /// ended, e.g. one whose process was killed for its hard time limit, or whose ack was lost).
    async fn finished(&self, id: &str) -> Option<TaskMeta> {
        let backend = self.backend.as_ref()?;
        backend.get(id).await.ok().filter(|m| m.status.is_ready())
    }

    async fn store(&self, mut meta: TaskMeta) {
        let Some(backend) = &self.backend else { return };
        // Which node ran it: Celery's extended-result `worker` field (Python: `AsyncResult.worker`).
        meta.extra
            .entry("worker")
            .or_insert_with(|| Value::String(self.hostname.clone()));
        // A lost result write is retried a few times; the message stays unacked meanwhile.
        for attempt in 0..5u32 {
            match backend.store(&meta).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(id = meta.task_id, error = %e, attempt, "storing the result failed");
                    tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                }
            }
        }
        tracing::error!(id = meta.task_id, "giving up storing the result");
    }

    async fn dead_letter(&self, delivery: Delivery, reason: String) {
        let id = delivery.message.task_id().map(str::to_owned);
        tracing::error!(queue = delivery.queue, id = ?id, reason, "undecodable message; moving it to {DEAD_LETTER_QUEUE}");
        if let Some(id) = &id {
            let exc = ExceptionInfo::new("DecodeError", reason.clone(), "kombu.exceptions");
            self.store(TaskMeta::failure(id.clone(), &exc, None)).await;
        }
        bump(&self.counters.rejected);
        let mut kept = delivery.message.clone();
        kept.headers
            .insert("x-celerity-dead-reason".into(), Value::String(reason));
        kept.headers.insert(
            "x-celerity-dead-queue".into(),
            Value::String(delivery.queue.clone()),
        );
        match self.broker.publish(DEAD_LETTER_QUEUE, &kept).await {
            Ok(()) => self.settle(delivery, Settle::Ack).await,
            Err(e) => {
                // Keep it where it is rather than lose it.
                tracing::error!(error = %e, "could not dead-letter the message; leaving it unacked");
            }
        }
    }

    async fn settle(&self, delivery: Delivery, how: Settle) {
        let r = match how {
            Settle::Ack => delivery.ack().await,
            Settle::Requeue => delivery.reject(true).await,
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, "could not settle a delivery; the broker will deliver it again");
        }
    }
}

/// Reports a job's end to the supervisor when dropped (whatever way the job ended).
struct FinishReport(Reporter, String);

impl Drop for FinishReport {
    fn drop(&mut self) {
        self.0.send(&JobEvent::Finished {
            id: std::mem::take(&mut self.1),
        });
    }
}

enum Settle {
    Ack,
    Requeue,
}

async fn sleep_opt(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "task panicked".to_owned()
    }
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

/// The meta Celery stores for a state of this message (with group_id/parent_id when set).
fn meta(
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

fn failure_meta(message: &TaskMessage, exc: &ExceptionInfo, traceback: Option<String>) -> TaskMeta {
    meta(message, State::Failure, exc.to_value(), traceback)
}
