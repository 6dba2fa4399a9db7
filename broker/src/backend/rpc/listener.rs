//! The client's reply queue: declared as Celery's rpc backend declares it, consumed on a connection
//! of its own, every result message filed in the [`Inbox`].
//!
//! Declaration (Celery 5.7's `RPCBackend.binding`): the queue is named by the client's oid, on the
//! default exchange, `durable=True`, `auto_delete=True`, with `x-expires` = the result expiry in
//! milliseconds. It is consumed without acks, as Celery's `ResultConsumer` does (`no_ack=True`).
//!
//! Each message is matched to its task by the `correlation_id` property (the body's `task_id` when
//! the property is absent, as Celery's `_get_message_task_id`). A message that is not JSON, not a
//! result document, or whose `correlation_id` and `task_id` disagree is logged as an error and
//! dropped: never a panic, never a result filed under the wrong id.
//!
//! A lost connection is reopened (paced by [`Backoff`]), the queue declared and consumed again.
//! The queue is auto-deleted when its last consumer goes, so results published while the client
//! was disconnected are lost, as with Celery.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Connection};
use tokio_util::sync::CancellationToken;

use super::inbox::{Delivered, Inbox};
use crate::amqp::config::AmqpConfig;
use crate::amqp::connection::{connect, Failure};
use crate::backend::TaskMeta;
use crate::backoff::Backoff;
use crate::error::{BrokerError, Result};
use crate::message::CONTENT_TYPE_JSON;

/// Bound on closing a connection we are done with.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// A connection up this long resets the reconnect pacing.
const STABLE_AFTER: Duration = Duration::from_secs(5);

/// What the reply queue is and how it is declared.
pub(crate) struct ReplyQueue {
    pub name: ShortString,
    /// `x-expires` in milliseconds (Celery: `result_expires`).
    pub expires_ms: Option<i64>,
}

impl ReplyQueue {
    fn arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        if let Some(ms) = self.expires_ms {
            // py-amqp sends an int that fits 32 bits as a signed 32-bit field.
            let value = match i32::try_from(ms) {
                Ok(v) => AMQPValue::LongInt(v),
                Err(_) => AMQPValue::LongLongInt(ms),
            };
            args.insert(ShortString::from("x-expires"), value);
        }
        args
    }
}

/// One connection's worth of consuming.
struct Session {
    conn: Connection,
    consumer: lapin::Consumer,
    opened: Instant,
}

