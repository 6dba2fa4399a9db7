//! [`Redial`]: the shared, multiplexed Redis connection of a broker, a result backend, a lease or a
//! rate limiter, which dials again when a command times out.
//!
//! The redis crate's `ConnectionManager` reconnects when its connection is seen dropped (a reset,
//! an end of stream, a broken pipe), but not when a command times out: the connection is kept, and
//! a connection that went silent for good — a network cut that outlasted the far end's patience, a
//! NAT or firewall that forgot it, a server host that vanished — stays in use for ever, each command
//! failing after the response timeout, and the process is deaf to Redis until it restarts.
//! [`Redial`] wraps the manager: after a command times out on it, the next command goes to a fresh
//! manager (which dials at once). Concurrent timeouts on the same manager replace it once.
//!
//! On a `sentinel://` URL the manager is replaced also when its server went away or turned replica
//! ([`super::sentinel::needs_new_master`]): the replacement is dialed to the master the sentinels
//! name then, so a failover is followed without a restart. A connection to a cluster's seed nodes
//! (pub/sub broadcasts) is likewise moved to the next live seed when its node goes away. A master
//! that was replaced while it stayed up (a forced failover, a partition) accepts writes until the
//! sentinels demote it, and those writes are lost with its demotion: so a watch also asks the
//! sentinels every [`MASTER_CHECK`] where the master is, and moves the connection when they name
//! another server.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

use super::sentinel::{self, Dialer};

/// How often a connection dialed through the sentinels checks it still leads to the master they name.
pub(crate) const MASTER_CHECK: Duration = Duration::from_secs(1);

/// A reconnecting connection that also dials again after a timeout; cheap to clone (clones share
/// the current connection).
#[derive(Clone)]
pub struct Redial {
    inner: Arc<Inner>,
}

struct Inner {
    dialer: Dialer,
    config: ConnectionManagerConfig,
    db: i64,
    /// The manager in use and how many times it was replaced.
    current: Mutex<(u64, ConnectionManager)>,
    /// The address the manager in use was dialed to (`host:port`).
    dialed: Mutex<String>,
}

impl Redial {
    /// Wraps `conn`, a manager opened on `client` (`dialer`'s server now) with `config` (used
    /// again for its replacements). Through the sentinels, a watch follows the master (see the
    /// module doc) for as long as a clone of this lives.
    pub(crate) fn new(
        dialer: Dialer,
        client: &redis::Client,
        config: ConnectionManagerConfig,
        conn: ConnectionManager,
    ) -> Self {
        let db = dialer.get_connection_info().redis_settings().db();
        let redial = Redial {
            inner: Arc::new(Inner {
                dialer,
                config,
                db,
                current: Mutex::new((0, conn)),
                dialed: Mutex::new(client.get_connection_info().addr().to_string()),
            }),
        };
        if redial.inner.dialer.is_sentinel() {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(watch_master(Arc::downgrade(&redial.inner)));
            }
        }
        redial
    }

    /// The manager in use, and its generation.
    fn current(&self) -> (u64, ConnectionManager) {
        let guard = self.inner.current.lock().unwrap_or_else(|e| e.into_inner());
        (guard.0, guard.1.clone())
    }

    /// The generation in use, unless it is no longer `generation`.
    fn still(&self, generation: u64) -> bool {
        let guard = self.inner.current.lock().unwrap_or_else(|e| e.into_inner());
        guard.0 == generation
    }

    /// After a command on generation `generation` failed with `error`: a timeout (or, through the
    /// sentinels, a lost or demoted master) replaces it, unless another caller already did.
    async fn after_error(&self, generation: u64, error: &redis::RedisError) {
        let replace = if self.inner.dialer.redials_on_loss() {
            sentinel::needs_new_master(error)
        } else {
            error.is_timeout()
        };
        if !replace || !self.still(generation) {
            return;
        }
        let client = match self.inner.dialer.client().await {
            Ok(client) => client,
            Err(e) => {
                tracing::warn!(%error, error_finding_master = %e, "redis: no master to dial yet");
                return;
            }
        };
        if self.replace(generation, client) {
            tracing::warn!(%error, "redis: dialed a new connection after an error");
        }
    }

    /// Puts a manager on `client` in place of generation `generation`, unless another caller
    /// already replaced it; true if it did.
    fn replace(&self, generation: u64, client: redis::Client) -> bool {
        let addr = client.get_connection_info().addr().to_string();
        let mut guard = self.inner.current.lock().unwrap_or_else(|e| e.into_inner());
        if guard.0 != generation {
            return false;
        }
        match ConnectionManager::new_lazy_with_config(client, self.inner.config.clone()) {
            Ok(fresh) => {
                *guard = (generation.wrapping_add(1), fresh);
                *self.inner.dialed.lock().unwrap_or_else(|e| e.into_inner()) = addr;
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "redis: cannot make a new connection");
                false
            }
        }
    }

    /// Moves the connection to the master the sentinels name, if they name another server than
    /// the one it leads to.
    async fn follow_master(&self) {
        let (generation, _) = self.current();
        let Ok(client) = self.inner.dialer.client().await else {
            return; // no master named now: the errors of the commands will say so
        };
        let named = client.get_connection_info().addr().to_string();
        let dialed = self
            .inner
            .dialed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if named != dialed && self.replace(generation, client) {
            tracing::warn!(from = %dialed, to = %named, "redis sentinel: the master moved; following it");
        }
    }

    async fn checked<T>(&self, generation: u64, out: RedisResult<T>) -> RedisResult<T> {
        if let Err(e) = &out {
            self.after_error(generation, e).await;
        }
        out
    }
}

/// Every [`MASTER_CHECK`], while the connection lives: [`Redial::follow_master`].
async fn watch_master(inner: Weak<Inner>) {
    loop {
        tokio::time::sleep(MASTER_CHECK).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        Redial { inner }.follow_master().await;
    }
}

impl ConnectionLike for Redial {
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
        self.inner.db
    }
}
