//! The soak's steady load on one pool: a producer sending a fixed mix of jobs at `rate` per second
//! (batched every 100 ms, catching up after a slow tick), and a checker that reads each job's result
//! once it is due, checks it against what the job must return, and deletes it (an hour of results
//! would otherwise pile up in Redis). When asked to stop it stops sending and drains: it waits for
//! every sent job's result until none is missing or nothing has finished for `drain_stall`; the
//! jobs still missing then are lost.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::{json, Map, Value};
use tokio::sync::watch;

use celerity_broker::protocol::TaskMessage;
use celerity_broker::{connect_backend, ResultBackend, State, TaskMeta};
use celerity_client::{Client, SendOptions};

use crate::error::Result;
use crate::setup::{Setup, REDIS_URL};

/// How often the producer sends a batch.
const TICK: Duration = Duration::from_millis(100);
/// How often the checker reads the due results.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// Results read per round trip.
const CHUNK: usize = 500;
/// A job without a result this long after it was due counts as late (shown as it goes; only a job
/// still missing after the drain counts as lost).
const LATE: Duration = Duration::from_secs(60);
/// Failures a `demo.flaky` job has before it succeeds (each one a retry 0.1 s later).
const FLAKY_FAILURES: u32 = 2;

/// What one job must end as.
#[derive(Debug, Clone, PartialEq)]
enum Expect {
    /// SUCCESS with this value.
    Value(Value),
    /// FAILURE raised as `ValueError(message)`.
    ValueError(String),
}

/// A job sent and not yet checked.
#[derive(Debug)]
struct Pending {
    expect: Expect,
    /// When its result may be there (send time + countdown).
    due: Instant,
    /// Whether it retries before succeeding (counted apart).
    retries: bool,
}

/// Counts of one pool's load, read by the sampler as it goes.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Jobs the broker accepted.
    pub sent: u64,
    /// Jobs whose send failed with an error (not tracked: the producer was told).
    pub send_errors: u64,
    /// Results read and right: successes (retried ones included) and the expected failures.
    pub ok: u64,
    /// Of `ok`, the `demo.fail` jobs that ended FAILURE as they must.
    pub failed: u64,
    /// Of `ok`, the `demo.flaky` jobs that succeeded after their retries.
    pub retried: u64,
    /// Results that were not what the job must return.
    pub wrong: u64,
    /// Sent jobs without a checked result.
    pub pending: u64,
    /// Of `pending`, those more than a minute past due.
    pub late: u64,
    /// Failed result reads or deletes (each is tried again on the next round).
    pub read_errors: u64,
    /// Jobs still without a result after the drain: lost.
    pub lost: u64,
    /// The first few wrong results, for the report.
    pub wrong_examples: Vec<String>,
}

/// One pool's producer and checker.
pub struct Load {
    setup: Setup,
    queue: String,
    rate: f64,
    drain_stall: Duration,
    stats: Arc<Mutex<Stats>>,
    pending: HashMap<String, Pending>,
    next: u64,
}

impl Load {
    pub fn new(setup: Setup, queue: String, rate: f64, drain_stall: Duration) -> Load {
        Load {
            setup,
            queue,
            rate,
            drain_stall,
            stats: Arc::new(Mutex::new(Stats::default())),
            pending: HashMap::new(),
            next: 0,
        }
    }

    /// The counts, shared with whoever prints them.
    pub fn stats(&self) -> Arc<Mutex<Stats>> {
        self.stats.clone()
    }

