//! Retry pacing after a connection error, the one copy every reconnect loop uses: exponential from
//! `base`, capped at `max`, with "equal jitter" (half of each delay fixed, half random) so a retry loop
//! never spins, never floods the log, and a fleet that lost its broker at the same moment does not
//! come back in lockstep.
//!
//! - [`delay`]: the delay before retry number `attempt` (from 0), stateless; [`ceiling`] is its
//!   deterministic upper bound.
//! - [`Backoff`]: the same, counting the attempts itself; [`Backoff::reset`] after a success.
//! - `retry_idempotent` (crate-internal): runs a command that is safe to send twice, retrying it
//!   on a connection error.
//!
//! The randomness comes from a v4 UUID (the OS random source), as elsewhere in this crate; no
//! arithmetic here can overflow, whatever the attempt number.

#[cfg(feature = "redis")]
use std::future::Future;
use std::time::Duration;

#[cfg(feature = "redis")]
use crate::error::Result;

/// The first reconnect delay of the transports and backends (before jitter).
pub const RECONNECT_BASE: Duration = Duration::from_millis(100);
/// The longest reconnect delay of the transports and backends.
pub const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// The delay before retry number `attempt` (0 for the first retry) without jitter:
/// `min(max, base * 2^attempt)`, saturating (a huge `attempt` gives `max`).
pub fn ceiling(attempt: u32, base: Duration, max: Duration) -> Duration {
    1u32.checked_shl(attempt)
        .and_then(|factor| base.checked_mul(factor))
        .map_or(max, |d| d.min(max))
}

/// [`ceiling`] with equal jitter, `random` in `[0, 1)` (out-of-range values are clamped): half the
/// ceiling fixed, plus a random part of the other half. Pure, for tests and callers with their own
/// random source.
pub fn equal_jitter(ceiling: Duration, random: f64) -> Duration {
    let half = ceiling / 2;
    let random = if random.is_finite() {
        random.clamp(0.0, 1.0)
    } else {
        0.0
    };
    (ceiling - half).saturating_add(half.mul_f64(random))
}

/// The delay before retry number `attempt` (from 0): [`ceiling`] with equal jitter, so between half
/// of it and all of it. Attempt 0 waits about `base` (`base/2` to `base`).
pub fn delay(attempt: u32, base: Duration, max: Duration) -> Duration {
    equal_jitter(ceiling(attempt, base, max), random_unit())
}

/// A value in `[0, 1)` from a v4 UUID's top 48 bits (all random; the version bits are lower down).
fn random_unit() -> f64 {
    (uuid::Uuid::new_v4().as_u128() >> 80) as f64 / (1u64 << 48) as f64
}

/// Reconnect pacing for one loop: each [`Backoff::next`] is the next [`delay`]; a success calls
/// [`Backoff::reset`].
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempts: u32,
}

impl Default for Backoff {
    /// The transports' pacing: [`RECONNECT_BASE`] doubling up to [`RECONNECT_MAX`].
    fn default() -> Self {
        Backoff::new(RECONNECT_BASE, RECONNECT_MAX)
    }
}

impl Backoff {
    /// Delays from about `base`, doubling up to `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max,
            attempts: 0,
        }
    }

    /// Records a failed attempt and returns how long to wait before the next one.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Duration {
        let d = delay(self.attempts, self.base, self.max);
        self.attempts = self.attempts.saturating_add(1);
        d
    }

    /// Records a success: the next delay is about `base` again.
    pub fn reset(&mut self) {
        self.attempts = 0;
    }

    /// Failed attempts since the last reset (how many times [`Backoff::next`] was called).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }
}

