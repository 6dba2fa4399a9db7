//! The error type of the worker crate.

use celerity_broker::BrokerError;

/// What can stop a worker from starting or running.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Client(#[from] celerity_client::ClientError),
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A cold shutdown came while a job waited for its result backend; the job is given back.
    #[error("interrupted by shutdown")]
    Interrupted,
}

/// Result alias of this crate.
pub type Result<T, E = WorkerError> = std::result::Result<T, E>;
