//! Celery's task message protocol v2 (JSON serializer).
//!
//! A task message is headers (`task`, `id`, `eta`, `retries`, …), properties (`correlation_id`,
//! `reply_to`, `priority`, …) and a body `[args, kwargs, embed]`. [`TaskMessage`] is the typed form;
//! [`TaskMessage::decode`] reads any [`Message`](crate::Message) and returns a typed error naming
//! what is wrong, and [`TaskMessage::encode`] writes what Celery 5.x writes.

pub mod clock;
pub mod control;
pub mod event;
mod fields;
pub mod node;
pub mod repr;
pub mod signature;
pub mod task;
pub mod time;

pub use signature::Signature;
pub use task::{Embed, TaskHeaders, TaskMessage};
