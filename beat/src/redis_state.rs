//! Beat's state on a Redis broker: the connection, its key names, and the per-entry last-run times
//! (`<prefix>celerity.beat.last_run`, entry → Unix seconds of the tick it last fired for).
//!
//! Recording a tick is fenced: the script writes only while our lock token and epoch are current,
//! so a beat that lost the lock (paused, partitioned) can no longer claim, and then send, a tick.

use std::collections::HashMap;
use std::sync::LazyLock;

use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};

use celerity_broker::url::BrokerUrl;

use crate::error::Result;
use crate::lock::Lease;
use crate::state::Recorded;

static RECORD: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/record.lua")));

/// A connection to the Redis holding beat's lock and state, with the broker's `global_keyprefix`.
#[derive(Clone)]
pub(crate) struct RedisStore {
    pub(crate) conn: ConnectionManager,
    prefix: String,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects to the Redis a `redis://`/`rediss://` broker URL names.
    pub(crate) async fn connect(url: &BrokerUrl) -> Result<Self> {
        let prefix = url
            .option::<String>("global_keyprefix")?
            .unwrap_or_default();
        let conn = celerity_broker::redis::connect_manager(url).await?;
        Ok(RedisStore { conn, prefix })
    }

    pub(crate) fn lock_key(&self) -> String {
        format!("{}celerity.beat.lock", self.prefix)
    }

    pub(crate) fn epoch_key(&self) -> String {
        format!("{}celerity.beat.epoch", self.prefix)
    }

    fn last_run_key(&self) -> String {
        format!("{}celerity.beat.last_run", self.prefix)
    }

    /// Every entry's last recorded tick (Unix seconds). Unparsable values are ignored.
    pub(crate) async fn last_runs(&self) -> Result<HashMap<String, i64>> {
        let mut conn = self.conn.clone();
        let raw: HashMap<String, String> = conn.hgetall(self.last_run_key()).await?;
        Ok(raw
            .into_iter()
            .filter_map(|(k, v)| v.parse().ok().map(|t| (k, t)))
            .collect())
    }

    /// Claims `tick` for `entry` under `lease` (see [`Recorded`]).
    pub(crate) async fn record(&self, lease: &Lease, entry: &str, tick: i64) -> Result<Recorded> {
        let mut conn = self.conn.clone();
        let r: i64 = RECORD
            .key(self.lock_key())
            .key(self.epoch_key())
            .key(self.last_run_key())
            .arg(&lease.token)
            .arg(lease.epoch)
            .arg(entry)
            .arg(tick)
            .invoke_async(&mut conn)
            .await?;
        Ok(match r {
            1 => Recorded::Fresh,
            -1 => Recorded::AlreadySent,
            _ => Recorded::NotLeader,
        })
    }
}