impl Session {
    async fn open(config: &AmqpConfig, queue: &ReplyQueue) -> std::result::Result<Self, Failure> {
        let conn = connect(config, "reply-consumer").await?;
        let channel = conn.create_channel().await?;
        channel
            .queue_declare(
                queue.name.clone(),
                QueueDeclareOptions {
                    durable: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                queue.arguments(),
            )
            .await?;
        let consumer = channel
            .basic_consume(
                queue.name.clone(),
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

    async fn close(self) {
        if self.conn.status().connected() {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.conn.close(200, "OK".into())).await;
        }
    }
}

/// Declares and consumes the reply queue now (so the queue exists before any job naming it is
/// sent), then keeps consuming in a task of its own until `stop`.
pub(crate) async fn start(
    config: Arc<AmqpConfig>,
    queue: ReplyQueue,
    inbox: Arc<Inbox>,
    stop: CancellationToken,
) -> Result<()> {
    let first = Session::open(&config, &queue).await.map_err(|f| f.error)?;
    tracing::debug!(queue = %queue.name, "rpc: consuming the reply queue");
    let listener = Listener {
        config,
        queue,
        inbox,
        stop,
    };
    tokio::spawn(listener.run(first));
    Ok(())
}

struct Listener {
    config: Arc<AmqpConfig>,
    queue: ReplyQueue,
    inbox: Arc<Inbox>,
    stop: CancellationToken,
}

impl Listener {
    async fn run(self, first: Session) {
        let mut session = Some(first);
        let mut backoff = Backoff::default();
        loop {
            let current = match session.take() {
                Some(s) => s,
                None => {
                    let opened = tokio::select! {
                        () = self.stop.cancelled() => return,
                        r = Session::open(&self.config, &self.queue) => r,
                    };
                    match opened {
                        Ok(s) => {
                            tracing::info!(queue = %self.queue.name, "rpc: reply consumer reconnected");
                            s
                        }
                        Err(f) => {
                            let delay = backoff.next();
                            tracing::warn!(queue = %self.queue.name, reason = %f.error, fatal = f.fatal,
                                attempt = backoff.attempts(), retry_in = ?delay,
                                "rpc: cannot consume the reply queue yet");
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
                current.close().await;
                return;
            };
            tokio::spawn(current.close());
            if opened.elapsed() >= STABLE_AFTER {
                backoff.reset();
            }
            let delay = backoff.next();
            tracing::warn!(queue = %self.queue.name, %reason, retry_in = ?delay,
                "rpc: the reply consumer lost its connection (results sent meanwhile are lost, as in Celery); reconnecting");
            if !self.pause(delay).await {
                return;
            }
        }
    }

    /// Files deliveries until the session fails (returns why) or the backend is closed (`None`).
    async fn listen(&self, mut session: Session) -> (Session, Option<String>) {
        loop {
            let item = tokio::select! {
                () = self.stop.cancelled() => return (session, None),
                item = session.consumer.next() => item,
            };
            match item {
                Some(Ok(d)) => file(
                    &self.inbox,
                    self.queue.name.as_str(),
                    &d.properties,
                    &d.data,
                ),
                Some(Err(e)) => return (session, Some(format!("consumer failed: {e}"))),
                None => {
                    return (
                        session,
                        Some("the broker cancelled the consumer".to_owned()),
                    )
                }
            }
        }
    }

    async fn pause(&self, delay: Duration) -> bool {
        tokio::select! {
            () = self.stop.cancelled() => false,
            () = tokio::time::sleep(delay) => true,
        }
    }
}

/// Why a reply message was not filed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BadReply {
    #[error("content type `{0}` is not application/json")]
    ContentType(String),
    #[error("{0}")]
    Document(BrokerError),
    #[error(
        "correlation_id `{correlation_id}` names another task than the body's task_id `{task_id}`"
    )]
    Mismatch {
        correlation_id: String,
        task_id: String,
    },
}

/// Reads one reply message: the task id it answers and its result document.
pub(crate) fn parse(
    props: &BasicProperties,
    body: &[u8],
) -> std::result::Result<(String, TaskMeta), BadReply> {
    let content_type = props
        .content_type()
        .as_ref()
        .map(|s| s.as_str())
        .unwrap_or(CONTENT_TYPE_JSON);
    if content_type != CONTENT_TYPE_JSON {
        return Err(BadReply::ContentType(content_type.to_owned()));
    }
    let correlation = props
        .correlation_id()
        .as_ref()
        .map(|s| s.as_str().to_owned())
        .filter(|s| !s.is_empty());
    let hint = correlation.as_deref().unwrap_or("(no correlation_id)");
    let meta = TaskMeta::from_json(hint, body).map_err(BadReply::Document)?;
    match correlation {
        Some(c) if c != meta.task_id => Err(BadReply::Mismatch {
            correlation_id: c,
            task_id: meta.task_id,
        }),
        Some(c) => Ok((c, meta)),
        None if meta.task_id == hint => Err(BadReply::Document(BrokerError::malformed(
            "a reply with neither a correlation_id nor a task_id",
        ))),
        None => Ok((meta.task_id.clone(), meta)),
    }
}

/// Files one delivery, or logs why it cannot be.
fn file(inbox: &Inbox, queue: &str, props: &BasicProperties, body: &[u8]) {
    match parse(props, body) {
        Ok((id, meta)) => {
            if inbox.deliver(&id, meta) == Delivered::Stale {
                tracing::debug!(queue, task_id = %id, "rpc: a stale or repeated result; ignored");
            }
        }
        Err(e) => tracing::error!(queue, error = %e, bytes = body.len(),
            "rpc: dropped a message on the reply queue that is not a result we can read"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(ct: &str, corr: Option<&str>) -> BasicProperties {
        let p = BasicProperties::default().with_content_type(ct.into());
        match corr {
            Some(c) => p.with_correlation_id(c.into()),
            None => p,
        }
    }

    #[test]
    fn replies_are_matched_by_correlation_id_and_checked() {
        let body = br#"{"status": "SUCCESS", "result": 3, "traceback": null, "children": [], "date_done": null, "task_id": "t1"}"#;
        let (id, m) = parse(&props("application/json", Some("t1")), body).unwrap();
        assert_eq!(
            (id.as_str(), m.result.clone()),
            ("t1", serde_json::json!(3))
        );
        // Old Celery: no property, the body names the task.
        assert_eq!(
            parse(&props("application/json", None), body).unwrap().0,
            "t1"
        );
        // A wrong correlation id is refused, not filed under either id.
        let e = parse(&props("application/json", Some("t2")), body).unwrap_err();
        assert!(matches!(e, BadReply::Mismatch { .. }), "{e}");
        assert!(e.to_string().contains("t2") && e.to_string().contains("t1"));
        assert!(matches!(
            parse(&props("application/x-python-serialize", Some("t1")), body),
            Err(BadReply::ContentType(_))
        ));
        for bad in [&b"not json"[..], b"[1]", b"{\"result\": 1}", b"\xff\xfe"] {
            assert!(parse(&props("application/json", Some("t1")), bad).is_err());
        }
        let no_id = br#"{"status": "SUCCESS", "result": 3}"#;
        assert!(parse(&props("application/json", None), no_id).is_err());
    }
}
