//! The benchmark's error type.

/// Whatever stops a benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("amqp: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("broker: {0}")]
    Broker(#[from] celerity_broker::BrokerError),
    #[error("client: {0}")]
    Client(#[from] celerity_client::ClientError),
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{0}")]
    Setup(String),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("wrong result: {0}")]
    Check(String),
}

/// The benchmark's result type.
pub type Result<T> = std::result::Result<T, BenchError>;
