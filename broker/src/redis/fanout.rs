//! Broadcasts on Redis — Celery's remote control (`celery.pidbox`) and, on Redis, its events
//! (`celeryev`) — the way kombu does them: PUBLISH and PSUBSCRIBE, nothing stored.
//!
//! A broadcast is `PUBLISH <channel> <envelope>`. The envelope is the one queued messages carry
//! (`envelope.rs`: base64 body, `delivery_info` naming the exchange and routing key, a fresh
//! delivery tag); the channel is kombu's (`keys.rs`: `<global_keyprefix>/<db>.<exchange>`, plus
//! `/<routing_key>` when there is one). Broadcasts are always transient (`delivery_mode` 1), as
//! Celery's are.
//!
//! A subscriber holds its own pub/sub connection with one PSUBSCRIBE of kombu's pattern for its
//! binding key. As in kombu, the binding key `""` subscribes to the bare exchange channel, so it
//! gets only broadcasts published with an empty routing key (remote control); `#` becomes `*` and
//! gets every routing key (events). The pattern is a Redis glob, not an AMQP topic: `task.*` also
//! matches `task.a.b`, exactly as for a kombu subscriber.
//!
//! A task per subscription looks after its connection. It forwards decoded messages to
//! [`RedisSubscription::next`] (which is therefore cancel-safe), logs and skips payloads that are
//! not kombu envelopes, PINGs a connection that stayed quiet for [`HEALTH_CHECK`] (kombu's
//! `health_check_interval`) to notice a half-open socket, and reconnects and subscribes again with a
//! backoff when the connection drops, logging each attempt. Broadcasts published while it is away
//! are missed, as with kombu. The task ends when the broker is closed or the subscription dropped.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt as _;
use redis::aio::PubSub;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::envelope;
use super::shared::{Shared, CONNECT_TIMEOUT};
use crate::backoff::Backoff;
use crate::error::{BrokerError, Result};
use crate::message::{Message, TRANSIENT};
use crate::transport::Subscription;

/// A subscriber connection quiet for this long is PINGed (kombu's default health check interval).
const HEALTH_CHECK: Duration = Duration::from_secs(25);
/// How long the PONG may take before the connection is considered dead.
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection that lasted this long resets the reconnect backoff.
const STABLE_AFTER: Duration = Duration::from_secs(5);
/// Decoded messages waiting for `next()`.
const BUFFER: usize = 256;
/// Pause before the one retry of a PUBLISH that hit a broken connection.
const PUBLISH_RETRY_DELAY: Duration = Duration::from_millis(100);

/// The Redis db number of the broker URL (kombu's `{db}` in `/{db}.`).
fn db(shared: &Shared) -> i64 {
    shared.client.get_connection_info().redis_settings().db()
}

/// Publishes `message` on `exchange` with `routing_key` (see the module doc). On a connection error
/// the PUBLISH is sent once more over the reconnected shared connection, so a subscriber may, rarely,
/// get a broadcast twice; it is never dropped silently.
pub(crate) async fn broadcast(
    shared: &Shared,
    exchange: &str,
    routing_key: &str,
    message: &Message,
) -> Result<()> {
    let channel = shared
        .keys
        .fanout_channel(db(shared), exchange, routing_key);
    let message = transient(message);
    let payload = envelope::encode(&message, exchange, routing_key);
    let mut conn = shared.conn.clone();
    let mut retried = false;
    loop {
        let sent: redis::RedisResult<i64> = redis::cmd("PUBLISH")
            .arg(&channel)
            .arg(&payload)
            .query_async(&mut conn)
            .await;
        let error = match sent {
            Ok(receivers) => {
                tracing::trace!(%channel, receivers, "broadcast");
                return Ok(());
            }
            Err(e) => BrokerError::from(e),
        };
        if retried || !error.is_connection() {
            return Err(error);
        }
        tracing::warn!(%channel, %error, "redis: broadcast hit a lost connection; retrying once");
        retried = true;
        tokio::time::sleep(PUBLISH_RETRY_DELAY).await;
    }
}

/// `message` with `delivery_mode` 1, copied only if it had another one.
fn transient(message: &Message) -> Cow<'_, Message> {
    if message.properties.delivery_mode == TRANSIENT {
        Cow::Borrowed(message)
    } else {
        let mut m = message.clone();
        m.properties.delivery_mode = TRANSIENT;
        Cow::Owned(m)
    }
}

