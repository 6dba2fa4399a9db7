//! The leader lease on Redis, and the last-run record it fences.
//!
//! Keys, under the broker's `global_keyprefix` and a caller-chosen stem (beat uses `celerity.beat`):
//! - `<stem>.lock`: `SET <token> NX PX <lease>`, renewed and released only by the holder
//!   (`scripts/acquire.lua`, `renew.lua`, `release.lua`);
//! - `<stem>.epoch`: the fencing epoch, `INCR`ed with every acquisition;
//! - `<stem>.last_run`: a hash, entry → Unix seconds of the tick it last ran for.
//!
//! On `redis+cluster://` the stem is hash-tagged (`{<global_keyprefix><stem>}.lock`, …) so the
//! scripts' keys share one slot.
//!
//! Recording a tick is fenced (`scripts/record.lua`): it writes only while our token and epoch are
//! current, so a holder that lost the lock (paused, partitioned) can no longer claim, and then act
//! on, a tick.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;

use crate::redis::AnyConn;
use redis::{AsyncCommands, Script};

use super::{Lease, Recorded};
use crate::error::Result;
use crate::url::BrokerUrl;

static ACQUIRE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/acquire.lua")));
static RENEW: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/renew.lua")));
static RELEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/release.lua")));
static RECORD: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/record.lua")));

/// A connection to the Redis holding a lease and its last-run hash.
#[derive(Clone)]
pub struct RedisLease {
    conn: AnyConn,
    /// `<global_keyprefix><stem>`.
    stem: String,
}

impl std::fmt::Debug for RedisLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLease")
            .field("stem", &self.stem)
            .finish_non_exhaustive()
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl RedisLease {
    /// Connects to the Redis a `redis://`/`rediss://` broker URL names; keys are
    /// `<global_keyprefix><stem>.lock`, `.epoch` and `.last_run`.
    pub async fn connect(url: &BrokerUrl, stem: &str) -> Result<Self> {
        let prefix = url
            .option::<String>("global_keyprefix")?
            .unwrap_or_default();
        let conn = crate::redis::connect_any(url).await?;
        // On a cluster the lease's scripts touch all three keys: one hash tag keeps them in one slot.
        let stem = if conn.is_cluster() {
            format!("{{{prefix}{stem}}}")
        } else {
            format!("{prefix}{stem}")
        };
        Ok(RedisLease { conn, stem })
    }

    fn lock_key(&self) -> String {
        format!("{}.lock", self.stem)
    }

    fn epoch_key(&self) -> String {
        format!("{}.epoch", self.stem)
    }

    fn last_run_key(&self) -> String {
        format!("{}.last_run", self.stem)
    }

    /// Takes the lock for `lease` if it is free.
    pub async fn try_acquire(&self, lease: Duration) -> Result<Option<Lease>> {
        let token = uuid::Uuid::new_v4().to_string();
        let mut conn = self.conn.clone();
        let epoch: Option<i64> = ACQUIRE
            .key(self.lock_key())
            .key(self.epoch_key())
            .arg(&token)
            .arg(millis(lease))
            .invoke_async(&mut conn)
            .await?;
        Ok(epoch.map(|epoch| Lease { token, epoch }))
    }

    /// Resets the lease to `lease` from now; `false` if the lock is no longer ours.
    pub async fn renew(&self, held: &Lease, lease: Duration) -> Result<bool> {
        let mut conn = self.conn.clone();
        let r: i64 = RENEW
            .key(self.lock_key())
            .arg(&held.token)
            .arg(millis(lease))
            .invoke_async(&mut conn)
            .await?;
        Ok(r == 1)
    }

    /// Gives the lock up (a standby may take it at once); harmless if it is no longer ours.
    pub async fn release(&self, held: &Lease) -> Result<()> {
        let mut conn = self.conn.clone();
        let _: i64 = RELEASE
            .key(self.lock_key())
            .arg(&held.token)
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    /// Every entry's last recorded tick (Unix seconds). Unparsable values are ignored.
    pub async fn last_runs(&self) -> Result<HashMap<String, i64>> {
        let mut conn = self.conn.clone();
        let raw: HashMap<String, String> = conn.hgetall(self.last_run_key()).await?;
        Ok(raw
            .into_iter()
            .filter_map(|(k, v)| v.parse().ok().map(|t| (k, t)))
            .collect())
    }

    /// Claims `tick` for `entry` under `lease` (see [`Recorded`]).
    pub async fn record(&self, lease: &Lease, entry: &str, tick: i64) -> Result<Recorded> {
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
