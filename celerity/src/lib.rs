//! # celerity
//!
//! A fast distributed task queue, wire-compatible with Python's Celery. This facade is the one
//! dependency an application adds; it re-exports the parts:
//!
//! - [`broker`]: Celery protocol v2 messages, the `memory://`, `redis://` and `amqp://` transports, and
//!   the result backends.
//! - [`client`]: the producer API ([`Client`], [`SendOptions`], [`AsyncResult`], typed [`Task`]s).
//! - [`worker`]: the task registry and the worker; [`worker_main`] turns a registry into a worker
//!   program with the same flags as `celerity worker`.
//! - [`cli`]: the `celerity` command's flags and verbs (the only code here that uses clap and
//!   indicatif); `signals`: the one place the processes listen for signals.
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
pub use celerity_worker as worker;

pub mod cli;
pub mod logging;
mod signals;

use std::process::ExitCode;

pub use celerity_client::{AsyncResult, Client, ClientError, Expires, SendOptions, Task};

/// The names most applications need.
pub mod prelude {
    pub use celerity_broker::{State, TaskMeta};
    pub use celerity_client::{
        AsyncResult, Client, ClientError, Expires, SendOptions, Task, TaskArgs,
    };
    pub use celerity_worker::{Registry, Run, TaskContext, TaskError, TaskOptions};
}

/// The command line of an application's own worker: the same flags as `celerity worker`.
#[derive(Debug, clap::Parser)]
#[command(about = "A Celerity worker")]
struct WorkerCli {
    #[command(flatten)]
    conn: cli::ConnectionArgs,
    #[command(flatten)]
    file: cli::config::ConfigFileArg,
    #[command(flatten)]
    log: cli::LogArgs,
    #[command(flatten)]
    worker: cli::worker::WorkerArgs,
}

/// Runs a worker over `registry`, configured from the command line, the environment and the
/// `--config` file exactly like `celerity worker` (`--broker`, `-Q`, `-c`, `-P`, `-l`, …). Logs go
/// to stderr (level: `-l`, else `CELERITY_LOG`, else the file's, else `info`). Returns the process
/// exit code.
pub fn worker_main(registry: celerity_worker::Registry) -> ExitCode {
    use clap::{CommandFactory, FromArgMatches};
    reserve_thread_stacks();
    let matches = WorkerCli::command().get_matches();
    let mut args = match WorkerCli::from_arg_matches(&matches) {
        Ok(args) => args,
        Err(e) => e.exit(),
    };
    let config = match &args.file.config {
        Some(path) => match cli::config::Config::load(path) {
            Ok(config) => config,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        },
        None => cli::config::Config::default(),
    };
    logging::init(
        &config.log_settings(args.log.log_format, args.log.loglevel),
        "info",
    );
    config.apply_connection(&matches, &mut args.conn);
    config.apply_worker(&matches, &mut args.worker);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(cli::worker::run_worker(registry, &args.worker, &args.conn)) {
        Ok(summary) => cli::worker::exit_code(summary.as_ref()),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// The stack a thread gets when its spawner names no size (`RUST_MIN_STACK`), unless the
/// environment sets one: 256 MiB of address space, touched only as deep as a thread recurses.
const THREAD_STACK: &str = "268435456";

/// Gives threads spawned without a stack size — lapin's I/O thread among them, whose recursive
/// frame parser reads AMQP header tables — room for the deepest table a 128 KiB frame can hold
/// (about 18,000 levels), instead of the default 2 MiB that ~500 levels overflow, aborting the
/// worker. Call first thing in `main`, before any thread is spawned (the value is read once).
pub fn reserve_thread_stacks() {
    if std::env::var_os("RUST_MIN_STACK").is_none() {
        std::env::set_var("RUST_MIN_STACK", THREAD_STACK);
    }
}

/// Sends `tracing` logs to stderr as plain text (colour only on a terminal), filtered by
/// `CELERITY_LOG` (else `default`); see [`logging::init`] for the JSON format and `-l`.
pub fn init_logging(default: &str) {
    logging::init(&logging::LogSettings::default(), default);
}
