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
//! - [`url`]: picks a transport or backend from a URL.
//! - [`wait_lock`]: lets the processes of one worker pool take turns at waiting for work.
//! - [`error`]: [`BrokerError`], the one error type of this crate.

pub mod backend;
pub mod backoff;
pub mod connect;
pub mod error;
pub mod lease;
pub mod memory;
pub mod message;
pub mod protocol;
pub mod pyjson;
pub mod topic;
pub mod transport;
pub mod url;
pub mod wait_lock;

#[cfg(feature = "amqp")]
pub mod amqp;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "testkit")]
pub mod testkit;

pub use backend::{ResultBackend, State, TaskMeta};
pub use connect::{connect_backend, connect_broker};
pub use error::{BrokerError, Result};
pub use message::{Message, Properties};
pub use transport::{AckHandle, Broker, Consumer, Delivery};
pub use url::BrokerUrl;
pub use wait_lock::WaitLock;
