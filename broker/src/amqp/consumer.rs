//! The consuming side: one connection and channel per consumer, a `basic.consume` per queue, merged
//! into one stream of [`Delivery`]s acked through lapin's acker.
//!
//! The prefetch window is the broker's (`basic.qos`): per consumer, plus a channel-wide cap when one
//! consumer reads several classic queues (quorum queues refuse a channel-wide limit, so there each queue
//! gets its own window). A new per-consumer prefetch only applies to consumers started after it, so
//! [`Consumer::set_prefetch`] cancels and restarts the consumers on the same channel, keeping the
//! deliveries already received.
//!
//! When the connection or channel dies the consumer reconnects by itself (100 ms doubling to 5 s,
//! one warning per attempt), re-declares its queues and consumes again. Deliveries handed out before
//! the drop cannot be acked any more (the broker has requeued them); their ack returns an error.
//! RabbitMQ's `consumer_timeout` is one such drop: a delivery held unacked past it closes the channel
//! (every delivery in flight there runs again); a warning then names the cause and the remedy, and the
//! URL's `consumer_timeout` option is passed as each consumer's `x-consumer-timeout` argument.
//!
//! Acks and rejects go through the channel's [`AckGroup`], which sends a run of finished acks as one
//! `basic.ack(multiple)`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::stream::{self, BoxStream, SelectAll, StreamExt};
use lapin::message::Delivery as LapinDelivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::ShortString;
use lapin::{Channel, Connection};
use tokio_util::sync::CancellationToken;

use super::ack_group::{AckGroup, Settle};
use super::config::AmqpConfig;
use super::connection::{connect, lapin_err, Failure};
use super::props::to_message;
use super::publisher::Publisher;
use super::topology::declare_task_queue;
use crate::backoff::Backoff;
use crate::error::{BrokerError, Result};
use crate::message::Message;
use crate::transport::{AckHandle, Consumer, Delivery};

/// Bound on the polite shutdown steps (cancel, channel close, connection close, draining).
const STEP_TIMEOUT: Duration = Duration::from_secs(5);
/// A session that breaks sooner than this counts as a failed attempt (so a broker that accepts and
/// then drops us at once is retried with backoff, not in a tight loop).
const STABLE_AFTER: Duration = Duration::from_secs(5);

/// What the merged stream yields: the queue, then a delivery (or error), or `None` when that queue's
/// consumer ended (cancelled by us or by the broker, or its channel died).
type Item = (Arc<str>, Option<lapin::Result<LapinDelivery>>);

/// One connection's worth of consuming.
struct Session {
    conn: Connection,
    channel: Channel,
    /// Settles the channel's deliveries.
    acks: Arc<AckGroup>,
    tags: Vec<ShortString>,
    opened: Instant,
    /// Behind a mutex only to be `Sync` (it is reached through `&mut self`, never locked).
    stream: Mutex<Merged>,
}

type Merged = SelectAll<BoxStream<'static, Item>>;

impl Session {
    fn stream(&mut self) -> &mut Merged {
        self.stream.get_mut().unwrap_or_else(|e| e.into_inner())
    }
}

pub(crate) struct AmqpConsumer {
    config: Arc<AmqpConfig>,
    /// Used to park deliveries that are not due yet.
    publisher: Arc<Publisher>,
    queues: Vec<(Arc<str>, ShortString)>,
    prefetch: u16,
    session: Option<Session>,
    /// Deliveries drained from consumers restarted by `set_prefetch`, handed out first.
    pending: VecDeque<(Arc<str>, LapinDelivery)>,
    /// Cancelled when the broker handle is closed.
    shutdown: CancellationToken,
    closed: bool,
    /// Reconnect delays; reset once a session has stayed up for [`STABLE_AFTER`].
    backoff: Backoff,
    /// The last session broke quickly: wait before the first reconnect attempt.
    wait_first: bool,
}

/// True if RabbitMQ closed the channel because a delivery stayed unacked past its consumer timeout
/// ("PRECONDITION_FAILED - delivery acknowledgement on channel 1 timed out ...").
fn is_consumer_timeout(reason: &str) -> bool {
    reason.contains("delivery acknowledgement") && reason.contains("timed out")
}

fn qos_count(prefetch: usize) -> u16 {
    u16::try_from(prefetch.max(1)).unwrap_or(u16::MAX)
}

