//! Celerity beat: sends periodic jobs (cron and interval entries from a TOML schedule file) as
//! ordinary Celery task messages, with exactly one active beat per broker (a fenced Redis lease, or a
//! single-active-consumer queue on RabbitMQ) and persisted last-run times (a Redis hash, or a local
//! state file) so restarts neither repeat nor silently drop a tick. The schedule reloads on SIGHUP
//! and when its file changes.
//!
//! Layout:
//! - [`schedule`]: the TOML schedule file → [`Entry`]s (cron or interval, time zone, catch-up); pure.
//! - [`entry`]: when an entry is next due, from its last run and the clock; pure.
//! - [`state`]: beat's lock and last-run state by broker ([`state::Store`]): the wire-level
//!   lease and last-run record are `celerity_broker::lease` (a fenced Redis lease + hash, or a
//!   RabbitMQ single-active-consumer queue); the local state file for AMQP brokers is `state_file`.
//! - [`ticker`]: leads while it holds the lease, sleeps until the next due entry, claims each tick
//!   (fenced) and sends it through the client.
//! - `reload`: reloads the schedule on SIGHUP and when its file changes.
//! - [`cli`]: `celerity beat` (arguments, `--check`, wiring).
//! - [`error`]: [`BeatError`], the one error type of this crate.

pub mod cli;
pub mod entry;
pub mod error;
mod reload;
pub mod schedule;
pub mod state;
mod state_file;
pub mod ticker;

pub use cli::{check, run_beat, BeatArgs};
pub use error::BeatError;
pub use schedule::{CatchUp, Entry, When};
