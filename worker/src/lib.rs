//! # celerity-worker
//!
//! Runs jobs: a registry of tasks and a worker process that consumes, executes and stores results
//! with Celery's semantics (acks late, retries with backoff, soft time limits, rate limits, ETA).
//!
//! Layout — where a message goes, in order:
//! - `fetcher`: takes deliveries from the broker within the prefetch window; one task each.
//! - `processor/`: one delivery from decode to settle — `admit` (decode, dead-letter, skip
//!   finished/revoked/expired/unknown, ETA, rate limit, slot), `invoke` (the handler under its time
//!   limits), `finish` (success or failure, retry, store, ack).
//! - `results`: the result backend writes (one store-with-retry) and Celery's result documents.
//! - `canvas`: workflow steps after a job's outcome (callbacks, chain, chord join, errbacks).
//!
//! Around it, each a component with a start and a stop, wired by `server`:
//! - `jobs`: the one owner of in-flight state (held jobs and their phase, revoked ids, counters).
//! - `heartbeat`: publishes worker events (online/heartbeat/offline) and the queued task events.
//! - `control` + `commands`: remote control on Celery's pidbox (the listener; the commands with
//!   Celery's reply shapes).
//! - [`metrics`]: Prometheus metrics (celery-exporter's names) and `/healthz` `/readyz`, for a
//!   process or, added up in the supervisor, for a pool.
//! - [`supervisor`]: the parent of a pool of worker processes (restart, recycle, hard time limits),
//!   and `report`, the line protocol its children use to tell it about jobs with a hard time limit.
//!
//! Pieces they share: [`task`] (what a task sees and returns), `args` (Celery's `[args, kwargs]`
//! onto typed arguments), [`registry`], `retry` (pure retry decisions), [`limits`] (rate limits),
//! `pool` (the resizable concurrency), `events` (building task events), [`node`] (node names),
//! `config` ([`WorkerConfig`]), `shutdown` ([`Shutdown`]), [`demo`] (the built-in `demo.*` tasks), [`error`].

mod args;
mod canvas;
mod commands;
mod config;
mod control;
pub mod demo;
pub mod error;
pub mod events;
mod fetcher;
mod heartbeat;
mod janitor;
mod jobs;
pub mod limits;
pub mod metrics;
pub mod node;
mod pool;
mod processor;
pub mod registry;
mod report;
mod results;
mod retry;
mod server;
mod shutdown;
pub mod supervisor;
pub mod task;

pub use config::WorkerConfig;
pub use error::WorkerError;
pub use events::EventsConfig;
pub use jobs::Summary;
pub use limits::RateLimit;
pub use processor::DEAD_LETTER_QUEUE;
pub use registry::Registry;
pub use report::{JobEvent, Reporter};
pub use server::run;
pub use shutdown::Shutdown;
pub use task::{Handler, Run, TaskContext, TaskError, TaskOptions};
