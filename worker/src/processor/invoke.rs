//! Invocation: runs an admitted job's handler and says how the run ended. The handler runs under
//! its soft time limit (the job's cancellation token fires and the run fails with Celery's
//! `SoftTimeLimitExceeded`); a hard time limit is reported to the supervisor, which kills the
//! process if the job overruns it. A cold shutdown or a revoke with terminate stops it; a panic is
//! caught and becomes a failure.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use celerity_broker::protocol::TaskMessage;
use celerity_broker::Delivery;

use crate::registry::Registered;
use crate::task::{TaskContext, TaskError};

use super::Processor;

/// How a run ended.
pub(super) enum Ran {
    /// The handler returned (or panicked, or hit its soft time limit), after this long.
    Finished(Result<Value, TaskError>, Duration),
    /// A cold shutdown stopped it: give it back.
    Interrupted,
    /// A revoke with terminate stopped it.
    Terminated,
}

impl Processor {
    /// Runs `task`'s handler for `message`. `queue` is where it came from, `cancel` the job's own
    /// token (fired by terminate or the soft limit). The caller renews the delivery's lease meanwhile
    /// ([`renew_lease`]).
    pub(super) async fn invoke(
        &self,
        message: &TaskMessage,
        task: &Registered,
        queue: &str,
        cancel: &CancellationToken,
    ) -> Ran {
        let ctx = TaskContext {
            headers: Arc::new(message.headers.clone()),
            cancel: cancel.clone(),
            queue: Arc::from(queue),
        };
        let soft = message
            .headers
            .timelimit
            .1
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
            .or(task.options.soft_time_limit);
        let hard = message
            .headers
            .timelimit
            .0
            .or(task.options.time_limit.map(|d| d.as_secs_f64()))
            .filter(|h| *h > 0.0);
        let _report_finish = hard.zip(self.reporter).map(|(hard, r)| {
            let reply = crate::results::reply_to(message);
            r.started(message.id(), message.task(), queue, hard, reply)
        });
        let started = Instant::now();
        let handler = AssertUnwindSafe(task.handler.call(
            ctx,
            message.args.clone(),
            message.kwargs.clone(),
        ))
        .catch_unwind();
        let outcome = tokio::select! {
            // Checked first: a job stopped by a cold shutdown is given back, whatever it returned.
            biased;
            _ = self.abort.cancelled() => return Ran::Interrupted,
            // Only a revoke with terminate cancels the job's own token while it runs.
            _ = cancel.cancelled() => return Ran::Terminated,
            r = handler => r.unwrap_or_else(|panic| Err(TaskError::new("Panic", panic_message(&panic)))),
            _ = sleep_opt(soft) => {
                cancel.cancel();
                Err(TaskError::in_module("SoftTimeLimitExceeded", format!("SoftTimeLimitExceeded({:?})", soft.unwrap_or_default()), "celery.exceptions"))
            }
        };
        Ran::Finished(outcome, started.elapsed())
    }
}

/// Renews `lease` (a delivery with a visibility lease, as on Redis) for as long as it is polled, so
/// a long job is never handed to another worker. One loop per delivery is enough; renewals that
/// overlap are safe (the delivery keeps the newest score, see the Redis transport's `ack` module).
pub(super) async fn renew_lease(lease: Option<&Delivery>) -> std::convert::Infallible {
    let Some((d, every)) = lease.and_then(|d| d.renew_every().map(|e| (d, e))) else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(every).await;
        if let Err(e) = d.keep_alive().await {
            tracing::warn!(error = %e, "could not renew the lease of a running job");
        }
    }
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
