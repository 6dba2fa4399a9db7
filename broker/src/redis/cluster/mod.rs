//! The `redis+cluster://` transport: Celerity's queues on a Redis Cluster.
//!
//! Python Celery (kombu) has no Redis Cluster transport, so this is a layout of our own
//! (`keys.rs`): every key of one queue shares the hash tag `{queue}`, so each queue lives on one
//! master and every script stays in one slot, while different queues spread over the masters.
//! What is stored is Celery's: kombu's JSON envelope around Celery's task message. A Python
//! producer or worker cannot join a cluster broker.
//!
//! - Publishing is `LPUSH` to the queue's list, then `WAIT` for a replica (`conn.rs`), so a publish
//!   that returned survives the loss of the master.
//! - Consuming is `fetch.lua` per queue into the queue's own ack emulation, polling while idle
//!   (`consumer.rs`); the restore sweep walks each consumed queue's own unacked index.
//! - Broadcasts (events, remote control) use pub/sub, which a cluster forwards to every node; they
//!   go through a seed node (`fanout.rs` of the single-server transport; the next live seed when
//!   that node dies). Remote-control replies go by pub/sub too, on their routing key's channel.
//! - Slot redirections (`MOVED`, `ASK`) and failover are the redis crate's cluster client's.
//!
//! URL: `redis+cluster://[:password@]h1:7000,h2:7001[/]?…`; options `global_keyprefix`,
//! `visibility_timeout` (seconds, default 3600), `restore_interval` (seconds, default 10),
//! `replica_acks` (default 1), `replica_ack_timeout` (ms, default 50), and
//! `max_message_size` / `max_dead_letters` ([`crate::limits`]).

mod conn;
mod consumer;
mod keys;
mod redirect;

pub use conn::{connect_any, AnyConn, ClusterRedial};
pub(crate) use conn::{
    connect_cluster, node_url, wait_replicas, ReplicaAcks, OPTIONS as CONN_OPTIONS,
};
pub use keys::check_single_slot;
pub(crate) use keys::from_redis;
use keys::ClusterKeys;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use super::keys::Keys;
use super::seeds::Seeds;
use super::sentinel::Dialer;
use super::shared::{first_connection, Shared};
use super::{direct, envelope, fanout};
use crate::error::{BrokerError, Result};
use crate::limits::Limits;
use crate::message::Message;
use crate::transport::{Broker, Consumer, Subscription};
use crate::url::BrokerUrl;
use consumer::{ClusterConsumer, Inner};

/// Messages per round trip in `publish_batch`.
const PUBLISH_CHUNK: usize = 1000;
/// The URL options of this transport (besides [`conn::OPTIONS`] and [`crate::limits::OPTIONS`]).
const OPTIONS: &[&str] = &["global_keyprefix", "visibility_timeout", "restore_interval"];

/// A broker on a Redis Cluster. Cheap to share; every method may be called concurrently.
pub struct RedisClusterBroker {
    inner: Arc<Inner>,
    acks: ReplicaAcks,
    /// The first seed node's connection, for pub/sub broadcasts (forwarded cluster-wide).
    fanout: Arc<Shared>,
}

impl std::fmt::Debug for RedisClusterBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisClusterBroker")
            .field("visibility_timeout", &self.inner.visibility_timeout)
            .finish_non_exhaustive()
    }
}

/// A seconds option that must be positive and finite.
fn seconds(url: &BrokerUrl, name: &str, default: f64) -> Result<f64> {
    let v = url.option::<f64>(name)?.unwrap_or(default);
    if v.is_finite() && v > 0.0 && v < 1e9 {
        Ok(v)
    } else {
        Err(BrokerError::InvalidUrl {
            url: url.redacted(),
            reason: format!("{name} must be a number of seconds > 0"),
        })
    }
}

impl RedisClusterBroker {
    /// Connects to the cluster a `redis+cluster://` URL names (learning its slot map from the seed
    /// nodes). Fails with [`BrokerError::Connect`] within seconds if no seed answers.
    pub async fn connect(url: &BrokerUrl) -> Result<Self> {
        url.check_options(&[OPTIONS, conn::OPTIONS, crate::limits::OPTIONS].concat())?;
        let limits = Limits::from_url(url)?;
        let prefix = url
            .option::<String>("global_keyprefix")?
            .unwrap_or_default();
        let visibility_timeout = seconds(url, "visibility_timeout", 3600.0)?;
        let restore_interval = seconds(url, "restore_interval", 10.0)?;
        let acks = ReplicaAcks::from_url(url)?;
        let conn = connect_cluster(url).await?;
        let closed = CancellationToken::new();
        let fanout = Arc::new(fanout_shared(url, &prefix, &closed, limits).await?);
        tracing::debug!(url = %url.redacted(), prefix = %prefix, "connected to redis cluster");
        Ok(RedisClusterBroker {
            inner: Arc::new(Inner {
                conn,
                keys: ClusterKeys::new(&prefix),
                visibility_timeout,
                restore_interval: Duration::from_secs_f64(restore_interval),
                limits,
                closed,
            }),
            acks,
            fanout,
        })
    }

