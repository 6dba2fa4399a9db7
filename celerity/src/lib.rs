//! # celerity
//!
//! A fast distributed task queue, wire-compatible with Python's Celery. This facade is the one
//! dependency an application adds; it re-exports the parts:
//!
//! - [`broker`]: Celery protocol v2 messages, the `memory://`, `redis://` and `amqp://` transports, and
//!   the result backends.
//! - [`client`]: the producer API ([`Client`], [`SendOptions`], [`AsyncResult`], typed [`Task`]s).
//!
//! ```no_run
//! use celerity::prelude::*;
//!
//! # async fn demo() -> Result<(), ClientError> {
//! let client = Client::connect("redis://127.0.0.1:6379/0", None).await?;
//! let handle = client.send_task("demo.add", vec![2.into(), 3.into()], Default::default(), &SendOptions::new()).await?;
//! let sum: i64 = handle.typed::<i64>().get(Some(std::time::Duration::from_secs(10))).await?;
//! # let _ = sum; Ok(()) }
//! ```

pub use celerity_broker as broker;
pub use celerity_client as client;

pub use celerity_client::{AsyncResult, Client, ClientError, Expires, SendOptions, Task};

/// The names most applications need.
pub mod prelude {
    pub use celerity_broker::{State, TaskMeta};
    pub use celerity_client::{
        AsyncResult, Client, ClientError, Expires, SendOptions, Task, TaskArgs,
    };
}
