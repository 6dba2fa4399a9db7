//! The `rpc://` result backend: results sent back as AMQP messages to a queue of the client that
//! sent the job, as Celery's `RPCBackend` does (wire-compatible with Celery 5.7 both ways).
//!
//! - A client declares its *reply queue* (named by its oid, a UUID; see [`listener`]) before its
//!   first job is sent, consumes it, and sends every job with `reply_to` = that queue and
//!   `correlation_id` = the task id ([`RpcBackend::prepare_send`]).
//! - A worker publishes each state of the job (STARTED when tracked, RETRY, SUCCESS, FAILURE) to
//!   the default exchange with routing key = the job's `reply_to` ([`sender`]).
//! - The client files what arrives by task id ([`inbox`]); `get` and `wait` read from there. Only
//!   the client that sent a job can read its result; any other sees PENDING. Nothing is stored on
//!   the server, so `forget` only forgets locally.
//! - No chords and no saved groups: there is nothing to join on (Celery refuses them as well).
//!
//! URLs: `rpc://` sends results over the broker's RabbitMQ (the broker URL must be `amqp://` or
//! `amqps://`; see [`crate::connect::connect_backend_for`]), on connections of its own.
//! `rpc://user:pass@host:port/vhost` (`rpcs://` for TLS) uses that RabbitMQ instead, with the
//! options of an `amqp://` URL. Options of the backend itself: `result_expires` (seconds the reply
//! queue lives unused, its `x-expires`; default one day, `0` for none), `result_persistent`
//! (`true`: results are published persistent, delivery mode 2; default `false` as Celery's), and
//! `backlog_limit` (results for tasks nobody waits on kept per client; default 1,000 as Celery's).

mod inbox;
mod listener;
mod sender;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::amqp::config::AmqpConfig;
use crate::amqp::table::short_string;
use crate::backend::{ChordJoin, ChordPart, ResultBackend, TaskMeta, DEFAULT_RESULT_EXPIRES};
use crate::error::{BrokerError, Result};
use crate::url::{redact, BrokerUrl, Scheme};

use inbox::Inbox;
use listener::ReplyQueue;
use sender::Sender;

/// Results for ids nobody waits on that a client keeps by default (Celery's backlog limit).
pub const DEFAULT_BACKLOG_LIMIT: usize = 1000;

/// The options of an `rpc://` URL that are the backend's, not the AMQP connection's.
const OWN_OPTIONS: &[&str] = &["result_expires", "result_persistent", "backlog_limit"];

/// True if `raw` is an `rpc://` or `rpcs://` URL.
pub fn is_rpc_url(raw: &str) -> bool {
    raw.starts_with("rpc://") || raw.starts_with("rpcs://")
}

/// What an `rpc://` URL asks for.
#[derive(Debug, Clone)]
pub struct RpcConfig {
    /// The RabbitMQ to use, as an `amqp(s)://` URL (may hold a password).
    amqp_url: String,
    expires: Option<Duration>,
    persistent: bool,
    backlog_limit: usize,
}

