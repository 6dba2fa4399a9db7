//! Redis Sentinel: which server a connection is dialed to ([`Dialer`]).
//!
//! A `redis://` URL names one server, and every dial goes there. A `sentinel://` URL names
//! sentinels and a `master_name`: every dial — the first one, a dedicated blocking or pub/sub
//! connection, a [`super::Redial`] replacing its connection — asks the sentinels, in the order the
//! URL gives them, where the master is now, and the redis crate checks that the server named says
//! `ROLE` master before it is used. After a failover the next dial finds the new master by itself;
//! a connection still open to a node that turned replica meets `READONLY` errors, and
//! [`needs_new_master`] tells the owner of that connection to drop it and dial again.

use std::sync::{Arc, Mutex as StdMutex};
use std::time::Instant;

use redis::aio::MultiplexedConnection;
use redis::sentinel::{Sentinel, SentinelNodeConnectionInfo};
use redis::{
    AsyncConnectionConfig, ConnectionAddr, ConnectionInfo, ErrorKind, IntoConnectionInfo,
    RedisConnectionInfo, RedisError, RedisResult, ServerErrorKind,
};
use tokio::sync::Mutex;

use super::seeds::Seeds;
use super::timeouts::CONNECT_TIMEOUT;
use crate::error::{BrokerError, Result};
use crate::url::BrokerUrl;

/// Where a connection is dialed: one fixed server, or the master the sentinels name at the time.
/// Cheap to clone (clones share the sentinel connections).
#[derive(Clone)]
pub(crate) enum Dialer {
    Fixed(Box<redis::Client>),
    Sentinel(Arc<Resolver>),
    /// Any live seed node of a cluster (for pub/sub, which every node carries).
    Seeds(Arc<Seeds>),
}

/// Finds the current master through the sentinels.
pub(crate) struct Resolver {
    /// The redis crate's sentinel client (it keeps a connection to each sentinel).
    sentinels: Mutex<Sentinel>,
    master_name: String,
    /// The master's database and credentials (the URL's), used on whichever node is master.
    master: SentinelNodeConnectionInfo,
    /// The URL's connection info: its database and credentials are the master's.
    info: ConnectionInfo,
    /// When the last lookup ended, and what it found (a client, or what failed).
    last: StdMutex<Option<(Instant, std::result::Result<redis::Client, String>)>>,
}

impl Dialer {
    /// The dialer for `url`: sentinel resolution when it is a `sentinel://` URL, else the server
    /// it names (`target`: the URL as the redis crate spells it, with the URL's TLS options).
    pub(crate) fn open(url: &BrokerUrl, target: &str) -> Result<Self> {
        if url.sentinels.is_empty() {
            return crate::tls::redis_client(url, target).map(|c| Dialer::Fixed(Box::new(c)));
        }
        Resolver::new(url).map(|r| Dialer::Sentinel(Arc::new(r)))
    }

    /// A client for the server to dial now: the fixed one, or the master the sentinels name (an
    /// error if none names a master that answers as one, within the connect timeout).
    pub(crate) async fn client(&self) -> RedisResult<redis::Client> {
        match self {
            Dialer::Fixed(client) => Ok(client.as_ref().clone()),
            Dialer::Sentinel(resolver) => resolver.master().await,
            Dialer::Seeds(seeds) => seeds.client().await,
        }
    }

    /// True for a `sentinel://` URL.
    pub(crate) fn is_sentinel(&self) -> bool {
        matches!(self, Dialer::Sentinel(_))
    }

    /// True when a connection whose server went away should be dialed again through this dialer
    /// at once (it may lead elsewhere now): sentinels and cluster seeds.
    pub(crate) fn redials_on_loss(&self) -> bool {
        matches!(self, Dialer::Sentinel(_) | Dialer::Seeds(_))
    }

    /// The URL's connection info (for a sentinel URL its address is a placeholder; its database
    /// and credentials are the master's).
    pub(crate) fn get_connection_info(&self) -> &ConnectionInfo {
        match self {
            Dialer::Fixed(client) => client.get_connection_info(),
            Dialer::Sentinel(resolver) => &resolver.info,
            Dialer::Seeds(seeds) => seeds.first().get_connection_info(),
        }
    }

    /// A new multiplexed connection to the server to dial now.
    pub(crate) async fn get_multiplexed_async_connection_with_config(
        &self,
        config: &AsyncConnectionConfig,
    ) -> RedisResult<MultiplexedConnection> {
        self.client()
            .await?
            .get_multiplexed_async_connection_with_config(config)
            .await
    }

