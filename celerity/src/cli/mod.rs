//! The `celerity` command line: each verb's flags (clap) and the code that runs it, on top of the
//! library crates' plain Rust APIs. The binary (`src/main.rs`) parses [`ConnectionArgs`] and one
//! verb, then calls in here; [`crate::worker_main`] reuses the worker verb for an application's own
//! worker program.
//!
//! - [`connection`]: `--broker` / `--backend`, shared by every verb; [`logs`]: `--log-format`, `-l`.
//! - [`producer`]: `call`, `result`, `purge`, `queues`, `revoke`; [`workflow`]: `call --workflow`.
//! - [`control`]: `inspect …` and `control …` (remote control of running workers).
//! - [`worker`]: `worker` (and `-B`, an embedded beat); [`demo`]: `demo`.
//! - [`beat`]: `beat` and `beat --check`; [`beat_metrics`]: its `--metrics-addr`.
//! - [`config`]: `--config FILE` (options from a TOML file) and `config check`.

pub mod beat;
pub mod beat_metrics;
pub mod config;
pub mod connection;
pub mod control;
pub mod demo;
pub mod logs;
pub mod producer;
pub mod worker;
pub mod workflow;

pub use connection::ConnectionArgs;
pub use logs::LogArgs;
