//! The fetcher: the loop that takes deliveries from the broker and hands each to the processor in
//! a task of its own, until told to stop. It consumes under a prefetch window equal to the
//! concurrency, so prefetch follows free slots (a long job never holds short ones that other slots
//! could run); the window widens while jobs wait for their ETA and follows the pool's size when
//! remote control grows or shrinks it. It also recycles the process: it stops by itself after
//! `max_tasks` deliveries or once resident memory is above `max_memory_kib`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use celerity_broker::backoff::Backoff;
use celerity_broker::{Consumer, Delivery};

use crate::metrics::inc;
use crate::pool::Pool;
use crate::processor::Processor;
use crate::report::JobEvent;

/// What the fetch loop needs.
pub(crate) struct Fetcher {
    pub consumer: Box<dyn Consumer>,
    pub processor: Arc<Processor>,
    /// Where each delivery's task is spawned (the server waits on it to drain).
    pub tracker: TaskTracker,
    /// Widen (+n) / narrow (−n) requests for the prefetch window.
    pub window_rx: mpsc::UnboundedReceiver<isize>,
    pub pool: Arc<Pool>,
    /// The prefetch window at start (the concurrency).
    pub window: usize,
    /// Stop after taking this many jobs.
    pub max_tasks: Option<u64>,
    /// Stop once resident memory is above this many KiB.
    pub max_memory_kib: Option<u64>,
}

impl Fetcher {
    /// Fetches until `stop` fires, the process is due for recycling or the consumer ends; returns
    /// the consumer, to be closed once running jobs are done.
    pub async fn run(mut self, stop: CancellationToken) -> Box<dyn Consumer> {
        let mut window = isize::try_from(self.window).unwrap_or(isize::MAX);
        // A failing broker is asked again after a growing, jittered pause (0.1–6.4 s).
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_millis(6400));
        let mut taken = 0u64;
        let mut memory_check = tokio::time::interval(Duration::from_secs(1));
        memory_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.max_tasks.is_some_and(|max| taken >= max) {
                tracing::info!(taken, "max tasks per process reached; recycling");
                self.recycling("max_tasks");
                break;
            }
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                _ = memory_check.tick(), if self.max_memory_kib.is_some() => {
                    if self.over_memory() {
                        self.recycling("max_memory");
                        break;
                    }
                }
                Some(delta) = self.window_rx.recv() => {
                    window = self.resize(window, delta).await;
                }
                next = self.consumer.next() => match next {
                    Ok(Some(delivery)) => {
                        backoff.reset();
                        taken += 1;
                        self.dispatch(delivery);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        if let Some(m) = &self.processor.metrics {
                            inc(&m.fetch_errors);
                        }
                        let pause = backoff.next();
                        tracing::warn!(error = %e, retry_in_ms = pause.as_millis() as u64, "fetching failed");
                        tokio::select! {
                            _ = tokio::time::sleep(pause) => {}
                            _ = stop.cancelled() => break,
                        }
                    }
                }
            }
        }
        self.consumer
    }

    /// In a pool child: tells the supervisor why this process stops by itself.
    fn recycling(&self, cause: &str) {
        if let Some(r) = &self.processor.reporter {
            r.send(&JobEvent::Recycling {
                cause: cause.to_owned(),
            });
        }
    }

    /// Hands one delivery to the processor in its own task.
    fn dispatch(&self, delivery: Delivery) {
        let processor = self.processor.clone();
        self.tracker
            .spawn(async move { processor.handle(delivery).await });
    }

    /// Moves the prefetch window by `delta`, never below the pool's size.
    async fn resize(&mut self, window: isize, delta: isize) -> isize {
        let floor = isize::try_from(self.pool.size()).unwrap_or(isize::MAX);
        let window = window.saturating_add(delta).max(floor);
        let size = usize::try_from(window).unwrap_or(1);
        if let Err(e) = self.consumer.set_prefetch(size).await {
            tracing::warn!(error = %e, "could not change the prefetch window");
        }
        window
    }

    /// True once resident memory is above the limit (time to recycle).
    fn over_memory(&self) -> bool {
        let (Some(max), Some(rss)) = (self.max_memory_kib, resident_kib()) else {
            return false;
        };
        if rss > max {
            tracing::warn!(
                rss_kib = rss,
                max_kib = max,
                "memory above the limit per process; recycling"
            );
        }
        rss > max
    }
}

/// Resident memory of this process in KiB (Linux `/proc/self/statm`), if it can be read.
fn resident_kib() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    pages.checked_mul(4)
}
