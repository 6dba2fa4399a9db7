//! # celerity-worker
//!
//! Runs jobs: a registry of tasks and a worker process that consumes, executes and stores results
//! with Celery's semantics (acks late, retries with backoff, soft time limits, rate limits, ETA).
//!
//! Layout (one concern per module):
//! - [`task`]: what a task sees and returns: [`TaskContext`], [`TaskError`], [`TaskOptions`], [`Run`].
//! - [`args`]: maps Celery's `[args, kwargs]` onto typed arguments.
//! - [`registry`]: task name → handler and options.
//! - `executor`: one delivery from decode to ack.
//! - `canvas`: workflow steps after a job's outcome (callbacks, chain, chord join, errbacks).
//! - [`retry`]: retry-or-fail decisions and backoff (pure).
//! - [`limits`]: rate limits.
//! - [`server`]: the fetch loop and the warm/cold stop of one worker process.
//! - [`control`]: remote control on Celery's pidbox: the listener and what it shares with jobs.
//! - `commands`: the remote-control commands (inspect ping/active/stats/…, revoke, rate_limit,
//!   pool_grow/pool_shrink, shutdown, enable_events, …) with Celery's reply shapes.
//! - [`events`]: Celery events (worker heartbeats, task events) published off the job path.
//! - [`node`]: node names (`--hostname NAME@%h`, pool children).
//! - `pool`: the resizable concurrency of one worker process.
//! - [`supervisor`]: the parent of a pool of worker processes (restart, recycle, hard time limits).
//! - [`demo`]: the built-in `demo.*` tasks.
//! - [`error`]: the crate's error type, [`WorkerError`].

pub mod args;
mod canvas;
mod commands;
pub mod control;
pub mod demo;
pub mod error;
pub mod events;
mod executor;
pub mod limits;
pub mod node;
mod pool;
pub mod registry;
pub mod retry;
pub mod server;
pub mod supervisor;
pub mod task;

pub use error::WorkerError;
pub use executor::{Reporter, DEAD_LETTER_QUEUE};
pub use registry::Registry;
pub use server::{run, Shutdown, Summary, WorkerConfig};
pub use task::{Handler, Run, TaskContext, TaskError, TaskOptions};