    /// Sends and checks until `stop` turns true, then drains. `hurry` (a second Ctrl-C) cuts the
    /// drain short. Returns the final counts.
    pub async fn run(
        mut self,
        mut stop: watch::Receiver<bool>,
        mut hurry: watch::Receiver<bool>,
    ) -> Result<Stats> {
        let client = Client::connect(&self.setup.celerity_broker_url(), None).await?;
        let backend_url = self.setup.backend_url().unwrap_or_else(|| REDIS_URL.into());
        let backend = connect_backend(&backend_url).await?;
        let redis = redis::Client::open(REDIS_URL)?
            .get_multiplexed_async_connection()
            .await?;
        let mut checker = Checker {
            backend,
            redis,
            meta_prefix: format!("{}celery-task-meta-", self.setup.prefix),
        };

        let start = Instant::now();
        let mut last_check = Instant::now();
        let mut ticks = tokio::time::interval(TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !*stop.borrow() {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = stop.changed() => break,
            }
            // As many as the rate asks for since the start, at most a second's worth at once.
            let target = (start.elapsed().as_secs_f64() * self.rate) as u64;
            let owed = target
                .saturating_sub(self.next)
                .min(self.rate.ceil() as u64);
            if owed > 0 {
                self.send(&client, owed).await;
            }
            if last_check.elapsed() >= CHECK_EVERY {
                last_check = Instant::now();
                self.check(&mut checker, false).await;
            }
        }

        // Drain: until nothing is missing, nothing finishes for `drain_stall`, or a second Ctrl-C.
        let mut moved = Instant::now();
        while !self.pending.is_empty() && moved.elapsed() < self.drain_stall && !*hurry.borrow() {
            tokio::select! {
                _ = tokio::time::sleep(CHECK_EVERY) => {}
                _ = hurry.changed() => break,
            }
            if self.check(&mut checker, true).await > 0 {
                moved = Instant::now();
            }
        }
        let _ = client.close().await;
        let _ = checker.backend.close().await;
        let mut stats = self.stats.lock().map_err(poisoned)?;
        stats.lost = self.pending.len() as u64;
        Ok(stats.clone())
    }

    /// Sends the next `n` jobs of the mix in one batch.
    async fn send(&mut self, client: &Client, n: u64) {
        let now = Utc::now();
        let sent_at = Instant::now();
        let mut batch: Vec<TaskMessage> = Vec::with_capacity(n as usize);
        let mut expects = Vec::with_capacity(n as usize);
        let mut errors = 0;
        for _ in 0..n {
            let i = self.next;
            self.next += 1;
            let job = job(i, &self.queue);
            match job.options.build(job.task, job.args, Map::new(), now) {
                Ok(m) => {
                    expects.push((
                        m.id().to_owned(),
                        Pending {
                            expect: job.expect,
                            due: sent_at + job.countdown,
                            retries: job.task == "demo.flaky",
                        },
                    ));
                    batch.push(m);
                }
                Err(e) => {
                    eprintln!("soak: building job {i}: {e}");
                    errors += 1;
                }
            }
        }
        let outcome = client.send_batch(&batch, &self.queue).await;
        let Ok(mut stats) = self.stats.lock() else {
            return;
        };
        stats.send_errors += errors;
        match outcome {
            Ok(()) => {
                stats.sent += batch.len() as u64;
                self.pending.extend(expects);
            }
            Err(e) => {
                stats.send_errors += batch.len() as u64;
                eprintln!("soak: sending {} jobs to {}: {e}", batch.len(), self.queue);
            }
        }
        stats.pending = self.pending.len() as u64;
    }

    /// Reads the results of the due jobs (all pending ones when `all`), checks and deletes the
    /// ready ones. Returns how many were ready.
    async fn check(&mut self, checker: &mut Checker, all: bool) -> u64 {
        let now = Instant::now();
        let due: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, p)| all || p.due <= now)
            .map(|(id, _)| id.clone())
            .collect();
        let mut ready = 0;
        let mut read_errors = 0;
        let mut outcomes = Vec::new();
        for chunk in due.chunks(CHUNK) {
            let metas = match checker.backend.get_many(chunk).await {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("soak: reading results: {e}");
                    read_errors += 1;
                    continue;
                }
            };
            let mut done = Vec::new();
            for (id, meta) in chunk.iter().zip(metas) {
                if !meta.status.is_ready() {
                    continue;
                }
                if let Some(p) = self.pending.remove(id) {
                    outcomes.push((verdict(&p.expect, &meta), p));
                    done.push(format!("{}{id}", checker.meta_prefix));
                }
            }
            ready += done.len() as u64;
            if !done.is_empty() {
                let deleted: redis::RedisResult<()> = redis::cmd("DEL")
                    .arg(&done)
                    .query_async(&mut checker.redis)
                    .await;
                if deleted.is_err() {
                    read_errors += 1;
                }
            }
        }
        let late = self
            .pending
            .values()
            .filter(|p| now.saturating_duration_since(p.due) > LATE)
            .count() as u64;
        if let Ok(mut stats) = self.stats.lock() {
            for (verdict, p) in outcomes {
                match verdict {
                    Ok(()) => {
                        stats.ok += 1;
                        if matches!(p.expect, Expect::ValueError(_)) {
                            stats.failed += 1;
                        }
                        if p.retries {
                            stats.retried += 1;
                        }
                    }
                    Err(why) => {
                        stats.wrong += 1;
                        if stats.wrong_examples.len() < 5 {
                            stats.wrong_examples.push(why);
                        }
                    }
                }
            }
            stats.read_errors += read_errors;
            stats.pending = self.pending.len() as u64;
            stats.late = late;
        }
        ready
    }
}

