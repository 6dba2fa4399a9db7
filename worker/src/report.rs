//! The wire between a supervised worker process and its supervisor: a child writes one JSON line
//! ([`JobEvent`]) to its stdout when a job with a hard time limit starts and when it ends, so the
//! supervisor can kill the process if the job overruns (a job that never yields cannot be stopped
//! any other way); with metrics on, its metrics every second; and why it stops when it recycles
//! itself. Nothing else in a child writes to stdout.

/// What a supervised child tells its supervisor about jobs with a hard time limit.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum JobEvent {
    /// A job from `queue` started and must be done within `hard` seconds.
    Started {
        id: String,
        task: String,
        #[serde(default)]
        queue: String,
        hard: f64,
        /// Where the job's sender waits for its result (`rpc://`), so the supervisor can send it
        /// the time-limit failure.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reply: Option<celerity_broker::backend::ReplyTo>,
    },
    /// That job is over (whatever the outcome).
    Finished { id: String },
    /// The child's metrics now (sent every second with `--metrics-addr`).
    Metrics { snapshot: crate::metrics::Snapshot },
    /// The child is about to stop by itself to be replaced: `max_tasks` or `max_memory`.
    Recycling { cause: String },
}

/// Writes [`JobEvent`]s to this process's stdout, one JSON line each, for the supervisor.
///
/// The write is synchronous on purpose: it must reach the supervisor before the job starts, even
/// when the job then blocks the thread it runs on (the case hard time limits exist for).
#[derive(Debug, Clone, Copy, Default)]
pub struct Reporter;

impl Reporter {
    /// Sends one event; a closed stdout is logged, not fatal.
    pub fn send(&self, event: &JobEvent) {
        use std::io::Write;
        let Ok(mut line) = serde_json::to_vec(event) else {
            return;
        };
        line.push(b'\n');
        let mut out = std::io::stdout().lock();
        if out.write_all(&line).and_then(|()| out.flush()).is_err() {
            tracing::warn!("cannot report to the supervisor (stdout closed)");
        }
    }

    /// Reports that job `id` of `task` started with `hard` seconds to run; the returned guard
    /// reports its end when dropped, whatever way the job ends.
    pub(crate) fn started(
        self,
        id: &str,
        task: &str,
        queue: &str,
        hard: f64,
        reply: Option<celerity_broker::backend::ReplyTo>,
    ) -> FinishReport {
        self.send(&JobEvent::Started {
            id: id.to_owned(),
            task: task.to_owned(),
            queue: queue.to_owned(),
            hard,
            reply,
        });
        FinishReport(self, id.to_owned())
    }
}

/// Reports a job's end to the supervisor when dropped.
pub(crate) struct FinishReport(Reporter, String);

impl Drop for FinishReport {
    fn drop(&mut self) {
        self.0.send(&JobEvent::Finished {
            id: std::mem::take(&mut self.1),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_one_json_object_each() {
        let e = JobEvent::Started {
            id: "a".into(),
            task: "t".into(),
            queue: "q".into(),
            hard: 1.5,
            reply: None,
        };
        let line = serde_json::to_string(&e).unwrap_or_default();
        assert_eq!(
            line,
            r#"{"event":"started","id":"a","task":"t","queue":"q","hard":1.5}"#
        );
        assert_eq!(serde_json::from_str::<JobEvent>(&line).ok(), Some(e));
    }
}
