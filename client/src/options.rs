//! Per-call options: where a job goes, when it may run, how long it stays valid.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use celerity_broker::protocol::TaskMessage;

use crate::error::{ClientError, Result};
use crate::DEFAULT_QUEUE;

/// The farthest ahead a call may put a job's `eta` or `expires` (as a countdown or a time), and the
/// longest time limit: 100 years. More is a mistake (a unit mix-up, `1e15` seconds), and past about
/// 262,000 years it is not a time at all (chrono's range).
pub const MAX_DELAY: Duration = Duration::from_secs(36_525 * 24 * 3600);

/// When a job stops being worth running.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Expires {
    /// Seconds from the time it is sent.
    In(Duration),
    /// A fixed time.
    At(DateTime<Utc>),
}

/// Options of one call, as Celery's `apply_async` takes them. All optional.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SendOptions {
    /// Queue (routing key) to send to; `celery` by default.
    pub queue: Option<String>,
    /// Do not run before `now + countdown` (turned into `eta`, as Celery does).
    pub countdown: Option<Duration>,
    /// Do not run before this time.
    pub eta: Option<DateTime<Utc>>,
    /// Revoke the job if it has not started by then.
    pub expires: Option<Expires>,
    /// Message priority (AMQP: higher first with `max_priority` queues; Redis: 0 first).
    pub priority: Option<u8>,
    /// Use this task id instead of a fresh UUID.
    pub task_id: Option<String>,
    /// Extra headers, added to the message after Celery's own.
    pub headers: Map<String, Value>,
    /// Ask the worker not to store a result.
    pub ignore_result: Option<bool>,
    /// Hard time limit in seconds (the worker kills the job).
    pub time_limit: Option<f64>,
    /// Soft time limit in seconds (the job is cancelled).
    pub soft_time_limit: Option<f64>,
    /// Show this name in logs and monitors instead of the task name.
    pub shadow: Option<String>,
    /// Workflow ids, when this call is part of one.
    pub parent_id: Option<String>,
    pub root_id: Option<String>,
    pub group_id: Option<String>,
    pub group_index: Option<i64>,
    /// Retry count to put in the message (0 for a first send).
    pub retries: u32,
}

impl SendOptions {
    /// No options: queue `celery`, run at once, never expires.
    pub fn new() -> Self {
        Self::default()
    }

    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
        self
    }

    pub fn countdown(mut self, countdown: Duration) -> Self {
        self.countdown = Some(countdown);
        self
    }

    pub fn eta(mut self, eta: DateTime<Utc>) -> Self {
        self.eta = Some(eta);
        self
    }

    pub fn expires(mut self, expires: Expires) -> Self {
        self.expires = Some(expires);
        self
    }

    pub fn priority(mut self, priority: u8) -> Self {
        self.priority = Some(priority);
        self
    }

    pub fn task_id(mut self, id: impl Into<String>) -> Self {
        self.task_id = Some(id.into());
        self
    }

    pub fn header(mut self, name: impl Into<String>, value: Value) -> Self {
        self.headers.insert(name.into(), value);
        self
    }

    pub fn ignore_result(mut self, ignore: bool) -> Self {
        self.ignore_result = Some(ignore);
        self
    }

    pub fn time_limits(mut self, hard: Option<f64>, soft: Option<f64>) -> Self {
        self.time_limit = hard;
        self.soft_time_limit = soft;
        self
    }

    /// The queue this call goes to.
    pub fn queue_name(&self) -> &str {
        self.queue.as_deref().unwrap_or(DEFAULT_QUEUE)
    }

    /// Builds the task message for a call, applying these options at time `now`.
    pub fn build(
        &self,
        task: &str,
        args: Vec<Value>,
        kwargs: Map<String, Value>,
        now: DateTime<Utc>,
    ) -> Result<TaskMessage> {
        if task.is_empty() {
            return Err(ClientError::InvalidArgument("task name is empty".into()));
        }
        let mut m = match &self.task_id {
            Some(id) if id.is_empty() => {
                return Err(ClientError::InvalidArgument("task id is empty".into()))
            }
            Some(id) => TaskMessage::with_id(task, id.clone(), args, kwargs),
            None => TaskMessage::new(task, args, kwargs),
        };
        let h = &mut m.headers;
        let eta = match (self.countdown, self.eta) {
            (Some(_), Some(_)) => {
                return Err(ClientError::InvalidArgument(
                    "give countdown or eta, not both".into(),
                ));
            }
            (Some(c), None) => Some(after(now, c, "countdown")?),
            (None, Some(t)) => Some(not_too_far(now, t, "eta")?),
            (None, None) => None,
        };
        h.eta = eta.map(|t| t.fixed_offset());
        let expires = match self.expires {
            None => None,
            Some(Expires::At(t)) => Some(not_too_far(now, t, "expires")?),
            Some(Expires::In(d)) => Some(after(now, d, "expires")?),
        };
        if let Some(t) = expires {
            h.expires = Some(t.fixed_offset());
            // Celery 5.7 also sets the AMQP `expiration` property to the milliseconds left.
            let ms = t
                .signed_duration_since(now)
                .num_milliseconds()
                .clamp(0, i64::MAX);
            m.properties.expiration = Some(ms.to_string());
        }
        h.shadow = self.shadow.clone();
        h.timelimit = (
            time_limit(self.time_limit, "time limit")?,
            time_limit(self.soft_time_limit, "soft time limit")?,
        );
        h.ignore_result = self.ignore_result;
        h.retries = self.retries;
        if self.parent_id.is_some() {
            h.parent_id = self.parent_id.clone();
        }
        if self.root_id.is_some() {
            h.root_id = self.root_id.clone();
        }
        h.group = self.group_id.clone();
        h.group_index = self.group_index;
        for (k, v) in &self.headers {
            h.extra.insert(k.clone(), v.clone());
        }
        if let Some(p) = self.priority {
            m.properties.priority = p;
        }
        Ok(m)
    }
}

