//! The `redis://` / `rediss://` transport, in kombu 5.x's Redis layout, so Python Celery workers and
//! ours can share one Redis: each side consumes what the other publishes, and either side's restore
//! sweep brings back what the other left unacked.
//!
//! - Queues are lists, one per priority step (`keys.rs`), holding kombu's JSON envelope
//!   (`envelope.rs`). Publishing is `LPUSH`; declaring a queue stores Celery's direct binding
//!   (`_kombu.binding.<q>`).
//! - Consuming pops and records into kombu's ack emulation (`unacked`, `unacked_index`) atomically in
//!   one Lua script, in batches, and waits for work without polling (`consumer.rs`, `waiter.rs`);
//!   deliveries are settled by `ack.rs`.
//! - Unacked deliveries older than the visibility timeout are restored by a periodic, kombu-compatible
//!   sweep (`restore.rs`); a closed consumer gives its deliveries back at once.
//! - Broadcasts (remote control, events) are kombu's PUBLISH / PSUBSCRIBE on `/<db>.<exchange>`
//!   channels (`fanout.rs`); remote-control replies go through kombu's direct-exchange routing to
//!   the asker's list (`direct.rs`).
//!
//! - `redis+cluster://` is a transport of its own with a key layout of our own (`cluster/`).
//! - What the broker, its consumers and handles share, and opening connections, is the leaf
//!   `shared.rs` (the parts import it, never this file).
//!
//! URL options: `global_keyprefix` (prefix of every key, as kombu's), `visibility_timeout` (seconds,
//! default 3600), `restore_interval` (seconds between sweeps, default 10), `max_message_size` and
//! `max_dead_letters` ([`crate::limits`]), and on `rediss://` the TLS
//! options of [`crate::tls`] (`ssl_ca_certs`, `ssl_certfile`, `ssl_keyfile`, `ssl_cert_reqs`).
//! `sentinel://` URLs (kombu's form) find the master through Redis Sentinel at every dial
//! (`sentinel.rs`); `wait_replicas` makes a publish wait until replicas hold it.
//! Needs Redis ≥ 6.2 (`BLMOVE`, `RPOP` with a count, `ZRANGE … BYSCORE`).

mod ack;
pub mod cluster;
mod consumer;
mod direct;
pub(crate) mod envelope;
mod fanout;
pub(crate) mod group_commit;
mod keys;
mod rate_limit;
mod redial;
mod restore;
mod scripts;
mod seeds;
pub(crate) mod sentinel;
mod shared;
mod timeouts;
mod waiter;

pub use cluster::{connect_any, AnyConn, RedisClusterBroker};
pub use rate_limit::RedisRateLimiter;
pub use redial::Redial;
pub use shared::connect_manager;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::error::{BrokerError, Result};
use crate::limits::Limits;
use crate::message::Message;
use crate::transport::{Broker, Consumer, Subscription};
use crate::url::BrokerUrl;
use crate::wait_lock::WaitLock;
use keys::Keys;
use shared::{client_url, first_connection, once_more_if_dropped, Shared};

/// Messages per round trip in `publish_batch`.
const PUBLISH_CHUNK: usize = 1000;
/// The URL options this transport knows.
const OPTIONS: &[&str] = &["global_keyprefix", "visibility_timeout", "restore_interval"];

/// A connection to a Redis broker. Cheap to share; every method may be called concurrently.
pub struct RedisBroker {
    shared: Arc<Shared>,
    /// The pool's wait lock, handed to every consumer opened after it was set.
    wait_lock: Mutex<Option<Arc<WaitLock>>>,
    /// `wait_replicas`: publishes wait for replicas to hold them.
    replica_wait: Option<sentinel::ReplicaWait>,
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker")
            .field("visibility_timeout", &self.shared.visibility_timeout)
            .field("restore_interval", &self.shared.restore_interval)
            .finish_non_exhaustive()
    }
}

