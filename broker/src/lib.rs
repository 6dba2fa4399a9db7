//! # celerity-broker
//!
//! Everything that touches the wire: Celery's task message protocol v2, the broker transports and the
//! result backends. It knows nothing of the client, the worker or beat.
//!
//! Layout:
//! - [`message`]: a transport-neutral message (properties, headers, body bytes) and its routing.
//! - [`protocol`]: Celery protocol v2 task messages — typed headers, the `[args, kwargs, embed]` body,
//!   signatures — with a decoder that never panics and an encoder that writes what Celery writes.
//! - [`pyjson`]: JSON written the way Python's `json.dumps` writes it, so our bytes match Celery's.
//! - [`transport`]: the [`Broker`] seam (publish, consume with a prefetch window, ack/reject, purge, length).
//! - [`memory`], `redis`, `amqp`: the three transports (`memory://`, `redis://`, `amqp://`).
//! - [`backend`]: the [`ResultBackend`] seam, task states and Celery's result meta document, with
//!   memory and Redis backends.
//! - [`limits`]: the URL's `max_message_size` and `max_dead_letters`, which every transport applies.
//! - [`url`]: parses and classifies broker/backend URLs ([`BrokerUrl`], query options); a leaf.
//! - [`tls`]: a `rediss://`/`amqps://` URL's TLS options (CA file, client certificate, verification),
//!   spelled as redis-py and kombu spell them; read from the URL, under the transports.
//! - [`connect`]: the URL → transport/backend factory ([`connect_broker`], [`connect_backend`]);
//!   only the crate root imports it, so no transport imports the factory back.
//! - [`backoff`]: the one reconnect pacing ([`backoff::Backoff`], [`backoff::delay`]: exponential,
//!   capped, with equal jitter) every transport's and backend's reconnect loop uses.
//! - [`topic`]: the one AMQP topic matcher (memory broadcasts, the Redis restore's bindings).
//! - [`lease`]: leader leases on the broker (a fenced Redis lease with its last-run hash, a RabbitMQ
//!   single-active-consumer lock queue), used by beat.
//! - [`wait_lock`]: lets the processes of one worker pool take turns at waiting for work.
//! - [`error`]: [`BrokerError`], the one error type of this crate.
//! - `fuzzing` (feature `fuzzing`, hidden): the entry points of the fuzz targets under `fuzz/`.
//!
//! Imports go one way: leaves (`error`, `pyjson`, `url`, `limits`, `tls`, `topic`, `backoff`, `wait_lock`,
//! `message`, `protocol`) under `transport` and `backend`, under the transports, under `connect`.

pub mod backend;
pub mod backoff;
pub mod connect;
pub mod error;
pub mod lease;
pub mod limits;
pub mod memory;
pub mod message;
pub mod protocol;
pub mod pyjson;
pub mod tls;
pub mod topic;
pub mod transport;
pub mod url;
pub mod wait_lock;

#[cfg(feature = "amqp")]
pub mod amqp;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "testkit")]
pub mod testkit;

pub use backend::{ResultBackend, State, TaskMeta};
pub use connect::{connect_backend, connect_backend_for, connect_broker};
pub use error::{BrokerError, Result};
pub use limits::Limits;
pub use message::{Message, Properties};
pub use transport::{AckHandle, Broker, Consumer, Delivery};
pub use url::BrokerUrl;
pub use wait_lock::WaitLock;
