//! Broadcasts on RabbitMQ — Celery's remote control (`celery.pidbox`) and events (`celeryev`) —
//! declared and consumed the way Celery does (the declarations are in `topology.rs`).
//!
//! Broadcasting goes through a [`Broadcaster`]: one connection and channel of its own, opened on the
//! first broadcast and replaced when it dies. Each exchange is declared once per channel, then
//! messages are published to it transient (`delivery_mode` 1), without publisher confirms (as
//! Celery publishes control commands and events). A publish that finds its connection or channel
//! broken reconnects and is sent once more; without confirms, a connection that dies after the
//! frames were written can still lose a broadcast, as it can for Celery.
//!
//! A subscription ([`AmqpSubscription`]) is its own connection: it declares the exchange and an
//! exclusive, auto-deleted queue named after the subscriber, binds it with the binding key and
//! consumes it with `no_ack`. A task per subscription forwards what arrives to
//! [`AmqpSubscription::next`] (which is therefore cancel-safe) and, when the connection or channel
//! drops, reconnects with a backoff (one warning per attempt), declares and binds again and goes on
//! (broadcasts sent meanwhile are missed, as with Celery). The queue goes away with the connection,
//! when the broker is closed or the subscription dropped.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::StreamExt as _;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::Connection;
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::config::AmqpConfig;
use super::connection::{connect, lapin_err, Failure};
use super::link::LinkSlot;
use super::props::{to_message, to_properties};
use super::table::short_string;
use super::topology::{declare_fanout_exchange, declare_subscriber_queue, fanout_spec, FanoutSpec};
use crate::backoff::Backoff;
use crate::error::{BrokerError, Result};
use crate::message::{Message, TRANSIENT};
use crate::transport::Subscription;

/// Bound on closing a connection we are done with.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// A subscriber connection that lasted this long resets the reconnect backoff.
const STABLE_AFTER: Duration = Duration::from_secs(5);
/// Messages waiting for `next()`.
const BUFFER: usize = 256;

/// Publishes broadcasts (see the module doc).
pub(crate) struct Broadcaster {
    link: LinkSlot,
}

impl Broadcaster {
    pub(crate) fn new(config: Arc<AmqpConfig>) -> Self {
        Broadcaster {
            link: LinkSlot::new(config, "broadcaster", false),
        }
    }

    /// Publishes `message` on `exchange` with `routing_key`; on a lost connection or channel,
    /// reconnects and publishes once more.
    pub(crate) async fn broadcast(
        &self,
        exchange: &str,
        routing_key: &str,
        message: &Message,
    ) -> Result<()> {
        let name = short_string(exchange, "exchange name")?;
        let key = short_string(routing_key, "routing key")?;
        let props = to_properties(message)?.with_delivery_mode(TRANSIENT);
        let mut retried = false;
        loop {
            let link = self.link.get().await?;
            let sent = async {
                if !link.is_declared(exchange) {
                    declare_fanout_exchange(&link.channel, &name, &fanout_spec(exchange))
                        .await
                        .map_err(lapin_err)?;
                    link.mark_declared(exchange);
                }
                // Without confirms the returned future resolves at once; nothing to wait for.
                link.channel
                    .basic_publish(
                        name.clone(),
                        key.clone(),
                        BasicPublishOptions::default(),
                        &message.body,
                        props.clone(),
                    )
                    .await
                    .map(drop)
                    .map_err(lapin_err)
            };
            match sent.await {
                Err(e) if e.is_connection() && !retried && !self.link.is_closed() => {
                    tracing::warn!(error = %e, exchange, "amqp: broadcast hit a lost connection; reconnecting and retrying once");
                    self.link.discard(&link).await;
                    retried = true;
                }
                other => return other,
            }
        }
    }

    /// Closes the connection; later broadcasts fail with [`BrokerError::Closed`].
    pub(crate) async fn close(&self) {
        self.link.close().await;
    }
}

/// What a subscription declares and consumes.
struct Target {
    exchange: ShortString,
    binding_key: ShortString,
    queue: ShortString,
    spec: FanoutSpec,
}

/// One connection's worth of subscribing.
struct Session {
    conn: Connection,
    consumer: lapin::Consumer,
    opened: Instant,
}

impl Session {
    async fn open(config: &AmqpConfig, target: &Target) -> std::result::Result<Self, Failure> {
        let conn = connect(config, "subscriber").await?;
        let channel = conn.create_channel().await?;
        declare_subscriber_queue(
            &channel,
            &target.exchange,
            &target.binding_key,
            &target.queue,
            &target.spec,
        )
        .await?;
        let consumer = channel
            .basic_consume(
                target.queue.clone(),
                ShortString::from(format!("celerity-{}", uuid::Uuid::new_v4())),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok(Session {
            conn,
            consumer,
            opened: Instant::now(),
        })
    }

    /// Closes the connection (the broker deletes the exclusive queue with it).
    async fn close(self) {
        if self.conn.status().connected() {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.conn.close(200, "OK".into())).await;
        }
    }
}

