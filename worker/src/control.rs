//! Remote control: listens on Celery's pidbox fanout (`celery.pidbox`) for requests addressed to this
//! worker and acts on them — `revoke` (and `terminate`) and `shutdown` for now; other methods are
//! logged and ignored. Python's `app.control.revoke(id)` and `celerity revoke` send the same request.
//!
//! Revoked ids are kept like Celery keeps them: in memory, at most [`MAX_REVOKED`], each for
//! [`REVOKED_FOR`]. A job whose id is revoked is skipped when it arrives or right before it starts
//! (stored as REVOKED); with `terminate`, a running job's cancellation token fires.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use celerity_broker::protocol::control::{pidbox_queue, ControlRequest, PIDBOX_EXCHANGE};
use celerity_broker::Broker;

/// Most revoked ids remembered (Celery's `CELERY_WORKER_REVOKES_MAX`).
pub const MAX_REVOKED: usize = 50_000;
/// How long a revoked id is remembered (Celery's `CELERY_WORKER_REVOKE_EXPIRES`).
pub const REVOKED_FOR: Duration = Duration::from_secs(10_800);

/// What remote control shares with the executor.
#[derive(Debug, Default)]
pub(crate) struct ControlState {
    revoked: Mutex<Revoked>,
    /// Running jobs' cancellation tokens, for `terminate`.
    running: Mutex<HashMap<String, CancellationToken>>,
}

#[derive(Debug, Default)]
struct Revoked {
    at: HashMap<String, Instant>,
    order: VecDeque<(Instant, String)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ControlState {
    /// True if `id` was revoked (and not so long ago that it was forgotten).
    pub fn is_revoked(&self, id: &str) -> bool {
        lock(&self.revoked)
            .at
            .get(id)
            .is_some_and(|t| t.elapsed() < REVOKED_FOR)
    }

    /// Remembers `ids` as revoked; with `terminate`, cancels those running here. Returns how many
    /// running jobs were terminated.
    pub fn revoke(&self, ids: &[String], terminate: bool) -> usize {
        {
            let mut r = lock(&self.revoked);
            let now = Instant::now();
            for id in ids {
                r.at.insert(id.clone(), now);
                r.order.push_back((now, id.clone()));
            }
            // Forget the oldest beyond the limits (entries re-revoked later keep their newer time).
            while let Some((t, id)) = r.order.front().cloned() {
                if r.order.len() <= MAX_REVOKED && t.elapsed() < REVOKED_FOR {
                    break;
                }
                r.order.pop_front();
                if r.at.get(&id) == Some(&t) {
                    r.at.remove(&id);
                }
            }
        }
        if !terminate {
            return 0;
        }
        let running = lock(&self.running);
        ids.iter()
            .filter_map(|id| running.get(id))
            .map(CancellationToken::cancel)
            .count()
    }

    /// Registers a running job; the guard unregisters it.
    pub fn started(self: &Arc<Self>, id: &str, token: CancellationToken) -> RunningGuard {
        lock(&self.running).insert(id.to_owned(), token);
        RunningGuard {
            state: self.clone(),
            id: id.to_owned(),
        }
    }
}

/// Unregisters a running job when dropped.
pub(crate) struct RunningGuard {
    state: Arc<ControlState>,
    id: String,
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        lock(&self.state.running).remove(&self.id);
    }
}

/// Serves control requests for node `hostname` until `stop` fires. `shutdown_requested` is
/// cancelled when a `shutdown` request arrives.
pub(crate) async fn listen(
    broker: Arc<dyn Broker>,
    hostname: String,
    state: Arc<ControlState>,
    stop: CancellationToken,
    shutdown_requested: CancellationToken,
) {
    let queue = pidbox_queue(&hostname);
    let mut sub = tokio::select! {
        s = broker.subscribe(PIDBOX_EXCHANGE, "", &queue) => match s {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "remote control is not available on this broker; revoke will not reach this worker");
                return;
            }
        },
        _ = stop.cancelled() => return,
    };
    loop {
        let message = tokio::select! {
            m = sub.next() => m,
            _ = stop.cancelled() => return,
        };
        let message = match message {
            Ok(Some(m)) => m,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "remote control stopped");
                return;
            }
        };
        let request = match ControlRequest::from_message(&message) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring a malformed control request");
                continue;
            }
        };
        if !request.is_for(&hostname) {
            continue;
        }
        match request.method.as_str() {
            "revoke" | "terminate" => {
                let ids = task_ids(request.arguments.get("task_id"));
                let terminate = request.method == "terminate"
                    || request
                        .arguments
                        .get("terminate")
                        .and_then(Value::as_bool)
                        .unwrap_or(false);
                let stopped = state.revoke(&ids, terminate);
                tracing::info!(?ids, terminate, terminated_here = stopped, "revoked");
            }
            "shutdown" => {
                tracing::warn!("shutdown requested by remote control");
                shutdown_requested.cancel();
            }
            other => tracing::debug!(method = other, "control request not handled yet"),
        }
    }
}

/// `task_id` as one id or a list of ids.
fn task_ids(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revoked_ids_are_remembered_and_running_ones_terminated() {
        let s = Arc::new(ControlState::default());
        let token = CancellationToken::new();
        let guard = s.started("run-1", token.clone());
        assert_eq!(s.revoke(&["a".into(), "run-1".into()], false), 0);
        assert!(s.is_revoked("a") && s.is_revoked("run-1") && !s.is_revoked("b"));
        assert!(!token.is_cancelled());
        assert_eq!(s.revoke(&["run-1".into()], true), 1);
        assert!(token.is_cancelled());
        drop(guard);
        assert_eq!(s.revoke(&["run-1".into()], true), 0);
    }

    #[test]
    fn the_set_is_bounded() {
        let s = ControlState::default();
        let ids: Vec<String> = (0..MAX_REVOKED + 10).map(|i| i.to_string()).collect();
        s.revoke(&ids, false);
        assert!(!s.is_revoked("0") && s.is_revoked(&(MAX_REVOKED + 9).to_string()));
        assert_eq!(lock(&s.revoked).at.len(), MAX_REVOKED);
    }
}