/// `now + delay`, for a delay of at most [`MAX_DELAY`].
fn after(now: DateTime<Utc>, delay: Duration, what: &str) -> Result<DateTime<Utc>> {
    let too_far = || {
        ClientError::InvalidArgument(format!(
            "{what} of {} s is more than {} s (100 years) away",
            delay.as_secs_f64(),
            MAX_DELAY.as_secs()
        ))
    };
    if delay > MAX_DELAY {
        return Err(too_far());
    }
    chrono::Duration::from_std(delay)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .ok_or_else(too_far)
}

/// `t`, if it is at most [`MAX_DELAY`] after `now` (any time before is fine: it is due at once).
fn not_too_far(now: DateTime<Utc>, t: DateTime<Utc>, what: &str) -> Result<DateTime<Utc>> {
    let limit = after(now, MAX_DELAY, what)?;
    if t > limit {
        return Err(ClientError::InvalidArgument(format!(
            "{what} {} is more than 100 years away",
            t.to_rfc3339()
        )));
    }
    Ok(t)
}

/// A time limit in seconds: finite, ≥ 0 and at most [`MAX_DELAY`].
fn time_limit(limit: Option<f64>, what: &str) -> Result<Option<f64>> {
    match limit {
        Some(s) if !(s.is_finite() && (0.0..=MAX_DELAY.as_secs_f64()).contains(&s)) => {
            Err(ClientError::InvalidArgument(format!(
                "{what} must be a number of seconds from 0 to {} (100 years), got {s}",
                MAX_DELAY.as_secs()
            )))
        }
        _ => Ok(limit),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2024-05-01T12:00:00.250000+00:00")
            .unwrap()
            .to_utc()
    }

    #[test]
    fn countdown_and_expires_become_times() {
        let o = SendOptions::new()
            .queue("q")
            .countdown(Duration::from_secs(5))
            .expires(Expires::In(Duration::from_secs(60)))
            .priority(7)
            .time_limits(Some(10.0), Some(5.5));
        let m = o
            .build("demo.add", vec![json!(1)], Map::new(), now())
            .unwrap()
            .encode();
        assert_eq!(m.headers["eta"], json!("2024-05-01T12:00:05.250000+00:00"));
        assert_eq!(
            m.headers["expires"],
            json!("2024-05-01T12:01:00.250000+00:00")
        );
        assert_eq!(m.properties.expiration.as_deref(), Some("60000"));
        assert_eq!(m.properties.priority, 7);
        assert_eq!(m.headers["timelimit"], json!([10, 5.5]));
        assert_eq!(o.queue_name(), "q");
        assert_eq!(SendOptions::new().queue_name(), "celery");
    }

    #[test]
    fn bad_options_are_refused() {
        let both = SendOptions::new()
            .countdown(Duration::from_secs(1))
            .eta(now());
        assert!(both.build("t", vec![], Map::new(), now()).is_err());
        assert!(SendOptions::new()
            .build("", vec![], Map::new(), now())
            .is_err());
        assert!(SendOptions::new()
            .task_id("")
            .build("t", vec![], Map::new(), now())
            .is_err());
    }

    /// Times no worker could wait for, and limits no clock could count (issue 16: `--countdown 1e15`
    /// panicked in `DateTime + TimeDelta`): each is an error naming the option, not a panic.
    #[test]
    fn absurd_times_and_limits_are_refused_not_panicked_on() {
        let huge = [
            Duration::from_secs_f64(1e15),
            Duration::from_secs(u64::MAX),
            Duration::MAX,
            MAX_DELAY + Duration::from_secs(1),
        ];
        let far = [
            DateTime::<Utc>::MAX_UTC,
            now() + chrono::Duration::days(365 * 101),
        ];
        let mut refused = Vec::new();
        for d in huge {
            refused.push(("countdown", SendOptions::new().countdown(d)));
            refused.push(("expires", SendOptions::new().expires(Expires::In(d))));
        }
        for t in far {
            refused.push(("eta", SendOptions::new().eta(t)));
            refused.push(("expires", SendOptions::new().expires(Expires::At(t))));
        }
        for limit in [f64::NAN, f64::INFINITY, -1.0, 1e19, 1e300] {
            refused.push((
                "time limit",
                SendOptions::new().time_limits(Some(limit), None),
            ));
            refused.push((
                "soft time limit",
                SendOptions::new().time_limits(None, Some(limit)),
            ));
        }
        for (what, o) in refused {
            match o.build("t", vec![], Map::new(), now()) {
                Err(ClientError::InvalidArgument(e)) => assert!(e.contains(what), "{what}: {e}"),
                other => panic!("{what}: {o:?} gave {other:?}"),
            }
        }
        // The edge itself is fine, and so is a time in the past (it runs, or expires, at once).
        let ok = SendOptions::new()
            .countdown(MAX_DELAY)
            .expires(Expires::At(DateTime::<Utc>::MIN_UTC))
            .time_limits(Some(MAX_DELAY.as_secs_f64()), Some(0.0));
        assert!(ok.build("t", vec![], Map::new(), now()).is_ok());
    }

    #[test]
    fn ids_and_headers_are_applied() {
        let o = SendOptions::new()
            .task_id("fixed")
            .header("x-trace", json!("abc"));
        let m = o.build("t", vec![], Map::new(), now()).unwrap();
        assert_eq!(m.id(), "fixed");
        assert_eq!(m.headers.root_id.as_deref(), Some("fixed"));
        assert_eq!(m.encode().headers["x-trace"], json!("abc"));
    }
}
