//! The leader lock on RabbitMQ: every beat consumes one durable queue declared with
//! `x-single-active-consumer`, holding a single "token" message. RabbitMQ delivers only to the one
//! active consumer, which keeps the token unacknowledged: holding that delivery is leadership.
//! When the leader's connection dies RabbitMQ requeues the token and hands it to the next consumer.
//!
//! Fencing: before each send the leader proves its channel is still open with a round trip on it
//! (a passive declare). A leader whose connection died has no channel, so that check fails and it
//! stops before sending; as long as the channel is open the token cannot have moved.
//! `x-max-length = 1` bounds the spare tokens beats starting next to a leader publish.
//!
//! The state mirror: each beat keeps its last-run times in a local file, which a standby on another
//! host cannot see. So the leader also publishes its whole last-run map, confirmed, to a second
//! durable queue (`<lock queue>.state`, `x-max-length = 1`: only the newest copy is kept), and a beat
//! that becomes leader merges that copy into its own (the later tick wins per entry) before it
//! decides what was missed.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions, BasicRejectOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::sync::{watch, Mutex};
use tracing::debug;

use celerity_broker::url::BrokerUrl;
use celerity_broker::BrokerError;

use crate::error::{BeatError, Result};
use crate::lock::Lease;

/// Bound on connecting and on each lock round trip.
const STEP: Duration = Duration::from_secs(5);

/// A beat's place in the lock queue's line of consumers.
pub(crate) struct AmqpLock {
    uri: String,
    redacted: String,
    queue: String,
    session: Mutex<Option<Session>>,
}

impl std::fmt::Debug for AmqpLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpLock")
            .field("url", &self.redacted)
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

struct Session {
    conn: Connection,
    channel: Channel,
    /// The delivery tag of the token we hold, if any.
    token: watch::Receiver<Option<u64>>,
}

impl Session {
    fn alive(&self) -> bool {
        self.conn.status().connected() && self.channel.status().connected()
    }
}

impl AmqpLock {
    /// A lock on `queue` of the RabbitMQ at `url` (connected on first use).
    pub(crate) fn new(url: &BrokerUrl, queue: &str) -> Self {
        let mut base = url.base.clone();
        // kombu spells the default vhost `//` or `/`; lapin wants it percent-encoded.
        if matches!(base.path(), "" | "/" | "//") {
            base.set_path("/%2f");
        }
        base.set_query(Some("heartbeat=10"));
        AmqpLock {
            uri: base.to_string(),
            redacted: url.redacted(),
            queue: queue.to_owned(),
            session: Mutex::new(None),
        }
    }

    /// Leadership if we hold the token now; joins the queue's consumers first if needed.
    pub(crate) async fn try_acquire(&self) -> Result<Option<Lease>> {
        let mut guard = self.session.lock().await;
        if !guard.as_ref().is_some_and(Session::alive) {
            *guard = None;
            *guard = Some(self.join().await?);
        }
        let Some(s) = guard.as_ref() else {
            return Ok(None);
        };
        let held = *s.token.borrow();
        Ok(held.map(|tag| Lease {
            token: self.queue.clone(),
            epoch: i64::try_from(tag).unwrap_or(i64::MAX),
        }))
    }

    /// `true` while `held` is still ours, proven by a round trip on the channel that holds it.
    pub(crate) async fn check(&self, held: &Lease) -> Result<bool> {
        let guard = self.session.lock().await;
        let Some(s) = guard.as_ref() else {
            return Ok(false);
        };
        let ours = s.token.borrow().and_then(|t| i64::try_from(t).ok()) == Some(held.epoch);
        if !ours || !s.alive() {
            return Ok(false);
        }
        let probe = s.channel.queue_declare(
            self.queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        );
        Ok(matches!(tokio::time::timeout(STEP, probe).await, Ok(Ok(_))))
    }

    /// The last-run map the latest leader mirrored (empty if none was, or the copy is unreadable).
    pub(crate) async fn read_state(&self) -> Result<HashMap<String, i64>> {
        let guard = self.session.lock().await;
        let Some(s) = guard.as_ref() else {
            return Ok(HashMap::new());
        };
        let get = s.channel.basic_get(
            self.state_queue().as_str().into(),
            BasicGetOptions::default(),
        );
        let got = tokio::time::timeout(STEP, get)
            .await
            .map_err(|_| BrokerError::Timeout(STEP))?
            .map_err(BrokerError::from)?;
        let Some(m) = got else {
            return Ok(HashMap::new());
        };
        let state = serde_json::from_slice(&m.delivery.data).unwrap_or_else(|e| {
            tracing::warn!(queue = %self.state_queue(), "beat: ignoring an unreadable state copy: {e}");
            HashMap::new()
        });
        // Back in the queue for the next leader.
        let _ = m
            .delivery
            .reject(BasicRejectOptions { requeue: true })
            .await;
        Ok(state)
    }

