//! Celerity beat: sends periodic jobs (cron and interval entries from a TOML schedule file) as
//! ordinary Celery task messages, with exactly one active beat per broker (a fenced Redis lease, or a
//! single-active-consumer queue on RabbitMQ) and persisted last-run times (a Redis hash, or a local
//! state file) so restarts neither repeat nor silently drop a tick. The schedule reloads when its
//! file changes and on request (the `celerity` binary requests it on SIGHUP; this crate listens for
//! no signals).
//!
//! Layout:
//! - `service`: [`run`] and [`BeatConfig`]: one beat from start to stop.
//! - `schedule`: the schedule file parsed into checked [`Entry`] values; `entry`: their fire times
//!   (pure, DST-correct).
//! - `ticker`: the beat loop (stand by, lead, send due ticks); `reload`: keeps the schedule current.
//! - [`state`]: the leader lock and last-run state per broker ([`state::Store`]): the wire-level
//!   lease and last-run record are `celerity_broker::lease` (a fenced Redis lease + hash, or a
//!   RabbitMQ single-active-consumer queue); the local state file for AMQP brokers is `state_file`.
//! - `observe`: [`BeatObserver`], what beat tells a watcher (leading, ticks sent, lease events).
//! - `describe`: [`check`], the text `celerity beat --check` prints.
//! - [`BeatError`]: the crate's error type.
//!
//! The `celerity beat` command (flags, signals) lives in the `celerity` crate.

mod describe;
mod entry;
mod error;
mod observe;
mod reload;
mod schedule;
mod service;
pub mod state;
mod state_file;
mod ticker;

pub use describe::check;
pub use error::BeatError;
pub use observe::BeatObserver;
pub use schedule::{CatchUp, Entry, When};
pub use service::{run, BeatConfig, DEFAULT_LEASE};