impl RpcConfig {
    /// Reads an `rpc://` URL. A bare `rpc://` (no host) needs `broker` (the broker's URL), which
    /// must be `amqp://` or `amqps://`.
    pub fn from_urls(raw: &str, broker: Option<&str>) -> Result<Self> {
        let invalid = |reason: String| BrokerError::InvalidUrl {
            url: redact(raw),
            reason,
        };
        let (tls, rest) = match (raw.strip_prefix("rpc://"), raw.strip_prefix("rpcs://")) {
            (Some(rest), _) => (false, rest),
            (_, Some(rest)) => (true, rest),
            _ => return Err(invalid("not an rpc:// URL".into())),
        };
        let as_amqp = format!("{}://{rest}", if tls { "amqps" } else { "amqp" });
        let parsed = url::Url::parse(&as_amqp).map_err(|e| invalid(e.to_string()))?;
        let mut own = Vec::new();
        let mut passed = Vec::new();
        for (k, v) in parsed.query_pairs() {
            if OWN_OPTIONS.contains(&k.as_ref()) {
                own.push((k.into_owned(), v.into_owned()));
            } else {
                passed.push((k.into_owned(), v.into_owned()));
            }
        }
        let own_value = |name: &str| own.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v);
        let expires = match own_value("result_expires") {
            None => Some(DEFAULT_RESULT_EXPIRES),
            Some(v) => match v.parse::<f64>() {
                Ok(0.0) => None,
                Ok(s) if (0.001..=f64::from(i32::MAX)).contains(&s) => {
                    Some(Duration::from_secs_f64(s))
                }
                _ => {
                    return Err(invalid(format!(
                        "option `result_expires={v}`: seconds, 0 (never) or between 0.001 and 2147483647"
                    )))
                }
            },
        };
        let persistent = match own_value("result_persistent").map(String::as_str) {
            None => false,
            Some("true" | "1" | "yes") => true,
            Some("false" | "0" | "no") => false,
            Some(v) => {
                return Err(invalid(format!(
                    "option `result_persistent={v}`: true or false"
                )))
            }
        };
        let backlog_limit = match own_value("backlog_limit") {
            None => DEFAULT_BACKLOG_LIMIT,
            Some(v) => match v.parse::<usize>() {
                Ok(n) if n > 0 => n,
                _ => {
                    return Err(invalid(format!(
                        "option `backlog_limit={v}`: a positive number"
                    )))
                }
            },
        };
        let has_host = parsed.host_str().is_some_and(|h| !h.is_empty());
        let amqp_url = if has_host {
            let mut base = parsed.clone();
            base.set_query(None);
            if !passed.is_empty() {
                base.query_pairs_mut().extend_pairs(passed.iter());
            }
            base.to_string()
        } else {
            if !passed.is_empty() || !matches!(parsed.path(), "" | "/") {
                return Err(invalid(
                    "a bare rpc:// uses the broker's RabbitMQ and takes only result_expires, \
                     result_persistent and backlog_limit; name a host (rpc://user:pass@host/vhost) \
                     for anything else"
                        .into(),
                ));
            }
            let broker = broker.ok_or_else(|| {
                invalid(
                    "rpc:// sends results over the broker's RabbitMQ, but no broker URL was given; \
                     name one (rpc://user:pass@host:port/vhost)"
                        .into(),
                )
            })?;
            match BrokerUrl::parse(broker) {
                Ok(b) if b.scheme == Scheme::Amqp => broker.to_owned(),
                _ => {
                    return Err(invalid(format!(
                        "rpc:// sends results over the broker's RabbitMQ, but the broker is `{}`, \
                         not amqp://: name a RabbitMQ (rpc://user:pass@host:port/vhost) or use a \
                         redis:// result backend",
                        redact(broker)
                    )))
                }
            }
        };
        Ok(RpcConfig {
            amqp_url,
            expires,
            persistent,
            backlog_limit,
        })
    }
}

/// Set once a backend in this process has taken the process oid as its reply queue.
static PROCESS_OID_TAKEN: AtomicBool = AtomicBool::new(false);

/// The name of a new reply queue: the process oid (the `reply_to` every task message of this
/// process names by default, see [`crate::protocol::node::process_oid`]) for the first backend of
/// the process, a fresh UUID v3 (as kombu's `oid_from`) for any other.
fn reply_queue_name() -> String {
    if !PROCESS_OID_TAKEN.swap(true, Ordering::SeqCst) {
        return crate::protocol::node::process_oid().to_owned();
    }
    let seed = format!(
        "{:x}-{:x}-0-{:x}",
        Uuid::new_v4().as_u128() >> 80,
        std::process::id(),
        Uuid::new_v4().as_u128()
    );
    Uuid::new_v3(&Uuid::NAMESPACE_OID, seed.as_bytes()).to_string()
}

/// An `rpc://` result backend (see the module doc).
pub struct RpcBackend {
    config: Arc<AmqpConfig>,
    sender: Sender,
    inbox: Arc<Inbox>,
    queue: String,
    expires_ms: Option<i64>,
    /// Set once the reply queue is declared and consumed.
    consuming: OnceCell<()>,
    stop: CancellationToken,
}

impl std::fmt::Debug for RpcBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcBackend")
            .field("url", &self.config.redacted)
            .field("queue", &self.queue)
            .finish()
    }
}

impl RpcBackend {
    /// Connects (the publishing side, so a bad URL or an unreachable RabbitMQ fails now). The reply
    /// queue is declared and consumed on first use by a client.
    pub async fn connect(config: &RpcConfig) -> Result<Self> {
        let url = BrokerUrl::parse(&config.amqp_url)?;
        let amqp = Arc::new(AmqpConfig::from_url(&url)?);
        let sender = Sender::new(amqp.clone(), config.persistent);
        sender.start().await?;
        let expires_ms = config
            .expires
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        Ok(RpcBackend {
            config: amqp,
            sender,
            inbox: Arc::new(Inbox::new(config.backlog_limit)),
            queue: reply_queue_name(),
            expires_ms,
            consuming: OnceCell::new(),
            stop: CancellationToken::new(),
        })
    }

    /// The reply queue's name (the `reply_to` of jobs sent through this backend).
    pub fn reply_queue(&self) -> &str {
        &self.queue
    }

    /// Declares and consumes the reply queue, once.
    async fn ensure_consuming(&self) -> Result<()> {
        if self.stop.is_cancelled() {
            return Err(BrokerError::Closed);
        }
        self.consuming
            .get_or_try_init(|| async {
                let queue = ReplyQueue {
                    name: short_string(&self.queue, "reply queue")?,
                    expires_ms: self.expires_ms,
                };
                listener::start(
                    Arc::new(self.config.for_receiving()),
                    queue,
                    self.inbox.clone(),
                    self.stop.child_token(),
                )
                .await
            })
            .await
            .map(drop)
    }

