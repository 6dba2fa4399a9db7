//! Connections to a Redis Cluster (`redis+cluster://h1:7000,h2:7001`), and [`AnyConn`]: one
//! connection type for the state kept on "the broker's Redis" (result backend, beat's lease, rate
//! limits) whether that is one server or a cluster.
//!
//! The cluster connection is the redis crate's async cluster client: it learns the slot map from
//! the seed nodes, sends each command to the master of its key's slot, follows `MOVED` (and
//! refreshes its map) and `ASK` (with `ASKING`) redirections, and after a master dies retries with
//! backoff until the map shows the promoted replica.
//!
//! A cluster connection that saw no traffic while a master died can stay stuck on it, every command
//! timing out, long after the replica was promoted. [`ClusterRedial`] wraps the client's
//! connection as [`Redial`] wraps a single server's: after a command times out, the next ones go
//! to a freshly opened cluster connection (which learns the slot map anew).
//!
//! Durability: a Redis master acknowledges a write before its replicas have it, so a master killed
//! at the wrong instant takes the write with it. Writes that must survive a failover (publishes,
//! result documents) are followed by `WAIT <replicas> <ms>` on the same node connection
//! ([`wait_replicas`]); the URL options `replica_acks` (default 1, 0 turns it off) and
//! `replica_ack_timeout` (milliseconds, default 50) set it. A shard with no replica left answers
//! after the timeout: the write is kept on the master alone and a warning is logged.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

use super::super::redial::Redial;
use crate::error::{BrokerError, Result};
use crate::url::BrokerUrl;

/// How long connecting to the cluster (learning its slot map) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one command may take (a blocking wait is never sent on this connection).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// URL options of the cluster connection.
pub(crate) const OPTIONS: &[&str] = &["replica_acks", "replica_ack_timeout"];

/// How many replicas must have a durable write, and how long to wait for them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReplicaAcks {
    pub(crate) replicas: u32,
    pub(crate) timeout_ms: u64,
}

impl ReplicaAcks {
    pub(crate) fn from_url(url: &BrokerUrl) -> Result<Self> {
        Ok(ReplicaAcks {
            replicas: url.option::<u32>("replica_acks")?.unwrap_or(1),
            timeout_ms: url.option::<u64>("replica_ack_timeout")?.unwrap_or(50),
        })
    }
}

/// A cluster connection that is opened anew after a command timed out on it (see the module doc).
/// Cheap to clone: clones share the current connection.
#[derive(Clone)]
pub struct ClusterRedial {
    inner: Arc<RedialInner>,
}

struct RedialInner {
    client: ClusterClient,
    /// The connection in use and how many times it was replaced.
    current: Mutex<(u64, ClusterConnection)>,
    /// Held while a replacement is dialed, so concurrent timeouts dial once.
    dialing: tokio::sync::Mutex<()>,
}

impl ClusterRedial {
    fn current(&self) -> (u64, ClusterConnection) {
        let guard = self.inner.current.lock().unwrap_or_else(|e| e.into_inner());
        (guard.0, guard.1.clone())
    }

    /// After a command on `generation` failed with `error`: a timeout replaces the connection
    /// (unless another caller already did).
    async fn after_error(&self, generation: u64, error: &redis::RedisError) {
        if !error.is_timeout() {
            return;
        }
        let _dialing = self.inner.dialing.lock().await;
        if self.current().0 != generation {
            return;
        }
        match tokio::time::timeout(CONNECT_TIMEOUT, self.inner.client.get_async_connection()).await
        {
            Ok(Ok(fresh)) => {
                tracing::warn!(%error, "redis-cluster: a command timed out; opened a new cluster connection");
                let mut guard = self.inner.current.lock().unwrap_or_else(|e| e.into_inner());
                *guard = (generation.wrapping_add(1), fresh);
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "redis-cluster: cannot open a new cluster connection")
            }
            Err(_) => tracing::warn!("redis-cluster: opening a new cluster connection timed out"),
        }
    }

    /// Sends `pipe` to the node at `host:port` (whatever slots it serves) and returns `count`
    /// replies after the first `offset`.
    pub(crate) async fn route_pipeline(
        &self,
        pipe: Pipeline,
        offset: usize,
        count: usize,
        host: String,
        port: u16,
    ) -> RedisResult<Vec<Value>> {
        let (generation, mut conn) = self.current();
        let route = redis::cluster_routing::SingleNodeRoutingInfo::ByAddress { host, port };
        let out = conn.route_pipeline(pipe, offset, count, route).await;
        self.checked(generation, out).await
    }

    async fn checked<T>(&self, generation: u64, out: RedisResult<T>) -> RedisResult<T> {
        if let Err(e) = &out {
            self.after_error(generation, e).await;
        }
        out
    }
}

impl ConnectionLike for ClusterRedial {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let (generation, mut conn) = self.current();
            let out = conn.req_packed_command(cmd).await;
            self.checked(generation, out).await
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let (generation, mut conn) = self.current();
            let out = conn.req_packed_commands(pipeline, offset, count).await;
            self.checked(generation, out).await
        })
    }

    fn get_db(&self) -> i64 {
        0
    }
}

