//! Rate limits: Celery's `"100/s"`, `"10/m"`, `"5/h"` strings, a per-process token bucket, and a
//! bucket shared by the whole fleet through Redis (an option; Celery only limits per worker).

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

/// The smallest count a rate limit may have (one start per 1,000 intervals).
pub const MIN_COUNT: f64 = 0.001;
/// The largest count a rate limit may have.
pub const MAX_COUNT: f64 = 1e9;
/// The longest a token bucket sleeps before it looks again.
const MAX_WAIT: Duration = Duration::from_secs(3600);

/// At most `count` starts per `per`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub count: f64,
    pub per: Duration,
}

impl FromStr for RateLimit {
    type Err = String;

    /// Parses `"N/s"`, `"N/m"`, `"N/h"` or a bare `"N"` (per second), as Celery does.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (n, unit) = s.split_once('/').unwrap_or((s, "s"));
        let count: f64 = n
            .trim()
            .parse()
            .map_err(|_| format!("rate limit `{s}`: `{n}` is not a number"))?;
        if !(count > 0.0 && count.is_finite()) {
            return Err(format!("rate limit `{s}`: the count must be above 0"));
        }
        if !(MIN_COUNT..=MAX_COUNT).contains(&count) {
            return Err(format!(
                "rate limit `{s}`: the count must be between {MIN_COUNT} and {MAX_COUNT}"
            ));
        }
        let per = match unit.trim().chars().next() {
            Some('s') => Duration::from_secs(1),
            Some('m') => Duration::from_secs(60),
            Some('h') => Duration::from_secs(3600),
            _ => return Err(format!("rate limit `{s}`: unit must be s, m or h")),
        };
        Ok(RateLimit { count, per })
    }
}

impl std::fmt::Display for RateLimit {
    /// Celery's spelling: `10/s`, `2.5/m`, `5/h`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unit = match self.per.as_secs() {
            60 => "m",
            3600 => "h",
            _ => "s",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

/// The rate limits of one worker process by task name, changeable while it runs (the remote
/// `rate_limit` command). A job looks its task's limiter up when it is about to start, so a change
/// applies to jobs that have not started yet.
#[derive(Debug, Default)]
pub(crate) struct RateLimits {
    map: std::sync::RwLock<HashMap<String, (RateLimit, Arc<Limiter>)>>,
    /// With `--global-rate-limits`: new limits are shared through this Redis too.
    global: Option<celerity_broker::redis::RedisRateLimiter>,
}

impl RateLimits {
    /// Limits for `initial`, per process or through `global`.
    pub fn new(
        initial: impl IntoIterator<Item = (String, RateLimit)>,
        global: Option<celerity_broker::redis::RedisRateLimiter>,
    ) -> Self {
        let limits = RateLimits {
            map: Default::default(),
            global,
        };
        for (task, limit) in initial {
            limits.set(&task, Some(limit));
        }
        limits
    }

    /// The limiter of `task`, if it has a limit.
    pub fn get(&self, task: &str) -> Option<Arc<Limiter>> {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        map.get(task).map(|(_, l)| l.clone())
    }

    /// Sets (or with `None` removes) the limit of `task`; jobs already waiting on the old limiter
    /// finish waiting on it.
    pub fn set(&self, task: &str, limit: Option<RateLimit>) {
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        match limit {
            None => {
                map.remove(task);
            }
            Some(limit) => {
                let limiter = match &self.global {
                    Some(redis) => Limiter::Global {
                        redis: redis.clone(),
                        task: task.to_owned(),
                        limit,
                    },
                    None => Limiter::Local(TokenBucket::new(limit)),
                };
                map.insert(task.to_owned(), (limit, Arc::new(limiter)));
            }
        }
    }

    /// The current limit of `task`, if any.
    pub fn get_limit(&self, task: &str) -> Option<RateLimit> {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        map.get(task).map(|(l, _)| *l)
    }

    /// Every limit, sorted by task name.
    pub fn snapshot(&self) -> Vec<(String, RateLimit)> {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<_> = map.iter().map(|(t, (l, _))| (t.clone(), *l)).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }
}

/// A token bucket that hands out starts at the configured rate (burst = one interval's count).
#[derive(Debug)]
pub(crate) struct TokenBucket {
    limit: RateLimit,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    pub fn new(limit: RateLimit) -> Self {
        TokenBucket {
            limit,
            state: Mutex::new((limit.count, Instant::now())),
        }
    }