    fn unsupported(what: &str) -> BrokerError {
        BrokerError::Unsupported {
            backend: "rpc://",
            what: format!(
                "{what} (Celery's rpc backend cannot either): use a redis:// or db+postgresql:// result backend"
            ),
        }
    }
}

#[async_trait]
impl ResultBackend for RpcBackend {
    fn backend(&self) -> &'static str {
        "rpc"
    }

    async fn prepare_send(&self, task_ids: &[&str]) -> Result<Option<String>> {
        self.ensure_consuming().await?;
        self.inbox.expect(task_ids.iter().copied());
        Ok(Some(self.queue.clone()))
    }

    fn joins_chords(&self) -> bool {
        false
    }

    async fn store(&self, meta: &TaskMeta) -> Result<()> {
        self.sender.send(&[meta]).await
    }

    async fn store_many(&self, metas: &[TaskMeta]) -> Result<()> {
        let all: Vec<&TaskMeta> = metas.iter().collect();
        self.sender.send(&all).await
    }

    async fn get(&self, task_id: &str) -> Result<TaskMeta> {
        if self.consuming.initialized() {
            self.inbox.get(task_id)
        } else {
            // Nothing was sent through this backend, so nothing can have arrived.
            Ok(TaskMeta::pending(task_id))
        }
    }

    async fn wait(&self, task_id: &str, timeout: Option<Duration>) -> Result<TaskMeta> {
        self.ensure_consuming().await?;
        self.inbox.wait(task_id, timeout).await
    }

    async fn forget(&self, task_id: &str) -> Result<()> {
        self.inbox.forget(task_id);
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        self.stop.cancel();
        self.sender.close().await;
        Ok(())
    }

    async fn set_chord_size(&self, _group_id: &str, _size: usize) -> Result<()> {
        Err(Self::unsupported("cannot join a chord"))
    }

    async fn chord_part_return(&self, _part: &ChordPart) -> Result<ChordJoin> {
        Err(Self::unsupported("cannot join a chord"))
    }

    async fn chord_done(&self, _group_id: &str, _claim: &str) -> Result<()> {
        Err(Self::unsupported("cannot join a chord"))
    }

    async fn save_group(&self, _group_id: &str, _task_ids: &[String]) -> Result<()> {
        Err(Self::unsupported("cannot save a group result"))
    }

    async fn restore_group(&self, _group_id: &str) -> Result<Option<Vec<String>>> {
        Err(Self::unsupported("cannot restore a group result"))
    }

    async fn forget_group(&self, _group_id: &str) -> Result<()> {
        Err(Self::unsupported("cannot forget a group result"))
    }
}

impl Drop for RpcBackend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BROKER: &str = "amqp://guest:guest@127.0.0.1:5672//";

    #[test]
    fn urls_name_the_broker_or_another_rabbitmq() {
        let c = RpcConfig::from_urls("rpc://", Some(BROKER)).unwrap();
        assert_eq!(c.amqp_url, BROKER);
        assert_eq!(c.expires, Some(DEFAULT_RESULT_EXPIRES));
        assert!(!c.persistent);
        assert_eq!(c.backlog_limit, 1000);
        let c = RpcConfig::from_urls(
            "rpc://u:p@rabbit:5673/app?heartbeat=10&result_persistent=true&result_expires=60&backlog_limit=5",
            Some(BROKER),
        )
        .unwrap();
        assert_eq!(c.amqp_url, "amqp://u:p@rabbit:5673/app?heartbeat=10");
        assert_eq!(c.expires, Some(Duration::from_secs(60)));
        assert!(c.persistent);
        assert_eq!(c.backlog_limit, 5);
        assert!(RpcConfig::from_urls("rpcs://rabbit/", None)
            .unwrap()
            .amqp_url
            .starts_with("amqps://rabbit"));
        assert_eq!(
            RpcConfig::from_urls("rpc://?result_expires=0", Some(BROKER))
                .unwrap()
                .expires,
            None
        );
    }

    #[test]
    fn bad_rpc_urls_are_clear_errors_without_the_password() {
        for (url, broker, says) in [
            ("rpc://", None, "no broker URL"),
            (
                "rpc://",
                Some("redis://:Zq9x@127.0.0.1:6379/0"),
                "not amqp://",
            ),
            ("rpc://?heartbeat=5", Some(BROKER), "bare rpc://"),
            ("rpc://?backlog_limit=0", Some(BROKER), "backlog_limit"),
            ("rpc://u:Zq9x@h/?result_expires=-1", None, "result_expires"),
            (
                "rpc://u:Zq9x@h/?result_persistent=maybe",
                None,
                "result_persistent",
            ),
        ] {
            let e = RpcConfig::from_urls(url, broker).unwrap_err().to_string();
            assert!(e.contains(says), "{url}: {e}");
            assert!(!e.contains("Zq9x"), "{url}: {e}");
        }
    }
}
