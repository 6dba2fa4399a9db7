//! The `celerity` command: producer verbs (`call`, `result`, `purge`, `queues`) for now.
//!
//! Errors are printed as one line (`celerity: error: …`) with exit code 2; a failed job exits 1.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use celerity_client::cli::{self as producer, ConnectionArgs, ProducerCommand};

#[derive(Debug, Parser)]
#[command(
    name = "celerity",
    version,
    about = "A fast, Celery-compatible distributed task queue"
)]
struct Cli {
    #[command(flatten)]
    conn: ConnectionArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    #[command(flatten)]
    Producer(ProducerCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CELERITY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&e),
    };
    let outcome = runtime.block_on(async {
        match &cli.command {
            Command::Producer(cmd) => producer::run(cmd, &cli.conn).await,
        }
    });
    match outcome {
        Ok(code) => code,
        Err(e) => fail(&e),
    }
}

/// Prints an error and its causes on one line.
fn fail(e: &dyn std::error::Error) -> ExitCode {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = s.source();
    }
    eprintln!("celerity: error: {line}");
    ExitCode::from(2)
}