/// Runs `op`, retrying up to twice more on a connection error (a shared connection reconnects in
/// between). Only for operations whose second run is harmless if the first one did happen (the Redis
/// transport's compare-and-swap scripts).
#[cfg(feature = "redis")]
pub(crate) async fn retry_idempotent<T, F, Fut>(mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut backoff = Backoff::default();
    loop {
        match op().await {
            Err(e) if e.is_connection() && backoff.attempts() < 2 => {
                let delay = backoff.next();
                tracing::debug!(error = %e, retry_in = ?delay, "retrying after a connection error");
                tokio::time::sleep(delay).await;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn ceiling_doubles_up_to_the_cap() {
        let ms: Vec<u128> = (0..8)
            .map(|a| ceiling(a, RECONNECT_BASE, RECONNECT_MAX).as_millis())
            .collect();
        assert_eq!(ms, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
    }

    #[test]
    fn no_overflow_for_any_attempt() {
        for attempt in [31, 32, 33, 64, 1000, u32::MAX - 1, u32::MAX] {
            assert_eq!(ceiling(attempt, MS(100), MS(5000)), MS(5000));
            let d = delay(attempt, MS(100), MS(5000));
            assert!(d >= MS(2500) && d <= MS(5000), "{attempt}: {d:?}");
            let huge = delay(attempt, Duration::MAX, Duration::MAX);
            assert!(huge >= Duration::MAX / 2, "{attempt}: {huge:?}");
        }
        // A base above the cap is capped.
        assert_eq!(ceiling(0, MS(9000), MS(5000)), MS(5000));
    }

    #[test]
    fn equal_jitter_stays_in_the_upper_half() {
        let c = MS(1000);
        assert_eq!(equal_jitter(c, 0.0), MS(500));
        assert_eq!(equal_jitter(c, 0.5), MS(750));
        assert!(equal_jitter(c, 0.999_999) <= c);
        assert_eq!(equal_jitter(c, -3.0), MS(500));
        assert_eq!(equal_jitter(c, 7.0), c);
        assert_eq!(equal_jitter(c, f64::NAN), MS(500));
        assert_eq!(equal_jitter(Duration::ZERO, 0.7), Duration::ZERO);
    }

    #[test]
    fn delays_are_bounded_and_grow() {
        for attempt in 0..12 {
            let top = ceiling(attempt, MS(100), MS(5000));
            for _ in 0..50 {
                let d = delay(attempt, MS(100), MS(5000));
                assert!(
                    d >= top / 2 && d <= top,
                    "attempt {attempt}: {d:?} vs {top:?}"
                );
            }
        }
        // Attempt 0 is about base; attempt 3's smallest delay exceeds attempt 0's largest.
        let first = delay(0, MS(100), MS(5000));
        assert!(first >= MS(50) && first <= MS(100));
        assert!(delay(3, MS(100), MS(5000)) > MS(100));
    }

    #[test]
    fn random_unit_is_in_range_and_varies() {
        let values: Vec<f64> = (0..64).map(|_| random_unit()).collect();
        assert!(values.iter().all(|v| (0.0..1.0).contains(v)));
        assert!(values.windows(2).any(|w| w[0] != w[1]));
    }

    #[test]
    fn backoff_counts_attempts_and_resets() {
        let mut b = Backoff::new(MS(100), MS(5000));
        assert_eq!(b.attempts(), 0);
        let mut tops = Vec::new();
        for a in 0..8 {
            let d = b.next();
            let top = ceiling(a, MS(100), MS(5000));
            assert!(d >= top / 2 && d <= top);
            tops.push(top.as_millis());
        }
        assert_eq!(tops, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(b.attempts(), 8);
        b.reset();
        assert_eq!(b.attempts(), 0);
        assert!(b.next() <= MS(100));
        let mut d = Backoff::default();
        assert!(d.next() <= RECONNECT_BASE);
    }

    #[test]
    fn attempts_saturate() {
        let mut b = Backoff::new(MS(1), MS(2));
        b.attempts = u32::MAX;
        assert!(b.next() <= MS(2));
        assert_eq!(b.attempts(), u32::MAX);
    }
}
