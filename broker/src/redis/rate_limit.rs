//! A rate limit shared by every worker through Redis: one token bucket per task name
//! (`<prefix>celerity.ratelimit.<task>`), refilled and taken in one Lua script, so a limit of
//! "100/s" holds for the whole fleet rather than per process as in Celery.

use std::time::Duration;

use super::cluster::AnyConn;
use redis::Script;

use super::restore::unix_now;
use crate::error::Result;
use crate::url::BrokerUrl;

static TAKE: std::sync::LazyLock<Script> =
    std::sync::LazyLock::new(|| Script::new(include_str!("scripts/rate_limit.lua")));

/// Cluster-wide token buckets on one Redis.
#[derive(Clone)]
pub struct RedisRateLimiter {
    conn: AnyConn,
    prefix: String,
}

impl std::fmt::Debug for RedisRateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisRateLimiter")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisRateLimiter {
    /// Connects to the Redis a `redis://` URL names (its `global_keyprefix` applies; other broker
    /// options are ignored).
    pub async fn connect(raw: &str) -> Result<Self> {
        let url = BrokerUrl::parse(raw)?;
        let prefix = url
            .option::<String>("global_keyprefix")?
            .unwrap_or_default();
        let conn = super::cluster::connect_any(&url).await?;
        Ok(RedisRateLimiter { conn, prefix })
    }

    /// Takes one start for `task` from a bucket of `capacity` refilled at `per_second`; returns how
    /// long to wait first when the bucket is empty (`Duration::ZERO`: go now).
    pub async fn try_take(&self, task: &str, capacity: f64, per_second: f64) -> Result<Duration> {
        let mut conn = self.conn.clone();
        let wait_ms: i64 = TAKE
            .key(format!("{}celerity.ratelimit.{task}", self.prefix))
            .arg(capacity)
            .arg(per_second)
            .arg(format!("{:.6}", unix_now()))
            .invoke_async(&mut conn)
            .await?;
        Ok(Duration::from_millis(u64::try_from(wait_ms).unwrap_or(0)))
    }
}
