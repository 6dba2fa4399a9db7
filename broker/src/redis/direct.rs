//! Direct exchanges that are not task queues, on Redis: Celery's remote-control replies
//! (`reply.<namespace>.pidbox`), routed the way kombu's virtual transport routes a direct exchange.
//!
//! kombu does not PUBLISH replies: a reply is published to the direct exchange `reply.celery.pidbox`
//! with the asking client's oid as routing key; the transport reads the exchange's binding set
//! (`_kombu.binding.reply.celery.pidbox`, members `<routing_key>␆␖<pattern>␆␖<queue>`), and `LPUSH`es
//! the envelope to every queue bound with that routing key — the client's `<oid>.reply.celery.pidbox`
//! list, which it `BRPOP`s. A reply nobody is bound for is dropped, as kombu drops it.
//!
//! Subscribing here is what a kombu client does before it asks: add the binding, then pop its list.
//! A task per subscription pops with a short blocking timeout on a connection of its own (so it
//! notices a stop within a second), reconnects with a backoff when the connection drops, and, when
//! the subscription is dropped or the broker closed, removes the binding and deletes the list.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::AsyncConnectionConfig;
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::envelope;
use super::keys::{binding_member, SEP};
use super::shared::{Shared, CONNECT_TIMEOUT};
use crate::backoff::Backoff;
use crate::error::Result;
use crate::message::{Message, TRANSIENT};
use crate::transport::Subscription;

/// Seconds one BRPOP blocks before the task checks whether it should stop.
const POP_TIMEOUT_S: f64 = 1.0;
/// Messages waiting for `next()`.
const BUFFER: usize = 256;
/// The sweep deadline a binding gets (kombu's minimum binding TTL, one hour).
const BINDING_TTL: Duration = Duration::from_secs(3600);

/// A connection whose replies may take as long as a blocking pop (plus slack).
fn connection_config() -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(
            Duration::from_secs_f64(POP_TIMEOUT_S) + CONNECT_TIMEOUT,
        ))
}

/// True for the exchanges this module routes: `reply.<namespace>.pidbox` (the only direct exchange
/// Celery uses outside task queues).
pub(crate) fn is_direct(exchange: &str) -> bool {
    exchange.starts_with("reply.") && exchange.ends_with(".pidbox")
}

/// Pushes `message` to every queue bound to `exchange` with exactly `routing_key` (see the module
/// doc). Returns how many queues got it.
pub(crate) async fn publish(
    shared: &Shared,
    exchange: &str,
    routing_key: &str,
    message: &Message,
) -> Result<usize> {
    let mut conn = shared.conn.clone();
    let members: Vec<String> = redis::cmd("SMEMBERS")
        .arg(shared.keys.binding(exchange))
        .query_async(&mut conn)
        .await?;
    let queues: Vec<&str> = members
        .iter()
        .filter_map(|m| {
            let mut parts = m.splitn(3, SEP);
            let key = parts.next()?;
            let _pattern = parts.next()?;
            let queue = parts.next()?;
            (key == routing_key).then_some(queue)
        })
        .collect();
    if queues.is_empty() {
        tracing::debug!(
            exchange,
            routing_key,
            "redis: nobody is bound for this reply; dropped"
        );
        return Ok(0);
    }
    let mut m = message.clone();
    m.properties.delivery_mode = TRANSIENT;
    let payload = envelope::encode(&m, exchange, routing_key);
    let mut pipe = redis::pipe();
    for q in &queues {
        // kombu pushes a reply (which has no priority) to the list of priority step 0.
        pipe.cmd("LPUSH")
            .arg(shared.keys.queue(q, 0))
            .arg(&payload)
            .ignore();
    }
    pipe.exec_async(&mut conn).await?;
    Ok(queues.len())
}

/// Binds list `queue` to `exchange` with `routing_key` and starts popping it.
pub(crate) async fn subscribe(
    shared: &Arc<Shared>,
    exchange: &str,
    routing_key: &str,
    queue: &str,
) -> Result<DirectSubscription> {
    let binding = shared.keys.binding(exchange);
    let member = binding_member(routing_key, "", queue);
    let mut conn = shared.conn.clone();
    // As kombu binds a queue that has `x-expires`: the table gets a sweep deadline (pushed later,
    // never earlier), so a binding left by a process that died is cleaned up by kombu's sweep.
    let deadline_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
        + BINDING_TTL.as_millis() as u64;
    redis::pipe()
        .cmd("SADD")
        .arg(&binding)
        .arg(&member)
        .ignore()
        .cmd("ZADD")
        .arg(shared.keys.binding_deadlines())
        .arg("GT")
        .arg(deadline_ms)
        .arg(exchange)
        .ignore()
        .exec_async(&mut conn)
        .await?;
    let stop = shared.closed.child_token();
    let (tx, rx) = mpsc::channel(BUFFER);
    let popper = Popper {
        shared: shared.clone(),
        list: shared.keys.queue(queue, 0),
        binding,
        member,
        tx,
        stop: stop.clone(),
    };
    let task = tokio::spawn(popper.run());
    Ok(DirectSubscription {
        rx,
        stop: stop.clone(),
        task: Some(task),
        _guard: stop.drop_guard(),
    })
}

