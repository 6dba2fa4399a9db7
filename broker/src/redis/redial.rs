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
//! name then, so a failover is followed without a restart.

use std::sync::{Arc, Mutex};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

use super::sentinel::{self, Dialer};

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
}

impl Redial {
    /// Wraps `conn`, a manager opened on `dialer`'s server with `config` (used again for its
    /// replacements).
    pub(crate) fn new(
        dialer: Dialer,
        config: ConnectionManagerConfig,
        conn: ConnectionManager,
    ) -> Self {
        let db = dialer.get_connection_info().redis_settings().db();
        Redial {
            inner: Arc::new(Inner {
                dialer,
                config,
                db,
                current: Mutex::new((0, conn)),
            }),
        }
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
        let replace = if self.inner.dialer.is_sentinel() {
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
        let mut guard = self.inner.current.lock().unwrap_or_else(|e| e.into_inner());
        if guard.0 != generation {
            return;
        }
        match ConnectionManager::new_lazy_with_config(client, self.inner.config.clone()) {
            Ok(fresh) => {
                tracing::warn!(%error, "redis: dialing a new connection after an error");
                *guard = (generation.wrapping_add(1), fresh);
            }
            Err(e) => tracing::warn!(error = %e, "redis: cannot make a new connection"),
        }
    }

    async fn checked<T>(&self, generation: u64, out: RedisResult<T>) -> RedisResult<T> {
        if let Err(e) = &out {
            self.after_error(generation, e).await;
        }
        out
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
