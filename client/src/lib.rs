//! # celerity-client
//!
//! The producer side of Celerity: sending jobs and reading their results.
//!
//! - [`Client`] ([`client`]): connects to a broker (and optionally a result backend) and sends task
//!   messages by name ([`Client::send_task`]) or typed ([`Client::send`]), singly or in batches.
//! - [`SendOptions`] ([`options`]): queue, countdown/ETA, expires, priority, task id, headers, …
//! - [`Task`] ([`task`]): a typed task declaration (name, argument type, output type) shared with the
//!   worker.
//! - [`AsyncResult`] ([`result`]): a handle on one job's result: state, wait with a timeout, forget.
//! - [`cli`]: the producer-side verbs of the `celerity` command (`call`, `result`, `purge`, `queues`).
//! - [`ClientError`] ([`error`]): the one error type of this crate.

pub mod cli;
pub mod client;
pub mod error;
pub mod options;
pub mod result;
pub mod task;

pub use client::{default_backend_url, Client};
pub use error::ClientError;
pub use options::{Expires, SendOptions};
pub use result::AsyncResult;
pub use task::{Task, TaskArgs};

/// The queue Celery and Celerity use when none is given.
pub const DEFAULT_QUEUE: &str = "celery";