    /// Runs one restore sweep of `queue` now: its deliveries unacked for longer than the visibility
    /// timeout go back to the queue. Returns how many (0 if another process is sweeping it).
    pub async fn restore_visible(&self, queue: &str) -> Result<usize> {
        consumer::sweep_queue(&self.inner, queue).await
    }

    /// Runs `pipe` atomically (`MULTI`/`EXEC`) if every key in `keys` is in one slot, else fails
    /// with a clear error and sends nothing. `keys` must name every key the pipeline touches. The
    /// transaction follows its slot while a reshard moves it (`redirect.rs`).
    pub async fn atomic(&self, keys: &[String], pipe: &redis::Pipeline) -> Result<redis::Value> {
        check_single_slot(keys)?;
        redirect::transaction(&self.inner.conn, keys, pipe)
            .await
            .map_err(from_redis)
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.closed.is_cancelled() {
            Err(BrokerError::Closed)
        } else {
            Ok(())
        }
    }
}

/// The dialer of the connections that are not cluster connections (pub/sub broadcasts, control
/// replies, result notifications): any seed node that answers, the one that answered last first
/// (a cluster forwards `PUBLISH` to every node).
pub(crate) fn seed_dialer(url: &BrokerUrl) -> Result<Dialer> {
    let mut clients = Vec::new();
    for node in url.cluster_nodes() {
        let Some(node_url) = node_url(url, node) else {
            continue;
        };
        clients.push(redis::Client::open(node_url.as_str()).map_err(|e| {
            BrokerError::InvalidUrl {
                url: url.redacted(),
                reason: format!("a seed node does not fit a Redis URL: {e}"),
            }
        })?);
    }
    Seeds::new(clients)
        .map(|seeds| Dialer::Seeds(Arc::new(seeds)))
        .ok_or_else(|| BrokerError::InvalidUrl {
            url: url.redacted(),
            reason: "no seed node".into(),
        })
}

/// A single-server [`Shared`] on the seed nodes, for broadcasts: cluster pub/sub reaches
/// subscribers on every node. Its connection moves to another seed when its node goes away.
async fn fanout_shared(
    url: &BrokerUrl,
    prefix: &str,
    closed: &CancellationToken,
    limits: Limits,
) -> Result<Shared> {
    let dialer = seed_dialer(url)?;
    let conn = first_connection(dialer.clone(), false)
        .await
        .map_err(|reason| BrokerError::Connect {
            url: url.redacted(),
            reason: format!("no seed node answered for pub/sub: {reason}"),
        })?;
    Ok(Shared {
        conn,
        client: dialer,
        keys: Keys::new(prefix),
        visibility_timeout: 3600.0,
        restore_interval: Duration::from_secs(10),
        closed: closed.clone(),
        declared: Mutex::new(HashSet::new()),
        limits,
    })
}