/// Subscribes queue `name` to `exchange` with `binding_key` (see the module doc). Fails if the first
/// connection or declaration fails; `shutdown` (the broker's) ends it.
pub(crate) async fn subscribe(
    config: Arc<AmqpConfig>,
    exchange: &str,
    binding_key: &str,
    name: &str,
    shutdown: &CancellationToken,
) -> Result<AmqpSubscription> {
    if shutdown.is_cancelled() {
        return Err(BrokerError::Closed);
    }
    let target = Target {
        exchange: short_string(exchange, "exchange name")?,
        binding_key: short_string(binding_key, "binding key")?,
        queue: short_string(name, "queue name")?,
        spec: fanout_spec(exchange),
    };
    // A subscriber takes whatever a Celery client broadcast: a remote-control request may carry
    // headers over our default frame (16 KiB), which would close the connection on every try.
    let config = Arc::new(config.for_receiving());
    let first = Session::open(&config, &target).await.map_err(|f| f.error)?;
    tracing::debug!(exchange, binding_key, queue = name, "amqp: subscribed");
    let stop = shutdown.child_token();
    let (tx, rx) = mpsc::channel(BUFFER);
    let task = Subscriber {
        config,
        target,
        tx,
        stop: stop.clone(),
    };
    tokio::spawn(task.run(first));
    Ok(AmqpSubscription {
        rx,
        stop: stop.clone(),
        _guard: stop.drop_guard(),
    })
}

/// Broadcasts received on one subscription (see the module doc).
pub(crate) struct AmqpSubscription {
    rx: mpsc::Receiver<Result<Message>>,
    stop: CancellationToken,
    /// Stops the connection task (and so drops the queue) when the subscription is dropped.
    _guard: DropGuard,
}

#[async_trait]
impl Subscription for AmqpSubscription {
    async fn next(&mut self) -> Result<Option<Message>> {
        tokio::select! {
            biased;
            () = self.stop.cancelled() => Ok(None),
            m = self.rx.recv() => m.transpose(),
        }
    }
}

/// The connection task of one subscription.
struct Subscriber {
    config: Arc<AmqpConfig>,
    target: Target,
    tx: mpsc::Sender<Result<Message>>,
    stop: CancellationToken,
}

impl Subscriber {
    /// Consumes on `first`, then on each new session after a drop, until stopped or refused for good.
    async fn run(self, first: Session) {
        let mut session = Some(first);
        let mut backoff = Backoff::default();
        loop {
            let current = match session.take() {
                Some(s) => s,
                None => {
                    let opened = tokio::select! {
                        () = self.stop.cancelled() => return,
                        r = Session::open(&self.config, &self.target) => r,
                    };
                    match opened {
                        Ok(s) => {
                            tracing::info!(queue = %self.target.queue, "amqp: subscriber reconnected");
                            s
                        }
                        Err(f) if f.fatal => {
                            tracing::error!(queue = %self.target.queue, error = %f.error, "amqp: subscriber refused by the broker; giving up");
                            let _ = self.tx.send(Err(f.error)).await;
                            return;
                        }
                        Err(f) => {
                            let delay = backoff.next();
                            let attempt = backoff.attempts();
                            tracing::warn!(queue = %self.target.queue, reason = %f.error, attempt, retry_in = ?delay,
                                "amqp: subscriber cannot reconnect yet");
                            if !self.pause(delay).await {
                                return;
                            }
                            continue;
                        }
                    }
                }
            };
            let opened = current.opened;
            let (current, reason) = self.listen(current).await;
            let Some(reason) = reason else {
                // Stopped: closing the connection deletes the queue.
                current.close().await;
                return;
            };
            tokio::spawn(current.close());
            if opened.elapsed() >= STABLE_AFTER {
                backoff.reset();
            }
            let delay = backoff.next();
            let attempt = backoff.attempts();
            tracing::warn!(queue = %self.target.queue, %reason, attempt, retry_in = ?delay,
                "amqp: subscriber lost its connection; reconnecting");
            if !self.pause(delay).await {
                return;
            }
        }
    }

    /// Forwards deliveries until the session fails (returns why) or the subscription is stopped or
    /// dropped (`None`).
    async fn listen(&self, mut session: Session) -> (Session, Option<String>) {
        loop {
            let item = tokio::select! {
                () = self.stop.cancelled() => return (session, None),
                () = self.tx.closed() => return (session, None),
                item = session.consumer.next() => item,
            };
            let reason = match item {
                Some(Ok(d)) => {
                    let message = to_message(&d.properties, d.data);
                    let sent = tokio::select! {
                        () = self.stop.cancelled() => return (session, None),
                        r = self.tx.send(Ok(message)) => r,
                    };
                    if sent.is_err() {
                        return (session, None);
                    }
                    continue;
                }
                Some(Err(e)) => format!("consumer failed: {e}"),
                None => "the broker cancelled the consumer".to_owned(),
            };
            return (session, Some(reason));
        }
    }

    /// Sleeps `delay`; false if the subscription was stopped or dropped meanwhile.
    async fn pause(&self, delay: Duration) -> bool {
        tokio::select! {
            () = self.stop.cancelled() => false,
            () = self.tx.closed() => false,
            () = tokio::time::sleep(delay) => true,
        }
    }
}