impl AmqpConsumer {
    /// Connects and starts consuming; any failure here is returned (no retry).
    pub async fn start(
        config: Arc<AmqpConfig>,
        publisher: Arc<Publisher>,
        queues: Vec<(Arc<str>, ShortString)>,
        prefetch: usize,
        shutdown: CancellationToken,
    ) -> Result<Self> {
        // A consumer takes whatever producers sent: it offers a frame big enough for any header.
        let mut consumer = AmqpConsumer {
            config: Arc::new(config.for_receiving()),
            publisher,
            queues,
            prefetch: qos_count(prefetch),
            session: None,
            pending: VecDeque::new(),
            shutdown,
            closed: false,
            backoff: Backoff::default(),
            wait_first: false,
        };
        consumer.session = Some(consumer.open().await.map_err(|f| f.error)?);
        Ok(consumer)
    }

    async fn open(&self) -> std::result::Result<Session, Failure> {
        let conn = connect(&self.config, "consumer").await?;
        // A connection cut in the middle of the set-up must not leave it waiting forever: the
        // whole of it is bounded like the handshake, and retried.
        let limit = self.config.connect_timeout;
        let set_up = match tokio::time::timeout(limit, self.set_up(&conn)).await {
            Ok(r) => r,
            Err(_) => Err(Failure {
                error: BrokerError::Timeout(limit),
                fatal: false,
            }),
        };
        let (channel, tags, stream) = match set_up {
            Ok(parts) => parts,
            Err(f) => {
                let _ = tokio::time::timeout(STEP_TIMEOUT, conn.close(200, "OK".into())).await;
                return Err(f);
            }
        };
        tracing::debug!(url = %self.config.redacted, queues = self.queues.len(), "amqp: consuming");
        Ok(Session {
            conn,
            acks: AckGroup::new(channel.clone()),
            channel,
            tags,
            opened: Instant::now(),
            stream: Mutex::new(stream),
        })
    }

    /// A channel on `conn` with the qos, the queues declared and their consumers started.
    async fn set_up(
        &self,
        conn: &Connection,
    ) -> std::result::Result<(Channel, Vec<ShortString>, Merged), Failure> {
        let channel = conn.create_channel().await?;
        self.apply_qos(&channel).await?;
        for (_, name) in &self.queues {
            declare_task_queue(&channel, name, &self.config.queue_args).await?;
        }
        let (tags, stream) = self.start_consumers(&channel).await?;
        Ok((channel, tags, stream))
    }

    async fn apply_qos(&self, channel: &Channel) -> lapin::Result<()> {
        channel
            .basic_qos(self.prefetch, BasicQosOptions { global: false })
            .await?;
        if self.queues.len() > 1 && !self.config.quorum {
            channel
                .basic_qos(self.prefetch, BasicQosOptions { global: true })
                .await?;
        }
        Ok(())
    }

    async fn start_consumers(
        &self,
        channel: &Channel,
    ) -> lapin::Result<(Vec<ShortString>, Merged)> {
        let mut tags = Vec::with_capacity(self.queues.len());
        let mut merged = SelectAll::new();
        for (queue, name) in &self.queues {
            let tag = ShortString::from(format!("celerity-{}", uuid::Uuid::new_v4()));
            let consumer = channel
                .basic_consume(
                    name.clone(),
                    tag.clone(),
                    BasicConsumeOptions::default(),
                    self.config.consumer_args.clone(),
                )
                .await?;
            let (q, end) = (queue.clone(), queue.clone());
            merged.push(
                consumer
                    .map(move |d| (q.clone(), Some(d)))
                    .chain(stream::once(async move { (end, None) }))
                    .boxed(),
            );
            tags.push(tag);
        }
        Ok((tags, merged))
    }