/// Subscribes to what is broadcast on `exchange` matching `binding_key`; `name` only names the
/// subscriber in logs (Redis pub/sub has no queue). Fails if the first connection cannot be made.
pub(crate) async fn subscribe(
    shared: &Arc<Shared>,
    exchange: &str,
    binding_key: &str,
    name: &str,
) -> Result<RedisSubscription> {
    let pattern = shared
        .keys
        .fanout_pattern(db(shared), exchange, binding_key);
    let first = open(&shared.client, &pattern).await.map_err(|reason| {
        BrokerError::ConnectionLost(format!("redis: cannot subscribe to `{pattern}`: {reason}"))
    })?;
    tracing::debug!(%pattern, subscriber = name, "redis: subscribed");
    let stop = shared.closed.child_token();
    let (tx, rx) = mpsc::channel(BUFFER);
    let link = Link {
        client: shared.client.clone(),
        pattern,
        name: name.to_owned(),
        tx,
        stop: stop.clone(),
    };
    tokio::spawn(link.run(first));
    Ok(RedisSubscription {
        rx,
        stop: stop.clone(),
        _guard: stop.drop_guard(),
    })
}

/// Opens a pub/sub connection and subscribes it to `pattern`, within [`CONNECT_TIMEOUT`].
async fn open(
    client: &super::sentinel::Dialer,
    pattern: &str,
) -> std::result::Result<PubSub, String> {
    let attempt = async {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.psubscribe(pattern).await?;
        redis::RedisResult::Ok(pubsub)
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
        Ok(Ok(pubsub)) => Ok(pubsub),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {CONNECT_TIMEOUT:?}")),
    }
}

/// Broadcasts received on one subscription (see the module doc).
pub(crate) struct RedisSubscription {
    rx: mpsc::Receiver<Message>,
    stop: CancellationToken,
    /// Stops the connection task when the subscription is dropped.
    _guard: DropGuard,
}

#[async_trait]
impl Subscription for RedisSubscription {
    async fn next(&mut self) -> Result<Option<Message>> {
        tokio::select! {
            biased;
            () = self.stop.cancelled() => Ok(None),
            m = self.rx.recv() => Ok(m),
        }
    }
}

/// What the connection task of one subscription holds.
struct Link {
    client: super::sentinel::Dialer,
    pattern: String,
    name: String,
    tx: mpsc::Sender<Message>,
    stop: CancellationToken,
}

impl Link {
    /// Listens on `first`, then on each new connection after a drop, until stopped.
    async fn run(self, first: PubSub) {
        let mut pubsub = Some(first);
        let mut backoff = Backoff::default();
        let mut attempt = 0u32;
        loop {
            let current = match pubsub.take() {
                Some(p) => p,
                None => {
                    let opened = tokio::select! {
                        () = self.stop.cancelled() => return,
                        r = open(&self.client, &self.pattern) => r,
                    };
                    match opened {
                        Ok(p) => {
                            tracing::info!(pattern = %self.pattern, subscriber = %self.name, "redis: subscriber reconnected");
                            attempt = 0;
                            p
                        }
                        Err(reason) => {
                            attempt += 1;
                            let delay = backoff.next();
                            tracing::warn!(pattern = %self.pattern, subscriber = %self.name, %reason, attempt,
                                retry_in = ?delay, "redis: subscriber cannot reconnect yet");
                            if !self.pause(delay).await {
                                return;
                            }
                            continue;
                        }
                    }
                }
            };
            let since = Instant::now();
            let Some(reason) = self.listen(current).await else {
                return;
            };
            if since.elapsed() >= STABLE_AFTER {
                backoff.reset();
            }
            let delay = backoff.next();
            tracing::warn!(pattern = %self.pattern, subscriber = %self.name, %reason, retry_in = ?delay,
                "redis: subscriber lost its connection; reconnecting");
            if !self.pause(delay).await {
                return;
            }
        }
    }

    /// Forwards what arrives on `pubsub` until the connection fails (returns why) or the
    /// subscription is stopped or dropped (`None`).
    async fn listen(&self, pubsub: PubSub) -> Option<String> {
        let (mut sink, mut stream) = pubsub.split();
        let mut quiet = tokio::time::interval_at(Instant::now() + HEALTH_CHECK, HEALTH_CHECK);
        quiet.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.stop.cancelled() => return None,
                () = self.tx.closed() => return None,
                msg = stream.next() => {
                    let Some(msg) = msg else {
                        return Some("the connection closed".into());
                    };
                    quiet.reset();
                    match envelope::decode(msg.get_payload_bytes()) {
                        Ok(d) => {
                            let sent = tokio::select! {
                                () = self.stop.cancelled() => return None,
                                r = self.tx.send(d.message) => r,
                            };
                            if sent.is_err() {
                                return None;
                            }
                        }
                        Err(e) => tracing::warn!(channel = %msg.get_channel_name(), subscriber = %self.name,
                            error = %e, preview = %preview(msg.get_payload_bytes()),
                            "redis: skipping a broadcast that is not a kombu envelope"),
                    }
                }
                _ = quiet.tick() => {
                    match tokio::time::timeout(PING_TIMEOUT, sink.ping::<redis::Value>()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Some(format!("health check failed: {e}")),
                        Err(_) => return Some(format!("no PONG within {PING_TIMEOUT:?}")),
                    }
                }
            }
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

/// The start of a payload, for logs.
fn preview(raw: &[u8]) -> String {
    String::from_utf8_lossy(&raw[..raw.len().min(200)]).into_owned()
}