/// Messages pushed to one bound list.
pub(crate) struct DirectSubscription {
    rx: mpsc::Receiver<Message>,
    stop: CancellationToken,
    /// The popping task (which unbinds when it ends).
    task: Option<tokio::task::JoinHandle<()>>,
    _guard: DropGuard,
}

#[async_trait]
impl Subscription for DirectSubscription {
    async fn next(&mut self) -> Result<Option<Message>> {
        tokio::select! {
            biased;
            m = self.rx.recv() => Ok(m),
            () = self.stop.cancelled() => Ok(None),
        }
    }

    /// Stops popping and waits for the binding and list to be removed.
    async fn close(&mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

/// The task that pops one list.
struct Popper {
    shared: Arc<Shared>,
    list: String,
    binding: String,
    member: String,
    tx: mpsc::Sender<Message>,
    stop: CancellationToken,
}

impl Popper {
    async fn run(self) {
        let mut backoff = Backoff::default();
        let mut conn = None;
        while !self.stop.is_cancelled() && !self.tx.is_closed() {
            let c = match conn.take() {
                Some(c) => c,
                None => match tokio::time::timeout(
                    CONNECT_TIMEOUT,
                    self.shared
                        .client
                        .get_multiplexed_async_connection_with_config(&connection_config()),
                )
                .await
                {
                    Ok(Ok(c)) => c,
                    failed => {
                        let reason = match failed {
                            Ok(Err(e)) => e.to_string(),
                            _ => format!("no answer within {CONNECT_TIMEOUT:?}"),
                        };
                        let delay = backoff.next();
                        tracing::warn!(list = %self.list, %reason, retry_in = ?delay, "redis: reply queue cannot connect yet");
                        tokio::select! {
                            () = self.stop.cancelled() => break,
                            () = tokio::time::sleep(delay) => continue,
                        }
                    }
                },
            };
            let mut c = c;
            let mut brpop = redis::cmd("BRPOP");
            brpop.arg(&self.list).arg(POP_TIMEOUT_S);
            let popped: redis::RedisResult<Option<(String, Vec<u8>)>> = tokio::select! {
                () = self.stop.cancelled() => break,
                () = self.tx.closed() => break,
                r = brpop.query_async(&mut c) => r,
            };
            match popped {
                Ok(None) => conn = Some(c),
                Ok(Some((_, raw))) => {
                    backoff.reset();
                    conn = Some(c);
                    match envelope::decode(&raw) {
                        Ok(d) => {
                            if self.tx.send(d.message).await.is_err() {
                                break;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(list = %self.list, error = %e, "redis: skipping a reply that is not a kombu envelope")
                        }
                    }
                }
                Err(e) => {
                    let delay = backoff.next();
                    tracing::warn!(list = %self.list, error = %e, retry_in = ?delay, "redis: reply queue lost its connection; reconnecting");
                    tokio::select! {
                        () = self.stop.cancelled() => break,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        self.unbind().await;
    }

    /// Removes the binding and the list (kombu's auto-delete of a reply queue).
    async fn unbind(&self) {
        let mut conn = self.shared.conn.clone();
        let mut pipe = redis::pipe();
        pipe.cmd("SREM")
            .arg(&self.binding)
            .arg(&self.member)
            .ignore()
            .cmd("DEL")
            .arg(&self.list)
            .ignore();
        let done = pipe.exec_async(&mut conn);
        match tokio::time::timeout(Duration::from_secs(2), done).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(list = %self.list, error = %e, "redis: could not unbind a reply queue")
            }
            Err(_) => {
                tracing::debug!(list = %self.list, "redis: unbinding a reply queue timed out")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_direct;

    #[test]
    fn only_reply_exchanges_are_direct() {
        assert!(is_direct("reply.celery.pidbox"));
        assert!(is_direct("reply.myapp.pidbox"));
        assert!(!is_direct("celery.pidbox"));
        assert!(!is_direct("celeryev"));
    }
}