    /// A new pub/sub connection to the server to dial now.
    pub(crate) async fn get_async_pubsub(&self) -> RedisResult<redis::aio::PubSub> {
        self.client().await?.get_async_pubsub().await
    }
}

impl Resolver {
    fn new(url: &BrokerUrl) -> Result<Self> {
        let invalid = |reason: String| BrokerError::InvalidUrl {
            url: url.redacted(),
            reason,
        };
        // A sentinel URL is never TLS: this refuses its TLS options (not supported yet).
        crate::tls::TlsOptions::from_url(url)?;
        let master_name = url
            .option::<String>("master_name")?
            .filter(|n| !n.is_empty())
            .ok_or_else(|| invalid("`master_name` is required".into()))?;
        let info = url
            .base
            .as_str()
            .into_connection_info()
            .map_err(|e| invalid(e.to_string()))?;
        let mut sentinel_auth = RedisConnectionInfo::default();
        if let Some(user) = url.option::<String>("sentinel_username")? {
            sentinel_auth = sentinel_auth.set_username(user);
        }
        if let Some(password) = url.option::<String>("sentinel_password")? {
            sentinel_auth = sentinel_auth.set_password(password);
        }
        let mut nodes = Vec::with_capacity(url.sentinels.len());
        for (host, port) in &url.sentinels {
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let node = ConnectionAddr::Tcp(host.to_owned(), *port)
                .into_connection_info()
                .map_err(|e| invalid(e.to_string()))?
                .set_redis_settings(sentinel_auth.clone());
            nodes.push(node);
        }
        let sentinels = Sentinel::build(nodes).map_err(|e| invalid(e.to_string()))?;
        let master = SentinelNodeConnectionInfo::default()
            .set_redis_connection_info(info.redis_settings().clone());
        Ok(Resolver {
            sentinels: Mutex::new(sentinels),
            master_name,
            master,
            info,
            last: StdMutex::new(None),
        })
    }

    /// Asks the sentinels (in order) for the master, bounded in time. Lookups are one at a time,
    /// and a caller that waited while another lookup ran takes that lookup's answer: when a master
    /// dies, every command in flight fails at once and asks, and a queue of lookups each run in
    /// turn could outlast the callers' patience for as long as new failures kept joining it.
    async fn master(&self) -> RedisResult<redis::Client> {
        let asked = Instant::now();
        let lookup = async {
            let mut sentinels = self.sentinels.lock().await;
            if let Some((at, found)) = &*self.last.lock().unwrap_or_else(|e| e.into_inner()) {
                if *at >= asked {
                    return found.clone().map_err(|reason| lookup_error(&reason));
                }
            }
            let found = sentinels
                .async_master_for(&self.master_name, Some(&self.master))
                .await;
            let shared = match &found {
                Ok(client) => Ok(client.clone()),
                Err(e) => Err(e.to_string()),
            };
            *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), shared));
            found
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, lookup).await {
            Ok(found) => {
                if let Ok(client) = &found {
                    tracing::debug!(
                        master = %client.get_connection_info().addr(),
                        name = %self.master_name,
                        "redis sentinel: master found"
                    );
                }
                found
            }
            Err(_) => Err(lookup_error(&format!(
                "no sentinel named a master within {CONNECT_TIMEOUT:?}"
            ))),
        }
    }
}

/// The error of a master lookup that failed (`reason`: what failed).
fn lookup_error(reason: &str) -> RedisError {
    RedisError::from((
        ErrorKind::Io,
        "redis sentinel: no master",
        reason.to_owned(),
    ))
}

/// True if `error`, met on a connection dialed through the sentinels, means that connection no
/// longer leads to the master: the node turned replica (`READONLY`), went away, or went silent.
/// Its owner drops it and dials again (which asks the sentinels again).
pub(crate) fn needs_new_master(error: &RedisError) -> bool {
    error.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly)
        || error.code() == Some("READONLY")
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
        || error.is_io_error()
}

/// The URL options of [`ReplicaWait`].
pub(crate) const WAIT_OPTIONS: &[&str] = &["wait_replicas", "wait_replicas_timeout"];
/// How long a publish waits for its replicas when `wait_replicas_timeout` is not given (seconds).
const DEFAULT_WAIT_TIMEOUT: f64 = 1.0;

