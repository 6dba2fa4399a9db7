//! The leader lease on RabbitMQ: every candidate (each beat) consumes one durable queue declared with
//! `x-single-active-consumer`, holding a single "token" message. RabbitMQ delivers only to the one
//! active consumer, which keeps the token unacknowledged: holding that delivery is leadership.
//! When the leader's connection dies RabbitMQ requeues the token and hands it to the next consumer.
//!
//! RabbitMQ's `consumer_timeout` (30 min by default) closes a channel that holds a delivery longer
//! than that, which would hand leadership over every 30 minutes. So the leader gives the token back
//! (`basic.reject`, requeue) every [`TOKEN_REFRESH`]: it is still the queue's single active consumer,
//! so RabbitMQ delivers the token straight back to it, and no delivery is ever held long. This works
//! on every RabbitMQ version (per-queue and per-consumer timeouts only exist from 3.12) and changes
//! none of the lock queue's arguments. If the token does not come back within a few seconds the
//! holder counts itself as no longer leading.
//!
//! Fencing: before each send the leader proves its channel is still open with a round trip on it
//! (a passive declare). A leader whose connection died has no channel, so that check fails and it
//! stops before sending; as long as the channel is open the token cannot have moved.
//! `x-max-length = 1` bounds the spare tokens candidates starting next to a leader publish.
//!
//! The state mirror: a beat keeps its last-run times in a local file (beat's own business), which a
//! standby on another host cannot see. So the leader also publishes its whole last-run map, confirmed, to a second
//! durable queue (`<lock queue>.state`, `x-max-length = 1`: only the newest copy is kept), and a beat
//! that becomes leader merges that copy into its own (the later tick wins per entry) before it
//! decides what was missed. This module only moves the map ([`AmqpLease::read_state`],
//! [`AmqpLease::write_state`]).

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
use tokio::time::Instant;
use tracing::{debug, warn};

use super::Lease;
use crate::error::{BrokerError, Result};
use crate::url::BrokerUrl;

/// Bound on connecting and on each lock round trip (and on the token coming back after a refresh).
const STEP: Duration = Duration::from_secs(5);
/// How often the leader hands its token back to reset RabbitMQ's consumer timeout on it; far below
/// any sensible `consumer_timeout` (RabbitMQ checks it about once a minute).
pub const TOKEN_REFRESH: Duration = Duration::from_secs(60);

/// A candidate's place in the lock queue's line of consumers.
pub struct AmqpLease {
    uri: String,
    /// The URL's TLS options for lapin, or why they are unusable (reported when joining).
    tls: std::result::Result<lapin::tcp::OwnedTLSConfig, String>,
    /// Names our connections in RabbitMQ's list: `<role> <queue> <uuid>`.
    role: String,
    redacted: String,
    queue: String,
    /// How often a held token is handed back ([`TOKEN_REFRESH`] unless changed).
    refresh: Duration,
    session: Mutex<Option<Session>>,
}

impl std::fmt::Debug for AmqpLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpLease")
            .field("url", &self.redacted)
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

struct Session {
    conn: Connection,
    channel: Channel,
    /// While we lead: the delivery tag of the token delivery that made us leader (kept across
    /// refreshes, so it is the epoch of this whole leadership).
    token: watch::Receiver<Option<u64>>,
}

impl Session {
    fn alive(&self) -> bool {
        self.conn.status().connected() && self.channel.status().connected()
    }
}

impl AmqpLease {
    /// A lease on `queue` of the RabbitMQ at `url` (connected on first use); `role` names our
    /// connections (`celerity-beat` gives `celerity-beat <queue> <uuid>`).
    pub fn new(url: &BrokerUrl, queue: &str, role: &str) -> Self {
        let mut base = url.base.clone();
        // kombu spells the default vhost `//` or `/`; lapin wants it percent-encoded.
        if matches!(base.path(), "" | "/" | "//") {
            base.set_path("/%2f");
        }
        base.set_query(Some("heartbeat=10"));
        let tls = crate::tls::TlsOptions::from_url(url)
            .map_err(|e| match e {
                BrokerError::InvalidUrl { reason, .. } => reason,
                other => other.to_string(),
            })
            .and_then(|tls| crate::tls::lapin_config(tls.as_ref()));
        AmqpLease {
            uri: base.to_string(),
            tls,
            role: role.to_owned(),
            redacted: url.redacted(),
            queue: queue.to_owned(),
            refresh: TOKEN_REFRESH,
            session: Mutex::new(None),
        }
    }