    /// Opens a new session, retrying with backoff until it works, the broker handle is closed
    /// (`Ok(None)`) or the broker refuses for good.
    async fn reconnect(&mut self) -> Result<Option<Session>> {
        if std::mem::take(&mut self.wait_first)
            && !self
                .pause(&"the last session broke right after it opened")
                .await
        {
            return Ok(None);
        }
        loop {
            match self.open().await {
                Ok(session) => {
                    tracing::info!(url = %self.config.redacted, "amqp: consumer reconnected");
                    return Ok(Some(session));
                }
                Err(f) if f.fatal => return Err(f.error),
                Err(f) => {
                    if !self.pause(&f.error).await {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// Logs why (once per attempt) and sleeps the next backoff delay; false if the broker handle was
    /// closed meanwhile.
    async fn pause(&mut self, why: &(dyn std::fmt::Display + Sync)) -> bool {
        let delay = self.backoff.next();
        let attempt = self.backoff.attempts();
        tracing::warn!(url = %self.config.redacted, reason = %why, attempt, retry_in = ?delay, "amqp: consumer cannot reconnect yet");
        tokio::select! {
            _ = self.shutdown.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }

    /// Hands out a delivery of the current session, recorded with its ack group first.
    fn delivery(&self, queue: &str, d: LapinDelivery) -> Option<Delivery> {
        let acks = self.session.as_ref()?.acks.clone();
        acks.delivered(d.delivery_tag);
        let message = to_message(&d.properties, d.data);
        Some(Delivery::new(
            message,
            queue.to_owned(),
            d.redelivered,
            Box::new(AmqpAck {
                acks,
                tag: d.delivery_tag,
                publisher: self.publisher.clone(),
            }),
            None,
        ))
    }

    /// Cancels the consumers of the current session and keeps what they had already received.
    async fn stop_consumers(&mut self) -> Result<()> {
        let Some(session) = self.session.as_mut() else {
            return Ok(());
        };
        for tag in &session.tags {
            session
                .channel
                .basic_cancel(tag.clone(), BasicCancelOptions::default())
                .await
                .map_err(lapin_err)?;
        }
        let drain = async {
            while let Some((queue, item)) = session.stream().next().await {
                if let Some(Ok(d)) = item {
                    self.pending.push_back((queue, d));
                }
            }
        };
        tokio::time::timeout(STEP_TIMEOUT, drain)
            .await
            .map_err(|_| BrokerError::Timeout(STEP_TIMEOUT))
    }

    /// `set_prefetch` on a live session: new qos, then restart the consumers under it.
    async fn restart_consumers(&mut self) -> Result<()> {
        self.stop_consumers().await?;
        let Some(session) = self.session.as_ref() else {
            return Ok(());
        };
        self.apply_qos(&session.channel).await.map_err(lapin_err)?;
        let (tags, stream) = self
            .start_consumers(&session.channel)
            .await
            .map_err(lapin_err)?;
        if let Some(session) = self.session.as_mut() {
            session.tags = tags;
            *session.stream() = stream;
        }
        Ok(())
    }

    async fn shut_session(session: Session) {
        for tag in &session.tags {
            let cancel = session
                .channel
                .basic_cancel(tag.clone(), BasicCancelOptions::default());
            let _ = tokio::time::timeout(STEP_TIMEOUT, cancel).await;
        }
        if session.channel.status().connected() {
            let _ =
                tokio::time::timeout(STEP_TIMEOUT, session.channel.close(200, "OK".into())).await;
        }
        if session.conn.status().connected() {
            let _ = tokio::time::timeout(STEP_TIMEOUT, session.conn.close(200, "OK".into())).await;
        }
    }
}

#[async_trait]
impl Consumer for AmqpConsumer {
    async fn next(&mut self) -> Result<Option<Delivery>> {
        loop {
            if self.closed || self.shutdown.is_cancelled() {
                self.close().await?;
                return Ok(None);
            }
            if let Some((queue, d)) = self.pending.pop_front() {
                match self.delivery(&queue, d) {
                    Some(d) => return Ok(Some(d)),
                    None => continue,
                }
            }
            let Some(session) = self.session.as_mut() else {
                self.session = self.reconnect().await?;
                continue;
            };
            let item = tokio::select! {
                _ = self.shutdown.cancelled() => continue,
                item = session.stream().next() => item,
            };
            let reason = match item {
                Some((queue, Some(Ok(d)))) => match self.delivery(&queue, d) {
                    Some(d) => return Ok(Some(d)),
                    None => continue,
                },
                Some((queue, Some(Err(e)))) => format!("consumer of `{queue}` failed: {e}"),
                Some((queue, None)) => format!("consumer of `{queue}` was cancelled by the broker"),
                None => "all consumers ended".to_owned(),
            };
            tracing::warn!(url = %self.config.redacted, %reason, "amqp: consumer lost its channel; reconnecting");
            if is_consumer_timeout(&reason) {
                tracing::warn!(
                    "amqp: RabbitMQ's consumer_timeout ran out on a delivery that was still running: every job \
                     in flight on that channel goes back to the queue and runs again. Set RabbitMQ's \
                     consumer_timeout above your longest job (rabbitmq.conf, a `consumer-timeout` policy on \
                     those queues, or `?consumer_timeout=SECONDS` on the broker URL with RabbitMQ >= 3.12)"
                );
            }
            if let Some(old) = self.session.take() {
                if old.opened.elapsed() >= STABLE_AFTER {
                    self.backoff.reset();
                } else {
                    self.wait_first = true;
                }
                // Let it close in the background: the broker requeues what it had delivered.
                tokio::spawn(Self::shut_session(old));
            }
        }
    }

    async fn set_prefetch(&mut self, prefetch: usize) -> Result<()> {
        let prefetch = qos_count(prefetch);
        if prefetch == self.prefetch {
            return Ok(());
        }
        self.prefetch = prefetch;
        if let Err(e) = self.restart_consumers().await {
            // The next `next()` reconnects with the new window.
            tracing::warn!(error = %e, "amqp: restarting consumers for a new prefetch failed; reconnecting");
            // Their channel is going away: the broker requeues them, acking them would fail.
            self.pending.clear();
            if let Some(old) = self.session.take() {
                tokio::spawn(Self::shut_session(old));
            }
        }
        Ok(())
    }

    async fn close(&mut self) -> Result<()> {
        self.closed = true;
        self.pending.clear();
        if let Some(session) = self.session.take() {
            Self::shut_session(session).await;
        }
        Ok(())
    }
}

/// Settles one delivery through its channel's [`AckGroup`].
struct AmqpAck {
    acks: Arc<AckGroup>,
    tag: u64,
    publisher: Arc<Publisher>,
}

#[async_trait]
impl AckHandle for AmqpAck {
    async fn ack(self: Box<Self>) -> Result<()> {
        self.acks.settle(self.tag, Settle::Ack).await
    }

    async fn reject(self: Box<Self>, requeue: bool) -> Result<()> {
        self.acks.settle(self.tag, Settle::Reject { requeue }).await
    }

    /// Only hops of a second or more exist; nearer jobs are held by the worker.
    fn can_park(&self, due: std::time::SystemTime) -> bool {
        let remaining = due
            .duration_since(std::time::SystemTime::now())
            .map_or(0.0, |d| d.as_secs_f64());
        super::delay::hop_for(remaining).is_some()
    }

    /// Re-publishes the message to the longest delay level that does not pass `due` (confirmed),
    /// then acks this delivery. Should the process die between the two, the message exists twice;
    /// the worker drops the second run of a finished job only when it comes back redelivered.
    async fn park(
        self: Box<Self>,
        message: &Message,
        queue: &str,
        due: std::time::SystemTime,
    ) -> Result<()> {
        let remaining = due
            .duration_since(std::time::SystemTime::now())
            .map_or(0.0, |d| d.as_secs_f64());
        let Some(seconds) = super::delay::hop_for(remaining) else {
            let _ = self.reject(true).await;
            return Err(BrokerError::Transport {
                transport: "amqp",
                message: "due in under a second: nothing to park".into(),
            });
        };
        if let Err(e) = self
            .publisher
            .publish_delayed(queue, message, seconds)
            .await
        {
            // Not parked: give it back so it is delivered again rather than stuck unacked here.
            let _ = self.reject(true).await;
            return Err(e);
        }
        self.ack().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_rabbitmqs_consumer_timeout() {
        // As lapin reports it (RabbitMQ 3.10).
        let reason = "consumer of `q` failed: protocol error: AMQP soft error: PRECONDITION-FAILED: \
                      PRECONDITION_FAILED - delivery acknowledgement on channel 1 timed out. Timeout \
                      value used: 2000 ms. This timeout value can be configured, see consumers doc \
                      guide to learn more";
        assert!(is_consumer_timeout(reason));
        assert!(!is_consumer_timeout(
            "consumer of `q` was cancelled by the broker"
        ));
    }
}