impl RedisBroker {
    /// Connects to the Redis server `url` names. Fails with [`BrokerError::Connect`] within a few
    /// seconds if it is unreachable, and with [`BrokerError::InvalidUrl`] on a bad or unknown option.
    pub async fn connect(url: &BrokerUrl) -> Result<Self> {
        url.check_options(
            &[
                OPTIONS,
                crate::tls::OPTIONS,
                crate::limits::OPTIONS,
                sentinel::WAIT_OPTIONS,
            ]
            .concat(),
        )?;
        let replica_wait = sentinel::ReplicaWait::from_url(url)?;
        let limits = Limits::from_url(url)?;
        let invalid = |reason: String| BrokerError::InvalidUrl {
            url: url.redacted(),
            reason,
        };
        let prefix = url
            .option::<String>("global_keyprefix")?
            .unwrap_or_default();
        let visibility_timeout = url.option::<f64>("visibility_timeout")?.unwrap_or(3600.0);
        // 0 would hand every delivery out again at the next sweep, while its job runs.
        if !(visibility_timeout.is_finite() && visibility_timeout > 0.0 && visibility_timeout < 1e9)
        {
            return Err(invalid(
                "visibility_timeout must be a number of seconds > 0".into(),
            ));
        }
        let restore_interval = url.option::<f64>("restore_interval")?.unwrap_or(10.0);
        if !(restore_interval.is_finite() && restore_interval > 0.0 && restore_interval < 1e9) {
            return Err(invalid(
                "restore_interval must be a number of seconds > 0".into(),
            ));
        }
        let client = sentinel::Dialer::open(url, &client_url(url))?;
        let connect_error = |reason: String| BrokerError::Connect {
            url: url.redacted(),
            reason,
        };
        let mut conn = first_connection(client.clone(), url.tls)
            .await
            .map_err(connect_error)?;
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(|e| connect_error(e.to_string()))?;
        tracing::debug!(url = %url.redacted(), prefix = %prefix, "connected to redis");
        Ok(RedisBroker {
            shared: Arc::new(Shared {
                conn,
                client,
                keys: Keys::new(&prefix),
                visibility_timeout,
                restore_interval: Duration::from_secs_f64(restore_interval),
                closed: CancellationToken::new(),
                declared: Mutex::default(),
                limits,
            }),
            wait_lock: Mutex::default(),
            replica_wait,
        })
    }

    /// Runs one restore sweep now (kombu's `restore_visible`): every delivery unacked for longer than
    /// the visibility timeout goes back to the front of its queue, marked redelivered. Returns how many
    /// were restored (0 if another process is sweeping). Consumers also do this periodically.
    pub async fn restore_visible(&self) -> Result<usize> {
        restore::sweep(&self.shared).await
    }

