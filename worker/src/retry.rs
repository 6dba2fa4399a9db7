//! Retry decisions: whether a failed run is retried, and after how long. Pure.

use std::time::Duration;

use crate::task::{TaskError, TaskOptions};

/// What to do after a run ended in an error.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Send the job again with `retries + 1`, not to run before `countdown` from now.
    Retry {
        countdown: Duration,
        cause: TaskError,
    },
    /// Store the failure.
    Fail(TaskError),
}

/// Decides for a job that has been retried `retries` times so far. `random` is a value in [0, 1) used
/// for jitter (passed in so the decision stays pure).
pub fn decide(error: TaskError, retries: u32, options: &TaskOptions, random: f64) -> Decision {
    let (countdown, cause) = match error {
        TaskError::Retry { countdown, reason } => {
            let cause = reason.map(|b| *b).unwrap_or_else(|| {
                TaskError::in_module("Retry", "retry requested", "celery.exceptions")
            });
            (countdown.unwrap_or(options.default_retry_delay), cause)
        }
        failed => {
            let auto = options
                .autoretry_for
                .iter()
                .any(|t| t == "*" || t == failed.exc_type());
            if !auto {
                return Decision::Fail(failed);
            }
            let countdown = match options.retry_backoff {
                Some(factor) => backoff(
                    factor,
                    retries,
                    options.retry_backoff_max,
                    options.retry_jitter,
                    random,
                ),
                None => options.default_retry_delay,
            };
            (countdown, failed)
        }
    };
    match options.max_retries {
        Some(max) if retries >= max => Decision::Fail(match cause {
            TaskError::Failed { exc_type, .. } if exc_type == "Retry" => TaskError::in_module(
                "MaxRetriesExceededError",
                format!("can't retry: max retries ({max}) exceeded"),
                "celery.exceptions",
            ),
            other => other,
        }),
        _ => Decision::Retry { countdown, cause },
    }
}

/// Celery's exponential backoff: `min(max, factor * 2^retries)`, with full jitter when asked.
pub fn backoff(
    factor: Duration,
    retries: u32,
    max: Duration,
    jitter: bool,
    random: f64,
) -> Duration {
    let exp = factor.as_secs_f64() * 2f64.powi(retries.min(62) as i32);
    let capped = exp.min(max.as_secs_f64());
    let secs = if jitter {
        capped * random.clamp(0.0, 1.0)
    } else {
        capped
    };
    Duration::from_secs_f64(secs.max(0.0))
}

/// A value in [0, 1) from the OS random source (via a v4 UUID), for jitter.
pub fn random_unit() -> f64 {
    (uuid::Uuid::new_v4().as_u128() >> 75) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> TaskOptions {
        TaskOptions {
            max_retries: Some(2),
            ..TaskOptions::default()
        }
    }

    #[test]
    fn explicit_retries_until_the_limit() {
        let e = TaskError::Retry {
            countdown: Some(Duration::from_secs(5)),
            reason: None,
        };
        assert!(
            matches!(decide(e.clone(), 0, &opts(), 0.5), Decision::Retry { countdown, .. } if countdown == Duration::from_secs(5))
        );
        match decide(e, 2, &opts(), 0.5) {
            Decision::Fail(TaskError::Failed { exc_type, .. }) => {
                assert_eq!(exc_type, "MaxRetriesExceededError")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn autoretry_only_for_listed_errors_with_backoff() {
        let mut o = opts();
        o.autoretry_for = vec!["IOError".into()];
        o.retry_backoff = Some(Duration::from_secs(2));
        o.retry_jitter = false;
        assert_eq!(
            decide(TaskError::new("ValueError", "x"), 0, &o, 0.5),
            Decision::Fail(TaskError::new("ValueError", "x"))
        );
        match decide(TaskError::new("IOError", "x"), 1, &o, 0.5) {
            Decision::Retry { countdown, .. } => assert_eq!(countdown, Duration::from_secs(4)),
            other => panic!("{other:?}"),
        }
        // Past max_retries the original error is what fails the job.
        assert_eq!(
            decide(TaskError::new("IOError", "x"), 2, &o, 0.5),
            Decision::Fail(TaskError::new("IOError", "x"))
        );
    }

    #[test]
    fn backoff_is_capped_and_jittered() {
        assert_eq!(
            backoff(
                Duration::from_secs(1),
                20,
                Duration::from_secs(600),
                false,
                0.0
            ),
            Duration::from_secs(600)
        );
        assert_eq!(
            backoff(
                Duration::from_secs(1),
                3,
                Duration::from_secs(600),
                true,
                0.5
            ),
            Duration::from_secs(4)
        );
        let r = random_unit();
        assert!((0.0..1.0).contains(&r));
    }
}