#[async_trait]
impl Broker for RedisClusterBroker {
    fn transport(&self) -> &'static str {
        "redis-cluster"
    }

    /// Nothing to store: a cluster queue needs no kombu binding (no Python worker reads it).
    async fn declare_queue(&self, _queue: &str) -> Result<()> {
        self.check_open()
    }

    async fn publish(&self, queue: &str, message: &Message) -> Result<()> {
        self.publish_batch(queue, std::slice::from_ref(message))
            .await
    }

    /// `LPUSH`es in transactions (one queue: one slot), each followed by `WAIT` for the replicas.
    async fn publish_batch(&self, queue: &str, messages: &[Message]) -> Result<()> {
        self.check_open()?;
        for m in messages {
            self.inner.limits.check_publish(queue, m)?;
        }
        let keys = &self.inner.keys;
        let mut conn = self.inner.conn.clone();
        for chunk in messages.chunks(PUBLISH_CHUNK) {
            // One transaction per list (priority): stored whole or not at all, also while the
            // queue's slot moves (`redirect.rs`).
            let mut lists: Vec<(String, redis::Pipeline)> = Vec::new();
            for m in chunk {
                let key = keys.queue(queue, i64::from(m.properties.priority));
                let at = match lists.iter().position(|(k, _)| *k == key) {
                    Some(at) => at,
                    None => {
                        lists.push((key, redis::pipe()));
                        lists.len() - 1
                    }
                };
                let (key, pipe) = &mut lists[at];
                pipe.cmd("LPUSH")
                    .arg(&*key)
                    .arg(envelope::encode(m, "", queue))
                    .ignore();
            }
            for (key, pipe) in &lists {
                redirect::transaction(&self.inner.conn, std::slice::from_ref(key), pipe)
                    .await
                    .map_err(from_redis)?;
            }
            wait_replicas(&mut conn, &keys.queue(queue, 0), self.acks).await?;
        }
        Ok(())
    }

    fn limits(&self) -> Limits {
        self.inner.limits
    }

    /// LPUSH and LTRIM of the queue's step-0 list in one MULTI (one slot).
    async fn dead_letter(&self, queue: &str, message: &Message) -> Result<()> {
        self.check_open()?;
        let mut m = message.clone();
        m.properties.priority = 0;
        let key = self.inner.keys.queue(queue, 0);
        let keep = i64::from(self.inner.limits.max_dead_letters);
        let mut pipe = redis::pipe();
        pipe.cmd("LPUSH")
            .arg(&key)
            .arg(envelope::encode(&m, "", queue))
            .ignore()
            .cmd("LTRIM")
            .arg(&key)
            .arg(0)
            .arg(keep - 1)
            .ignore();
        self.atomic(std::slice::from_ref(&key), &pipe).await?;
        wait_replicas(&mut self.inner.conn.clone(), &key, self.acks).await
    }

    async fn consume(&self, queues: &[String], prefetch: usize) -> Result<Box<dyn Consumer>> {
        self.check_open()?;
        let mut unique: Vec<String> = Vec::with_capacity(queues.len());
        for q in queues {
            if !unique.contains(q) {
                unique.push(q.clone());
            }
        }
        if unique.is_empty() {
            return Err(BrokerError::malformed("consume needs at least one queue"));
        }
        let consumer = ClusterConsumer::start(self.inner.clone(), unique, prefetch).await;
        Ok(Box::new(consumer))
    }

    /// Deletes the lists of every priority of `queue` in one MULTI; returns how many messages they held.
    async fn purge(&self, queue: &str) -> Result<u64> {
        self.check_open()?;
        let keys: Vec<String> = self.inner.keys.priority_keys(queue).into();
        let mut pipe = redis::pipe();
        for key in &keys {
            pipe.cmd("LLEN").arg(key).cmd("DEL").arg(key).ignore();
        }
        let lens: Vec<u64> = redis::from_redis_value(self.atomic(&keys, &pipe).await?)
            .map_err(|e| BrokerError::malformed(format!("unexpected reply to a purge: {e}")))?;
        Ok(lens.iter().sum())
    }

    async fn queue_len(&self, queue: &str) -> Result<u64> {
        self.check_open()?;
        let mut pipe = redis::pipe();
        for key in self.inner.keys.priority_keys(queue) {
            pipe.cmd("LLEN").arg(key);
        }
        let lens: Vec<u64> = pipe
            .query_async(&mut self.inner.conn.clone())
            .await
            .map_err(from_redis)?;
        Ok(lens.iter().sum())
    }

    async fn close(&self) -> Result<()> {
        self.inner.closed.cancel();
        Ok(())
    }

    /// Pub/sub through a seed node (`fanout.rs`). Remote-control replies (kombu's direct exchange
    /// `reply.<ns>.pidbox`) go the same way, on the channel of their routing key (the asking
    /// client's oid), instead of kombu's bound lists: no Python process reads a cluster broker,
    /// and a list would live on one master only.
    async fn broadcast(&self, exchange: &str, routing_key: &str, message: &Message) -> Result<()> {
        self.check_open()?;
        if direct::is_direct(exchange) {
            check_reply_key(exchange, routing_key)?;
        }
        fanout::broadcast(&self.fanout, exchange, routing_key, message).await
    }

    /// A reply subscription (see [`Broker::broadcast`] above) listens on its routing key's channel
    /// only; it is subscribed when this returns, so a request sent after it gets its replies.
    async fn subscribe(
        &self,
        exchange: &str,
        binding_key: &str,
        name: &str,
    ) -> Result<Box<dyn Subscription>> {
        self.check_open()?;
        if direct::is_direct(exchange) {
            check_reply_key(exchange, binding_key)?;
        }
        let sub = fanout::subscribe(&self.fanout, exchange, binding_key, name).await?;
        Ok(Box::new(sub))
    }
}

/// A remote-control reply's routing key must name one client exactly: not empty (that would be
/// every reply of the exchange) and without the glob characters of a pub/sub pattern.
fn check_reply_key(exchange: &str, key: &str) -> Result<()> {
    if key.is_empty() || key.contains(['*', '?', '[', ']', '\\', '#']) {
        return Err(BrokerError::Transport {
            transport: "redis-cluster",
            message: format!("a reply on `{exchange}` needs a plain routing key, not {key:?}"),
        });
    }
    Ok(())
}
