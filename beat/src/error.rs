//! `BeatError`: everything that can stop beat, each printable as one line.

use celerity_broker::BrokerError;
use celerity_client::ClientError;

/// The crate's one error type.
#[derive(Debug, thiserror::Error)]
pub enum BeatError {
    /// The schedule file is unreadable or wrong; the text names the entry and the problem.
    #[error("schedule: {0}")]
    Schedule(String),
    /// The broker URL cannot carry beat's lock and state.
    #[error("{0}")]
    Unsupported(String),
    /// The local state file (AMQP brokers) cannot be read or written.
    #[error("state: {0}")]
    State(String),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// Shorthand for this crate's results.
pub(crate) type Result<T, E = BeatError> = std::result::Result<T, E>;