    /// Waits until a start is allowed, then takes it.
    pub async fn acquire(&self) {
        loop {
            let wait = {
                let mut st = self.state.lock().await;
                let rate = self.limit.count / self.limit.per.as_secs_f64();
                let now = Instant::now();
                st.0 = (st.0 + (now - st.1).as_secs_f64() * rate).min(self.limit.count);
                st.1 = now;
                if st.0 >= 1.0 {
                    st.0 -= 1.0;
                    return;
                }
                Duration::try_from_secs_f64((1.0 - st.0) / rate)
                    .map_or(MAX_WAIT, |w| w.min(MAX_WAIT))
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// The limit of one task: in this process, or shared by every worker through Redis.
#[derive(Debug)]
pub(crate) enum Limiter {
    Local(TokenBucket),
    Global {
        redis: celerity_broker::redis::RedisRateLimiter,
        task: String,
        limit: RateLimit,
    },
}

impl Limiter {
    /// Waits until the task may start once more.
    pub async fn acquire(&self) {
        match self {
            Limiter::Local(bucket) => bucket.acquire().await,
            Limiter::Global { redis, task, limit } => {
                let per_second = limit.count / limit.per.as_secs_f64();
                loop {
                    match redis.try_take(task, limit.count, per_second).await {
                        Ok(wait) if wait.is_zero() => return,
                        Ok(wait) => tokio::time::sleep(wait).await,
                        Err(e) => {
                            // Never run past the limit because Redis is away: wait and ask again.
                            tracing::warn!(task, error = %e, "cluster-wide rate limit unavailable; waiting");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_celery_rate_strings() {
        assert_eq!(
            "100/s".parse::<RateLimit>().unwrap(),
            RateLimit {
                count: 100.0,
                per: Duration::from_secs(1)
            }
        );
        assert_eq!(
            "10/m".parse::<RateLimit>().unwrap().per,
            Duration::from_secs(60)
        );
        assert_eq!(
            "5/h".parse::<RateLimit>().unwrap().per,
            Duration::from_secs(3600)
        );
        assert_eq!("7".parse::<RateLimit>().unwrap().count, 7.0);
        assert!("x/s".parse::<RateLimit>().is_err());
        assert!("0/s".parse::<RateLimit>().is_err());
        assert!("5/d".parse::<RateLimit>().is_err());
        // Absurd rates are refused with a clear error, not accepted to panic later.
        for absurd in ["1e-17/h", "1e300/s", "0.0000001/s"] {
            assert!(absurd.parse::<RateLimit>().is_err(), "{absurd}");
        }
    }

    #[test]
    fn limits_change_at_runtime() {
        let l = RateLimits::new([("a".to_owned(), "10/s".parse().unwrap())], None);
        assert!(l.get("a").is_some() && l.get("b").is_none());
        l.set("b", Some("5/m".parse().unwrap()));
        l.set("a", None);
        assert!(l.get("a").is_none());
        let snap: Vec<String> = l
            .snapshot()
            .iter()
            .map(|(t, r)| format!("{t}={r}"))
            .collect();
        assert_eq!(snap, ["b=5/m"]);
        assert_eq!("2.5/h".parse::<RateLimit>().unwrap().to_string(), "2.5/h");
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_bucket_waits_without_panicking() {
        let b = TokenBucket::new(RateLimit {
            count: 1e-17,
            per: Duration::from_secs(3600),
        });
        // Before the fix the wait (3.6e20 s) overflowed `Duration` and panicked.
        let first = tokio::time::timeout(Duration::from_secs(7200), b.acquire()).await;
        assert!(first.is_err(), "a start came at a rate of 1e-17/h");
    }

    #[tokio::test(start_paused = true)]
    async fn bucket_spaces_starts_out() {
        let b = TokenBucket::new("2/s".parse().unwrap());
        let t0 = Instant::now();
        for _ in 0..6 {
            b.acquire().await;
        }
        // 2 in the initial burst, then 4 more at 2/s.
        assert!(
            Instant::now() - t0 >= Duration::from_millis(1990),
            "{:?}",
            Instant::now() - t0
        );
    }
}
