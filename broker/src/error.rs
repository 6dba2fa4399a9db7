//! The error type of the broker crate.
//!
//! Variants are grouped by what a caller can do about them: fix the configuration (`InvalidUrl`,
//! `UnsupportedScheme`), wait and retry (`Connect`, `ConnectionLost`, `Timeout`), or drop/dead-letter the
//! message that caused it (`Malformed`, `ContentType`). Decoding errors always name what is wrong.

use std::time::Duration;

/// Result alias used throughout the crate.
pub type Result<T, E = BrokerError> = std::result::Result<T, E>;

/// Everything that can go wrong talking to a broker or backend, or decoding what came from one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// The URL could not be parsed or has a bad option.
    #[error("invalid URL `{url}`: {reason}")]
    InvalidUrl { url: String, reason: String },
    /// The URL's scheme names no transport we have.
    #[error("unsupported URL scheme `{0}`: expected memory://, redis://, rediss://, sentinel://, amqp:// or amqps://")]
    UnsupportedScheme(String),
    /// The transport was compiled out of this build.
    #[error("the `{0}` transport is not compiled into this build (enable the crate feature)")]
    NotCompiled(&'static str),
    /// The first connection could not be made.
    #[error("cannot connect to {url}: {reason}")]
    Connect { url: String, reason: String },
    /// A connection that was up went away; the operation may be retried.
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    /// An operation did not finish in time.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The broker or consumer was closed.
    #[error("closed")]
    Closed,
    /// A message or document is not what the protocol says it must be.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A message uses a serializer we refuse (pickle, yaml, msgpack) or do not know.
    #[error(
        "refused content type `{0}`: only application/json is accepted (pickle is never executed)"
    )]
    ContentType(String),
    /// The broker could not route a published message to its queue (AMQP `basic.return`: no such
    /// queue, e.g. it was deleted): nothing was stored. Publishing again declares the queue anew.
    #[error("the broker returned a message for queue `{queue}` unrouted ({reason}): the queue does not exist (deleted?), nothing was stored")]
    Unroutable { queue: String, reason: String },
    /// The broker nacked a confirmed publish: it could not store the message (a quorum queue that
    /// lost its leader refuses until a new one is elected). Nothing is known to be stored; the
    /// AMQP publisher retries it once on a fresh channel, and publishing again may work.
    #[error("the broker nacked the publish to `{queue}` (it could not store the message)")]
    Nacked { queue: String },
    /// A message body over the broker URL's `max_message_size`: nothing was sent.
    #[error("refused to publish to `{queue}`: the message body is {size} bytes, over the limit of {limit} bytes (max_message_size)")]
    TooLarge {
        queue: String,
        size: usize,
        limit: usize,
    },
    /// The result backend cannot do this (e.g. `rpc://` and chords, as in Celery).
    #[error("the {backend} result backend {what}")]
    Unsupported { backend: &'static str, what: String },
    /// More results for task ids nobody waits on arrived on an `rpc://` reply queue than it keeps
    /// (Celery's `BacklogLimitExceeded`): this task's result was among the oldest, dropped.
    #[error("the result of task {task_id} was dropped: more than {limit} results for tasks this client is not waiting on arrived on its reply queue (BacklogLimitExceeded; raise `backlog_limit` in the rpc:// URL or read results sooner)")]
    BacklogLimitExceeded { task_id: String, limit: usize },
    /// The broker answered with an error.
    #[error("{transport} error: {message}")]
    Transport {
        transport: &'static str,
        message: String,
    },
}

impl BrokerError {
    /// Builds a [`BrokerError::Malformed`] from anything printable.
    pub fn malformed(what: impl std::fmt::Display) -> Self {
        BrokerError::Malformed(what.to_string())
    }

    /// True when the error is about the connection (worth reconnecting and retrying).
    pub fn is_connection(&self) -> bool {
        matches!(
            self,
            BrokerError::Connect { .. } | BrokerError::ConnectionLost(_) | BrokerError::Timeout(_)
        )
    }
}

#[cfg(feature = "redis")]
impl From<::redis::RedisError> for BrokerError {
    fn from(e: ::redis::RedisError) -> Self {
        if e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_timeout()
        {
            BrokerError::ConnectionLost(format!("redis: {e}"))
        } else {
            BrokerError::Transport {
                transport: "redis",
                message: e.to_string(),
            }
        }
    }
}

#[cfg(feature = "amqp")]
impl From<::lapin::Error> for BrokerError {
    fn from(e: ::lapin::Error) -> Self {
        BrokerError::Transport {
            transport: "amqp",
            message: e.to_string(),
        }
    }
}