/// The connections the checker reads and deletes results with.
struct Checker {
    backend: Arc<dyn ResultBackend>,
    redis: redis::aio::MultiplexedConnection,
    meta_prefix: String,
}

/// One job of the mix.
struct Job {
    task: &'static str,
    args: Vec<Value>,
    options: SendOptions,
    countdown: Duration,
    expect: Expect,
}

/// Job `i` of the mix, per hundred: 70 `demo.add` with results checked, 15 `demo.sleep_ms` (5–44
/// ms), 5 `demo.fail`, 5 `demo.flaky` (two failures, then success after two retries) and 5
/// `demo.add` with a countdown of 1–5 s.
fn job(i: u64, queue: &str) -> Job {
    let options = SendOptions::new().queue(queue);
    let n = i as i64;
    let add = |options| Job {
        task: "demo.add",
        args: vec![json!(n), json!(n)],
        options,
        countdown: Duration::ZERO,
        expect: Expect::Value(json!(n.saturating_mul(2))),
    };
    match i % 100 {
        0..=69 => add(options),
        70..=84 => {
            let ms = 5 + i % 40;
            Job {
                task: "demo.sleep_ms",
                args: vec![json!(ms)],
                options,
                countdown: Duration::ZERO,
                expect: Expect::Value(json!(ms)),
            }
        }
        85..=89 => {
            let message = format!("soak job {i} fails on purpose");
            Job {
                task: "demo.fail",
                args: vec![json!(message)],
                options,
                countdown: Duration::ZERO,
                expect: Expect::ValueError(message),
            }
        }
        90..=94 => {
            let key = format!("soak-{i}");
            Job {
                task: "demo.flaky",
                args: vec![json!(key), json!(FLAKY_FAILURES)],
                options,
                countdown: Duration::ZERO,
                expect: Expect::Value(json!({"key": key, "runs": FLAKY_FAILURES + 1})),
            }
        }
        _ => {
            let countdown = Duration::from_secs(1 + i % 5);
            let mut job = add(options.countdown(countdown));
            job.countdown = countdown;
            job
        }
    }
}

/// Whether a ready result is what the job must return; if not, why.
fn verdict(expect: &Expect, meta: &TaskMeta) -> std::result::Result<(), String> {
    let right = match expect {
        Expect::Value(v) => meta.status == State::Success && meta.result == *v,
        Expect::ValueError(message) => {
            meta.status == State::Failure
                && meta.result.get("exc_type") == Some(&json!("ValueError"))
                && meta.result.get("exc_message") == Some(&json!([message]))
        }
    };
    if right {
        Ok(())
    } else {
        Err(format!(
            "{}: {} {} (expected {expect:?})",
            meta.task_id, meta.status, meta.result
        ))
    }
}

fn poisoned<T>(_: std::sync::PoisonError<T>) -> crate::error::BenchError {
    crate::error::BenchError::Setup("the soak's counters were poisoned by a panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mix_has_every_kind_in_its_share() {
        let jobs: Vec<Job> = (0..100).map(|i| job(i, "q")).collect();
        let count = |t: &str| jobs.iter().filter(|j| j.task == t).count();
        assert_eq!(count("demo.add"), 75);
        assert_eq!(count("demo.sleep_ms"), 15);
        assert_eq!(count("demo.fail"), 5);
        assert_eq!(count("demo.flaky"), 5);
        assert_eq!(
            jobs.iter().filter(|j| j.countdown > Duration::ZERO).count(),
            5
        );
    }

    #[test]
    fn a_result_is_right_only_with_its_state_and_value() {
        let mut meta = TaskMeta::success("id", json!(4));
        assert!(verdict(&Expect::Value(json!(4)), &meta).is_ok());
        assert!(verdict(&Expect::Value(json!(5)), &meta).is_err());
        meta.status = State::Failure;
        meta.result =
            json!({"exc_type": "ValueError", "exc_message": ["boom"], "exc_module": "builtins"});
        assert!(verdict(&Expect::ValueError("boom".into()), &meta).is_ok());
        assert!(verdict(&Expect::ValueError("other".into()), &meta).is_err());
        assert!(verdict(&Expect::Value(json!(4)), &meta).is_err());
    }
}
