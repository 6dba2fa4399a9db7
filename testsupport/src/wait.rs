//! Bounded waiting: poll a condition until it holds, and fail the test (naming what it waited for)
//! when it does not within the given patience. A bound, not a speed assertion.

use std::future::Future;
use std::time::Duration;

/// Polls `cond` every 20 ms until it returns true; panics with `what` after `patience`.
pub async fn eventually<F, Fut>(patience: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let until = tokio::time::Instant::now() + patience;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < until,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