    fn check_open(&self) -> Result<()> {
        if self.shared.closed.is_cancelled() {
            Err(BrokerError::Closed)
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl Broker for RedisBroker {
    fn transport(&self) -> &'static str {
        "redis"
    }

    /// Stores Celery's binding of the queue to the direct exchange named after it (kombu's
    /// `queue_bind`). Cached: done once per queue per broker.
    async fn declare_queue(&self, queue: &str) -> Result<()> {
        self.check_open()?;
        let declared = |s: &Self| {
            s.shared
                .declared
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(queue)
        };
        if declared(self) {
            return Ok(());
        }
        let keys = &self.shared.keys;
        let member = keys::binding_member(queue, "", queue);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("SADD")
            .arg(keys.binding(queue))
            .arg(&member)
            .ignore()
            .cmd("SADD")
            .arg(keys.binding_permanent(queue))
            .arg(&member)
            .ignore();
        once_more_if_dropped("declaring a queue", || {
            let mut conn = self.shared.conn.clone();
            let pipe = &pipe;
            async move { pipe.exec_async(&mut conn).await }
        })
        .await?;
        self.shared
            .declared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(queue.to_owned());
        Ok(())
    }

    async fn publish(&self, queue: &str, message: &Message) -> Result<()> {
        self.shared.limits.check_publish(queue, message)?;
        self.declare_queue(queue).await?;
        let key = self
            .shared
            .keys
            .queue(queue, i64::from(message.properties.priority));
        let envelope = envelope::encode(message, "", queue);
        let mut lpush = redis::pipe();
        lpush.cmd("LPUSH").arg(key).arg(envelope);
        if let Some(wait) = &self.replica_wait {
            wait.add_to(&mut lpush);
        }
        // Sent once more after a dropped connection (a message stored twice is possible, rarely;
        // one dropped silently is not), as the AMQP publisher does.
        let replies: Vec<i64> = once_more_if_dropped("a publish", || {
            let mut conn = self.shared.conn.clone();
            let lpush = &lpush;
            async move { lpush.query_async(&mut conn).await }
        })
        .await?;
        match &self.replica_wait {
            Some(wait) => wait.check(replies.get(1).copied()),
            None => Ok(()),
        }
    }

    async fn publish_batch(&self, queue: &str, messages: &[Message]) -> Result<()> {
        for m in messages {
            self.shared.limits.check_publish(queue, m)?;
        }
        self.declare_queue(queue).await?;
        let mut conn = self.shared.conn.clone();
        for chunk in messages.chunks(PUBLISH_CHUNK) {
            let mut pipe = redis::pipe();
            for m in chunk {
                pipe.cmd("LPUSH")
                    .arg(
                        self.shared
                            .keys
                            .queue(queue, i64::from(m.properties.priority)),
                    )
                    .arg(envelope::encode(m, "", queue))
                    .ignore();
            }
            match &self.replica_wait {
                Some(wait) => {
                    wait.add_to(&mut pipe);
                    let acked: Vec<i64> = pipe.query_async(&mut conn).await?;
                    wait.check(acked.first().copied())?;
                }
                None => pipe.exec_async(&mut conn).await?,
            }
        }
        Ok(())
    }

    fn limits(&self) -> Limits {
        self.shared.limits
    }

    /// LPUSH and LTRIM of the queue's list (priority step 0) in one MULTI: the newest
    /// `max_dead_letters` stay (consumers pop from the other end, the oldest).
    async fn dead_letter(&self, queue: &str, message: &Message) -> Result<()> {
        self.declare_queue(queue).await?;
        let mut m = message.clone();
        m.properties.priority = 0;
        let key = self.shared.keys.queue(queue, 0);
        let keep = i64::from(self.shared.limits.max_dead_letters);
        let mut conn = self.shared.conn.clone();
        redis::pipe()
            .atomic()
            .cmd("LPUSH")
            .arg(&key)
            .arg(envelope::encode(&m, "", queue))
            .ignore()
            .cmd("LTRIM")
            .arg(&key)
            .arg(0)
            .arg(keep - 1)
            .ignore()
            .exec_async(&mut conn)
            .await?;
        Ok(())
    }

    async fn consume(&self, queues: &[String], prefetch: usize) -> Result<Box<dyn Consumer>> {
        let mut unique: Vec<String> = Vec::with_capacity(queues.len());
        for q in queues {
            if !unique.contains(q) {
                unique.push(q.clone());
            }
        }
        if unique.is_empty() {
            return Err(BrokerError::malformed("consume needs at least one queue"));
        }
        for q in &unique {
            self.declare_queue(q).await?;
        }
        let wait_lock = self
            .wait_lock
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let consumer =
            consumer::RedisConsumer::start(self.shared.clone(), unique, prefetch, wait_lock)
                .await?;
        Ok(Box::new(consumer))
    }

    /// Deletes the lists of every priority of `queue` in one MULTI and returns how many messages they held.
    async fn purge(&self, queue: &str) -> Result<u64> {
        self.check_open()?;
        let mut pipe = redis::pipe();
        pipe.atomic();
        for key in self.shared.keys.priority_keys(queue) {
            pipe.cmd("LLEN").arg(&key).cmd("DEL").arg(&key).ignore();
        }
        let mut conn = self.shared.conn.clone();
        let lens: Vec<u64> = pipe.query_async(&mut conn).await?;
        Ok(lens.iter().sum())
    }

    async fn queue_len(&self, queue: &str) -> Result<u64> {
        self.check_open()?;
        let mut pipe = redis::pipe();
        for key in self.shared.keys.priority_keys(queue) {
            pipe.cmd("LLEN").arg(key);
        }
        let mut conn = self.shared.conn.clone();
        let lens: Vec<u64> = pipe.query_async(&mut conn).await?;
        Ok(lens.iter().sum())
    }

    /// Stops every consumer of this broker (each gives back its unacked deliveries as its `next()`
    /// returns `None`) and refuses further calls. The connections close when the last handle drops.
    async fn close(&self) -> Result<()> {
        self.shared.closed.cancel();
        Ok(())
    }

    fn share_wait_lock(&self, lock: Arc<WaitLock>) {
        *self.wait_lock.lock().unwrap_or_else(|e| e.into_inner()) = Some(lock);
    }

    /// `PUBLISH`es the message on kombu's channel for the exchange and routing key (`fanout.rs`);
    /// on a remote-control reply exchange (`reply.<ns>.pidbox`, direct in kombu) it is pushed to the
    /// lists bound with the routing key instead (`direct.rs`).
    async fn broadcast(&self, exchange: &str, routing_key: &str, message: &Message) -> Result<()> {
        self.check_open()?;
        if direct::is_direct(exchange) {
            return direct::publish(&self.shared, exchange, routing_key, message)
                .await
                .map(drop);
        }
        fanout::broadcast(&self.shared, exchange, routing_key, message).await
    }

    /// `PSUBSCRIBE`s kombu's pattern for the binding key on a connection of its own (`fanout.rs`).
    /// `name` only names the subscriber in logs: Redis pub/sub has no queues. On a remote-control
    /// reply exchange, `name` is the list bound and popped (`direct.rs`).
    async fn subscribe(
        &self,
        exchange: &str,
        binding_key: &str,
        name: &str,
    ) -> Result<Box<dyn Subscription>> {
        self.check_open()?;
        if direct::is_direct(exchange) {
            let subscription = direct::subscribe(&self.shared, exchange, binding_key, name).await?;
            return Ok(Box::new(subscription));
        }
        let subscription = fanout::subscribe(&self.shared, exchange, binding_key, name).await?;
        Ok(Box::new(subscription))
    }
}