    /// Mirrors `state` to the state queue; returns once RabbitMQ confirmed it.
    pub(crate) async fn write_state(&self, state: &HashMap<String, i64>) -> Result<()> {
        let guard = self.session.lock().await;
        let Some(s) = guard.as_ref() else {
            return Err(BrokerError::Closed.into());
        };
        let body = serde_json::to_vec(state).map_err(|e| BeatError::State(e.to_string()))?;
        let confirmed = async {
            s.channel
                .basic_publish(
                    ShortString::default(),
                    self.state_queue().as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    BasicProperties::default()
                        .with_delivery_mode(2)
                        .with_content_type("application/json".into()),
                )
                .await?
                .await
        };
        match tokio::time::timeout(STEP, confirmed).await {
            Ok(Ok(c)) if !c.is_nack() => Ok(()),
            Ok(Ok(_)) => Err(BeatError::State("RabbitMQ refused the state copy".into())),
            Ok(Err(e)) => Err(BrokerError::from(e).into()),
            Err(_) => Err(BrokerError::Timeout(STEP).into()),
        }
    }

    fn state_queue(&self) -> String {
        format!("{}.state", self.queue)
    }

    /// Leaves the line (a held token goes to the next beat at once).
    pub(crate) async fn release(&self) -> Result<()> {
        if let Some(s) = self.session.lock().await.take() {
            let _ = tokio::time::timeout(STEP, s.channel.close(200, "OK".into())).await;
            let _ = tokio::time::timeout(STEP, s.conn.close(200, "OK".into())).await;
        }
        Ok(())
    }

    async fn join(&self) -> Result<Session> {
        let connect_err = |reason: String| BrokerError::Connect {
            url: self.redacted.clone(),
            reason,
        };
        let props = ConnectionProperties::default().with_connection_name(
            format!("celerity-beat {} {}", self.queue, uuid::Uuid::new_v4()).into(),
        );
        let conn = tokio::time::timeout(STEP, Connection::connect(&self.uri, props))
            .await
            .map_err(|_| connect_err(format!("no answer within {} s", STEP.as_secs())))?
            .map_err(|e| connect_err(e.to_string()))?;
        let channel = conn.create_channel().await.map_err(BrokerError::from)?;
        channel
            .basic_qos(1, BasicQosOptions::default())
            .await
            .map_err(BrokerError::from)?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(BrokerError::from)?;
        let mut state_args = FieldTable::default();
        state_args.insert("x-max-length".into(), AMQPValue::LongInt(1));
        channel
            .queue_declare(
                self.state_queue().as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                state_args,
            )
            .await
            .map_err(BrokerError::from)?;
        let mut args = FieldTable::default();
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        args.insert("x-max-length".into(), AMQPValue::LongInt(1));
        let q = channel
            .queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                args,
            )
            .await
            .map_err(BrokerError::from)?;
        if q.message_count() == 0 {
            // No spare token: put one in (the leader's, if any, is out as an unacked delivery).
            channel
                .basic_publish(
                    ShortString::default(),
                    self.queue.as_str().into(),
                    BasicPublishOptions::default(),
                    b"celerity beat leader token",
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .map_err(BrokerError::from)?;
        }
        let mut consumer = channel
            .basic_consume(
                self.queue.as_str().into(),
                ShortString::default(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(BrokerError::from)?;
        let (tx, token) = watch::channel(None);
        let queue = self.queue.clone();
        tokio::spawn(async move {
            // The deliveries are held, never acked: keeping them unacked is what leading means.
            let mut held = Vec::new();
            while let Some(d) = consumer.next().await {
                match d {
                    Ok(d) => {
                        debug!(%queue, tag = d.delivery_tag, "beat: got the leader token");
                        if tx.borrow().is_none() {
                            tx.send_replace(Some(d.delivery_tag));
                        }
                        held.push(d);
                    }
                    Err(e) => {
                        debug!(%queue, "beat: lock consumer ended: {e}");
                        break;
                    }
                }
            }
            tx.send_replace(None);
        });
        Ok(Session {
            conn,
            channel,
            token,
        })
    }
}
