//! # celerity-worker
//!
//! The worker side (being built): mapping Celery's `[args, kwargs]` onto typed task arguments
//! ([`args`]). The registry, executor and process pool come next.

pub mod args;