/// `wait_replicas=N` (ours, not kombu's): a publish returns `Ok` only once `N` replicas hold it
/// (Redis `WAIT`, in the publish's own pipeline), else an error saying the message reached the
/// master only. Redis replicates asynchronously: without it, a message published just before the
/// master dies may be missing on the replica the sentinels promote, though its publish returned
/// `Ok`. Costs one replication round trip per publish.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReplicaWait {
    replicas: u32,
    timeout_ms: u64,
}

impl ReplicaWait {
    /// Reads `wait_replicas` and `wait_replicas_timeout` (seconds, default 1); `None` without them
    /// or with `wait_replicas=0`.
    pub(crate) fn from_url(url: &BrokerUrl) -> Result<Option<Self>> {
        let timeout = url
            .option::<f64>("wait_replicas_timeout")?
            .unwrap_or(DEFAULT_WAIT_TIMEOUT);
        if !(timeout.is_finite() && timeout > 0.0 && timeout < 1e6) {
            return Err(BrokerError::InvalidUrl {
                url: url.redacted(),
                reason: "wait_replicas_timeout must be a number of seconds > 0".into(),
            });
        }
        Ok(match url.option::<u32>("wait_replicas")? {
            None | Some(0) => None,
            Some(replicas) => Some(ReplicaWait {
                replicas,
                // In range: 0 < timeout < 1e6 seconds.
                timeout_ms: (timeout * 1000.0).ceil() as u64,
            }),
        })
    }

    /// Appends the `WAIT` to a publish's pipeline (its reply is the pipeline's last).
    pub(crate) fn add_to(&self, pipe: &mut redis::Pipeline) {
        pipe.cmd("WAIT").arg(self.replicas).arg(self.timeout_ms);
    }

    /// Checks the `WAIT` reply: how many replicas acknowledged the publish.
    pub(crate) fn check(&self, acknowledged: Option<i64>) -> Result<()> {
        match acknowledged {
            Some(n) if n >= i64::from(self.replicas) => Ok(()),
            n => Err(BrokerError::Transport {
                transport: "redis",
                message: format!(
                    "the message reached the master, but {} of the {} replicas asked for \
                     (wait_replicas) confirmed it within {} ms: it may be lost if the master \
                     fails now",
                    n.unwrap_or(0),
                    self.replicas,
                    self.timeout_ms
                ),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_replicas_is_read_and_checked() {
        let url = |q: &str| BrokerUrl::parse(&format!("redis://h/0?{q}")).unwrap();
        assert!(ReplicaWait::from_url(&url("")).unwrap().is_none());
        assert!(ReplicaWait::from_url(&url("wait_replicas=0"))
            .unwrap()
            .is_none());
        assert!(ReplicaWait::from_url(&url("wait_replicas=x")).is_err());
        assert!(ReplicaWait::from_url(&url("wait_replicas=1&wait_replicas_timeout=0")).is_err());
        let wait = ReplicaWait::from_url(&url("wait_replicas=2&wait_replicas_timeout=0.25"))
            .unwrap()
            .unwrap();
        assert_eq!(wait.timeout_ms, 250);
        assert!(wait.check(Some(2)).is_ok());
        let short = wait.check(Some(1)).unwrap_err().to_string();
        assert!(short.contains("1 of the 2 replicas"), "{short}");
        assert!(wait.check(None).is_err());
    }

    #[test]
    fn a_replica_or_a_lost_server_means_a_new_master() {
        let readonly = RedisError::from((
            ErrorKind::Server(ServerErrorKind::ReadOnly),
            "READONLY",
            "You can't write against a read only replica.".to_owned(),
        ));
        assert!(needs_new_master(&readonly));
        let refused: RedisError =
            std::io::Error::from(std::io::ErrorKind::ConnectionRefused).into();
        assert!(needs_new_master(&refused));
        let wrong_type = RedisError::from((
            ErrorKind::Server(ServerErrorKind::ResponseError),
            "WRONGTYPE",
        ));
        assert!(!needs_new_master(&wrong_type));
    }

    #[test]
    fn a_sentinel_url_needs_its_master_name_and_no_tls() {
        let url = BrokerUrl::parse("sentinel://h1;sentinel://h2/0?master_name=m").unwrap();
        let dialer = Dialer::open(&url, "unused").unwrap();
        assert!(dialer.is_sentinel());
        assert_eq!(dialer.get_connection_info().redis_settings().db(), 0);
        let tls = BrokerUrl::parse("sentinel://h1/0?master_name=m&ssl_cert_reqs=none").unwrap();
        assert!(Dialer::open(&tls, "unused").is_err());
    }
}
