//! Celerity beat: sends periodic jobs (cron and interval entries from a TOML schedule file) as
//! ordinary Celery task messages, with exactly one active beat per broker (a fenced Redis lease, or a
//! single-active-consumer queue on RabbitMQ) and persisted last-run times (a Redis hash, or a local
//! state file) so restarts neither repeat nor silently drop a tick. The schedule reloads on SIGHUP
//! and when its file changes.

mod amqp_lock;
pub mod cli;
pub mod entry;
pub mod error;
pub mod lock;
mod redis_state;
mod reload;
pub mod schedule;
pub mod state;
mod state_file;
pub mod ticker;

pub use cli::{check, run_beat, BeatArgs};
pub use error::BeatError;
pub use schedule::{CatchUp, Entry, When};