    /// Hands a held token back every `every` instead of every [`TOKEN_REFRESH`] (for a RabbitMQ
    /// whose `consumer_timeout` is shorter than that, and for tests). Takes effect on the next join.
    #[must_use]
    pub fn with_refresh(mut self, every: Duration) -> Self {
        self.refresh = every.max(Duration::from_millis(10));
        self
    }

    /// Leadership if we hold the token now; joins the queue's consumers first if needed.
    pub async fn try_acquire(&self) -> Result<Option<Lease>> {
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
    pub async fn check(&self, held: &Lease) -> Result<bool> {
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
    pub async fn read_state(&self) -> Result<HashMap<String, i64>> {
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
            tracing::warn!(queue = %self.state_queue(), role = %self.role, "ignoring an unreadable last-run state copy: {e}");
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
    pub async fn write_state(&self, state: &HashMap<String, i64>) -> Result<()> {
        let guard = self.session.lock().await;
        let Some(s) = guard.as_ref() else {
            return Err(BrokerError::Closed);
        };
        let body = serde_json::to_vec(state).map_err(|e| refused(e.to_string()))?;
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
            Ok(Ok(_)) => Err(refused("RabbitMQ refused the state copy".into())),
            Ok(Err(e)) => Err(BrokerError::from(e)),
            Err(_) => Err(BrokerError::Timeout(STEP)),
        }
    }

    fn state_queue(&self) -> String {
        format!("{}.state", self.queue)
    }

    /// Leaves the line (a held token goes to the next beat at once).
    pub async fn release(&self) -> Result<()> {
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
            format!("{} {} {}", self.role, self.queue, uuid::Uuid::new_v4()).into(),
        );
        let tls = self.tls.clone().map_err(|reason| BrokerError::InvalidUrl {
            url: self.redacted.clone(),
            reason,
        })?;
        let runtime = lapin::runtime::default_runtime().map_err(|e| connect_err(e.to_string()))?;
        let connecting = Connection::connect_with_config(&self.uri, props, tls, runtime);
        let conn = tokio::time::timeout(STEP, connecting)
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
        let consumer = channel
            .basic_consume(
                self.queue.as_str().into(),
                ShortString::default(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(BrokerError::from)?;
        let (tx, token) = watch::channel(None);
        tokio::spawn(hold_token(
            consumer,
            tx,
            self.refresh,
            self.queue.clone(),
            self.role.clone(),
        ));
        Ok(Session {
            conn,
            channel,
            token,
        })
    }
}

/// Holds the token deliveries of one lock consumer until it ends, publishing in `tx` the epoch of
/// the current leadership (`None`: not leading). The deliveries are never acked: keeping them
/// unacked is what leading means; every `refresh` they are handed back (requeued), and as the
/// queue's single active consumer we get the token straight back, so RabbitMQ's consumer timeout
/// never runs out on it.
async fn hold_token(
    mut consumer: lapin::Consumer,
    tx: watch::Sender<Option<u64>>,
    refresh: Duration,
    queue: String,
    role: String,
) {
    let mut held: Vec<lapin::message::Delivery> = Vec::new();
    let mut refresh_at = Instant::now() + refresh;
    // Set while a handed-back token is on its way back to us.
    let mut back_by: Option<Instant> = None;
    loop {
        tokio::select! {
            d = consumer.next() => match d {
                Some(Ok(d)) => {
                    debug!(%queue, %role, tag = d.delivery_tag, "got the leader token");
                    if tx.borrow().is_none() {
                        tx.send_replace(Some(d.delivery_tag));
                    }
                    held.push(d);
                    refresh_at = Instant::now() + refresh;
                    back_by = None;
                }
                Some(Err(e)) => {
                    debug!(%queue, %role, "lock consumer ended: {e}");
                    break;
                }
                None => {
                    debug!(%queue, %role, "lock consumer was cancelled");
                    break;
                }
            },
            () = tokio::time::sleep_until(refresh_at), if !held.is_empty() => {
                debug!(%queue, %role, "handing the leader token back to reset the consumer timeout");
                let mut failed = false;
                for d in held.drain(..) {
                    failed |= d.reject(BasicRejectOptions { requeue: true }).await.is_err();
                }
                if failed {
                    debug!(%queue, %role, "could not hand the leader token back: the channel is gone");
                    break;
                }
                back_by = Some(Instant::now() + STEP);
            },
            () = sleep_until_some(back_by) => {
                warn!(%queue, %role, "the leader token did not come back after a refresh: no longer leading");
                tx.send_replace(None);
                back_by = None;
            },
        }
    }
    tx.send_replace(None);
}

/// Sleeps until `at`, or forever if there is none.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The state copy could not be written (or RabbitMQ nacked it).
fn refused(message: String) -> BrokerError {
    BrokerError::Transport {
        transport: "amqp",
        message,
    }
}
