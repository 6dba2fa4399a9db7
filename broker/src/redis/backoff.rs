//! Retry pacing after a connection error: 100 ms doubling up to 5 s (so a retry loop never spins and
//! never floods the log), and [`retry_idempotent`] for commands that are safe to send twice.

use std::future::Future;
use std::time::Duration;

use crate::error::Result;

const FIRST: Duration = Duration::from_millis(100);
const MAX: Duration = Duration::from_secs(5);

/// The delay before the next retry; reset after a success.
#[derive(Debug, Default)]
pub(crate) struct Backoff {
    failures: u32,
}

impl Backoff {
    /// Records a failure and returns how long to wait before retrying.
    pub(crate) fn fail(&mut self) -> Duration {
        let delay = FIRST.saturating_mul(1 << self.failures.min(6)).min(MAX);
        self.failures = self.failures.saturating_add(1);
        delay
    }

    /// Records a success.
    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }
}

/// Runs `op`, retrying up to twice more on a connection error (the shared connection reconnects in
/// between). Only for operations whose second run is harmless if the first one did happen (our
/// compare-and-swap scripts).
pub(crate) async fn retry_idempotent<T, F, Fut>(mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut backoff = Backoff::default();
    loop {
        match op().await {
            Err(e) if e.is_connection() && backoff.failures < 2 => {
                let delay = backoff.fail();
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

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::default();
        let ms: Vec<u128> = (0..8).map(|_| b.fail().as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        b.reset();
        assert_eq!(b.fail(), FIRST);
    }
}