/// Opens the cluster connection for a `redis+cluster://` URL, bounded in time.
pub(crate) async fn connect_cluster(url: &BrokerUrl) -> Result<ClusterRedial> {
    let connect_error = |reason: String| BrokerError::Connect {
        url: url.redacted(),
        reason,
    };
    if url.tls {
        return Err(connect_error(
            "TLS is not supported on redis+cluster:// yet".into(),
        ));
    }
    let nodes: Vec<String> = url
        .cluster_nodes()
        .iter()
        .map(|n| format!("redis://{n}"))
        .collect();
    let mut builder = ClusterClientBuilder::new(nodes)
        .connection_timeout(CONNECT_TIMEOUT)
        .response_timeout(RESPONSE_TIMEOUT)
        .retries(8)
        .min_retry_wait(100)
        .max_retry_wait(2000);
    let decode = |s: &str| {
        crate::url::percent_decode(s).ok_or_else(|| {
            connect_error("the user name or password is not valid percent-encoding".into())
        })
    };
    if !url.base.username().is_empty() {
        builder = builder.username(decode(url.base.username())?);
    }
    if let Some(pw) = url.base.password() {
        builder = builder.password(decode(pw)?);
    }
    let client = builder.build().map_err(|e| connect_error(e.to_string()))?;
    match tokio::time::timeout(CONNECT_TIMEOUT * 2, client.get_async_connection()).await {
        Err(_) => Err(connect_error(format!(
            "no answer within {:?}",
            CONNECT_TIMEOUT * 2
        ))),
        Ok(Err(e)) => Err(connect_error(e.to_string())),
        Ok(Ok(conn)) => Ok(ClusterRedial {
            inner: Arc::new(RedialInner {
                client,
                current: Mutex::new((0, conn)),
                dialing: tokio::sync::Mutex::new(()),
            }),
        }),
    }
}

/// `redis://[user:password@]host:port` of seed node `node` of a cluster URL (for the redis
/// crate's single-server client); `None` if the node does not fit a URL.
pub(crate) fn node_url(url: &BrokerUrl, node: &str) -> Option<String> {
    let mut u = url.base.clone();
    let (host, port) = node.rsplit_once(':')?;
    u.set_scheme("redis").ok()?;
    u.set_host(Some(host)).ok()?;
    u.set_port(Some(port.parse().ok()?)).ok()?;
    u.set_path("");
    Some(u.to_string())
}

/// `WAIT` for `acks.replicas` replicas of the node `key` lives on to have every write made so far
/// on this connection to that node. Fewer replicas within the timeout is logged, not an error: the
/// write is on the master.
pub(crate) async fn wait_replicas(
    conn: &mut ClusterRedial,
    key: &str,
    acks: ReplicaAcks,
) -> Result<()> {
    if acks.replicas == 0 {
        return Ok(());
    }
    // WAIT has no key: paired with a no-op read of `key` in one pipeline, it goes to that key's
    // master, over the connection the write went through.
    let (_, got): (i64, i64) = redis::pipe()
        .cmd("PTTL")
        .arg(key)
        .cmd("WAIT")
        .arg(acks.replicas)
        .arg(acks.timeout_ms)
        .query_async(conn)
        .await
        .map_err(super::keys::from_redis)?;
    if got < i64::from(acks.replicas) && warn_now() {
        tracing::warn!(
            key,
            replicas = got,
            wanted = acks.replicas,
            "redis-cluster: a write reached fewer replicas than asked within the timeout; it is on the master only"
        );
    }
    Ok(())
}

/// True at most once every 10 s: a shard without replicas would otherwise log every write.
fn warn_now() -> bool {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let last = LAST.load(Ordering::Relaxed);
    now >= last.saturating_add(10)
        && LAST
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

/// A connection to the Redis holding the broker's other state: one server (reconnecting,
/// [`Redial`]) or a cluster. Cheap to clone.
#[derive(Clone)]
pub enum AnyConn {
    Single(Redial),
    Cluster(ClusterRedial),
}

impl AnyConn {
    /// True on a cluster (keys of one operation must then share a hash tag).
    pub fn is_cluster(&self) -> bool {
        matches!(self, AnyConn::Cluster(_))
    }
}

/// Opens the connection a `redis://`, `rediss://` or `redis+cluster://` URL names, bounded in time.
pub async fn connect_any(url: &BrokerUrl) -> Result<AnyConn> {
    if url.is_cluster() {
        Ok(AnyConn::Cluster(connect_cluster(url).await?))
    } else {
        Ok(AnyConn::Single(
            super::super::shared::connect_manager(url).await?,
        ))
    }
}

impl ConnectionLike for AnyConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            AnyConn::Single(c) => c.req_packed_command(cmd),
            AnyConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            AnyConn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            AnyConn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            AnyConn::Single(c) => c.get_db(),
            AnyConn::Cluster(c) => c.get_db(),
        }
    }
}
