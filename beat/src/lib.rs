//! Celerity beat: sends periodic jobs (cron and interval entries from a TOML schedule file) as
//! ordinary Celery task messages, with exactly one active beat per broker (a fenced Redis lease) and
//! persisted last-run times so restarts neither repeat nor silently drop a tick.

pub mod cli;
pub mod entry;
pub mod error;
pub mod lock;
pub mod schedule;
pub mod state;
pub mod ticker;

pub use cli::{check, run_beat, BeatArgs};
pub use error::BeatError;
pub use schedule::{CatchUp, Entry, When};
