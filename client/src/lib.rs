//! # celerity-client
//!
//! The producer side of Celerity: sending jobs and reading their results.
//!
//! - [`Client`] (`client`): connects to a broker (and optionally a result backend) and sends task
//!   messages by name ([`Client::send_task`]) or typed ([`Client::send`]), singly or in batches.
//! - [`SendOptions`] (`options`): queue, countdown/ETA, expires, priority, task id, headers, …
//! - [`Task`] (`task`): a typed task declaration (name, argument type, output type) shared with the
//!   worker.
//! - [`AsyncResult`] ([`result`]): a handle on one job's result: state, wait with a timeout, forget;
//!   [`result::outcome`] reads a stored result as a value or the task's failure.
//! - [`canvas`]: workflows — [`Signature`], [`chain`], [`Group`], [`chord`], `link`/`link_error` —
//!   built in Rust and sent by the [`Client`]; [`GroupResult`] (`group_result`) reads a group's
//!   results.
//! - [`canvas_plan`]: how nested workflows (groups of chains, chains with group/chord steps, chords
//!   with chain bodies) are applied, as Celery applies them; shared with the worker.
//! - [`canvas_encode`]: the leaf both of those use: one signature → the task message Celery would
//!   send ([`canvas::signature_message`], [`canvas::Call`], re-exported from `canvas`), and id
//!   freezing. `canvas` uses `canvas_plan`, both use `canvas_encode`, never the other way round.
//! - [`control`]: remote control (Celery's `app.control`): [`Client::control_call`] collects each
//!   node's reply, [`Client::control_cast`] sends without waiting.
//! - [`ClientError`] (`error`): the one error type of this crate.
//!
//! The `celerity` command's producer verbs (`call`, `result`, `inspect`, …) live in the `celerity`
//! crate, on top of this API.

pub mod canvas;
pub mod canvas_encode;
pub mod canvas_plan;
mod client;
pub mod control;
mod error;
mod group_result;
mod options;
pub mod result;
mod task;

pub use canvas::{
    chain, chord, partial, sig, Chain, Chord, ChordResult, Group, Signature, WorkflowResult,
};
pub use client::{default_backend_url, Client};
pub use error::{ClientError, MemberFailure};
pub use group_result::GroupResult;
pub use options::{Expires, SendOptions, MAX_DELAY};
pub use result::AsyncResult;
pub use task::{Task, TaskArgs};

/// The queue Celery and Celerity use when none is given.
pub const DEFAULT_QUEUE: &str = "celery";
