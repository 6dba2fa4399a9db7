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
    worker: cli::worker::WorkerArgs,
}

/// Runs a worker over `registry`, configured from the command line and environment exactly like
/// `celerity worker` (`--broker`, `-Q`, `-c`, `-P`, …). Logs go to stderr (`CELERITY_LOG` sets the
/// level, default `info`). Returns the process exit code.
pub fn worker_main(registry: celerity_worker::Registry) -> ExitCode {
    use clap::Parser;
    reserve_thread_stacks();
    let args = WorkerCli::parse();
    init_logging("info");
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

/// Sends `tracing` logs to stderr, filtered by `CELERITY_LOG` (else `default`). A line that cannot
/// be written (stderr closed, its reader gone) is dropped: the subscriber's default is to report that
/// with `eprintln!`, which panics on the same closed stderr, in whatever task was logging.
pub fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CELERITY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false)
        .try_init();
}
