//! The control listener: listens on Celery's pidbox fanout (`celery.pidbox`) for requests
//! addressed to this worker (`destination` null or naming it, or a `glob` pattern matching it),
//! has `commands.rs` act on them and, when the request carries a ticket, replies the way a Celery
//! worker does: to `reply_to.exchange` (`reply.celery.pidbox`) with routing key
//! `reply_to.routing_key`, headers `{ticket, clock}`, body `{"<node>": reply}`. A subscription
//! that fails or ends while the worker runs is made again, with a backoff. Python's
//! `celery inspect …` / `app.control.…` and `celerity inspect|control …` send the same requests.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use celerity_broker::backoff::Backoff;
use celerity_broker::protocol::control::{
    pidbox_queue, reply_message, ControlRequest, PIDBOX_EXCHANGE,
};
use celerity_broker::protocol::event;
use celerity_broker::transport::Subscription;
use celerity_broker::{Broker, BrokerError, Message};

use crate::commands::{self, Remote};

/// The running listener.
pub(crate) struct ControlListener {
    stop: CancellationToken,
    handle: JoinHandle<()>,
}

impl ControlListener {
    /// Starts serving control requests for `remote.hostname` from `broker`.
    pub fn start(broker: Arc<dyn Broker>, remote: Remote) -> ControlListener {
        let stop = CancellationToken::new();
        let handle = tokio::spawn(listen(broker, remote, stop.clone()));
        ControlListener { stop, handle }
    }

    /// Stops listening at once; the returned future resolves when the listener has ended (a
    /// request being answered is finished first).
    pub fn stop(self) -> impl std::future::Future<Output = ()> {
        self.stop.cancel();
        async move {
            if let Err(e) = self.handle.await {
                tracing::warn!(error = %e, "the control listener ended abnormally");
            }
        }
    }
}

/// A subscription that served this long resets the resubscribe backoff.
const STABLE_AFTER: Duration = Duration::from_secs(5);

/// Subscribes and serves; after any failure of the subscription (an error, or its end while the
/// worker still runs) subscribes again after a backoff, so the worker never goes deaf to remote
/// control. Ends when stopped or when the broker is closed.
async fn listen(broker: Arc<dyn Broker>, remote: Remote, stop: CancellationToken) {
    let queue = pidbox_queue(&remote.hostname);
    let mut backoff = Backoff::default();
    loop {
        let subscribed = tokio::select! {
            s = broker.subscribe(PIDBOX_EXCHANGE, "", &queue) => s,
            _ = stop.cancelled() => return,
        };
        let reason = match subscribed {
            Ok(mut sub) => {
                let began = Instant::now();
                let ended = serve_all(&*broker, &remote, &mut *sub, &stop).await;
                sub.close().await;
                let Some(reason) = ended else { return };
                if began.elapsed() >= STABLE_AFTER {
                    backoff.reset();
                }
                reason
            }
            Err(BrokerError::Closed) => return,
            Err(e) => e.to_string(),
        };
        let delay = backoff.next();
        tracing::warn!(reason, attempt = backoff.attempts(), retry_in = ?delay,
            "remote control: the subscription failed; subscribing again (revoke and inspect do not reach this worker meanwhile)");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Serves requests from `sub` until stopped (`None`) or until the subscription fails or ends
/// (why, as `Some`).
async fn serve_all(
    broker: &dyn Broker,
    remote: &Remote,
    sub: &mut dyn Subscription,
    stop: &CancellationToken,
) -> Option<String> {
    loop {
        let message = tokio::select! {
            m = sub.next() => m,
            _ = stop.cancelled() => return None,
        };
        match message {
            Ok(Some(m)) => serve(broker, remote, &m).await,
            Ok(None) => return Some("the subscription ended".to_owned()),
            Err(e) => return Some(e.to_string()),
        }
    }
}

/// Answers one pidbox message, if it is a request for this node that its sender still waits for.
async fn serve(broker: &dyn Broker, remote: &Remote, message: &Message) {
    let request = match ControlRequest::from_message(message) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "ignoring a malformed control request");
            return;
        }
    };
    if !request.is_for(&remote.hostname) {
        return;
    }
    if let Some(seen) = message.headers.get("clock").and_then(Value::as_u64) {
        remote.clock.adjust(seen);
    } else {
        remote.clock.forward();
    }
    // A request whose sender stopped waiting needs no answer.
    let expired = message
        .headers
        .get("expires")
        .and_then(Value::as_f64)
        .is_some_and(|e| e > 0.0 && e < event::timestamp());
    if expired {
        return;
    }
    let reply = commands::dispatch(remote, &request);
    if let (Some((exchange, key)), Some(ticket), Some(reply)) =
        (request.reply_target(), request.ticket.as_deref(), reply)
    {
        let m = reply_message(&remote.hostname, ticket, remote.clock.forward(), reply);
        if let Err(e) = broker.broadcast(&exchange, &key, &m).await {
            tracing::warn!(error = %e, method = request.method, "could not send a control reply");
        }
    }
}
