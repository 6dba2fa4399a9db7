//! The leader lease on Redis: `SET <prefix>celerity.beat.lock <token> NX PX <lease>`, a fencing epoch
//! (`INCR <prefix>celerity.beat.epoch`) taken with it, renewal and release only by the holder.

use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;

use crate::error::Result;
use crate::redis_state::RedisStore;

static ACQUIRE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/acquire.lua")));
static RENEW: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/renew.lua")));
static RELEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/release.lua")));

/// A held leader lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// This holder's random token (the lock key's value).
    pub token: String,
    /// The fencing epoch taken at acquisition; higher than every earlier holder's.
    pub epoch: i64,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl RedisStore {
    /// Takes the lock for `lease` if it is free.
    pub(crate) async fn try_acquire(&self, lease: Duration) -> Result<Option<Lease>> {
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
    pub(crate) async fn renew(&self, held: &Lease, lease: Duration) -> Result<bool> {
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
    pub(crate) async fn release(&self, held: &Lease) -> Result<()> {
        let mut conn = self.conn.clone();
        let _: i64 = RELEASE
            .key(self.lock_key())
            .arg(&held.token)
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }
}
