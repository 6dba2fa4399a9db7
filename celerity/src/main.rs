//! The `celerity` command: producer verbs (`call`, `result`, `purge`, `queues`), `worker` (with the
//! built-in `demo.*` tasks), `demo` (producer + worker + results in one process), `beat` (the
//! periodic scheduler), remote control of running workers (`inspect`, `control`), and `config check`
//! (the `--config FILE` every verb reads).
//!
//! This file is the top-level parser and the dispatch; each verb's flags and code are in
//! `celerity::cli`. Errors are printed as one line (`celerity: error: …`) with exit code 2; a failed
//! job exits 1.

use std::process::ExitCode;

use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};

use celerity::cli::beat::{run_beat_command, BeatArgs};
use celerity::cli::config::{Config, ConfigArgs, ConfigError, ConfigFileArg, ConfigWhat};
use celerity::cli::control::{run_control, run_inspect, ControlArgs, InspectArgs};
use celerity::cli::demo::{run_demo, DemoArgs};
use celerity::cli::producer::{self, ProducerCommand};
use celerity::cli::worker::{run_worker_command, WorkerCommand};
use celerity::cli::{ConnectionArgs, LogArgs};

/// mimalloc rather than glibc's malloc: a worker allocates and frees small buffers (the message,
/// its JSON values, the result) for every job, and glibc's `malloc`/`free` were a quarter of a
/// worker process's CPU (bench/README.md, "2026-12-06 (later)" and "Where the memory goes").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "celerity",
    version,
    about = "A fast, Celery-compatible distributed task queue"
)]
struct Cli {
    #[command(flatten)]
    conn: ConnectionArgs,
    #[command(flatten)]
    file: ConfigFileArg,
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    #[command(flatten)]
    Producer(ProducerCommand),
    /// Run a worker with the built-in demo tasks (demo.add, demo.mul, demo.echo, demo.sleep_ms, …)
    Worker(WorkerCommand),
    /// Send N demo.add jobs to an in-process worker, check every result, print jobs/s and latency
    Demo(DemoArgs),
    /// Run the periodic scheduler (one active beat per broker), or --check a schedule file
    Beat(BeatArgs),
    /// Ask running workers (Celerity or Python Celery): ping, active, reserved, scheduled, registered, stats, …
    Inspect(InspectArgs),
    /// Tell running workers (Celerity or Python Celery): revoke, shutdown, rate-limit, pool-grow, pool-shrink, …
    Control(ControlArgs),
    /// Check a config file (--config / CELERITY_CONFIG): print the configuration in effect
    Config(ConfigArgs),
}

fn main() -> ExitCode {
    celerity::reserve_thread_stacks();
    let matches = Cli::command().get_matches();
    let mut cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let config = match load_config(&cli) {
        Ok(config) => config,
        Err(e) => return fail(&e),
    };
    let default_level = if matches!(cli.command, Command::Worker(_) | Command::Beat(_)) {
        "info"
    } else {
        "warn"
    };
    let log = config.log_settings(cli.log.log_format, cli.log.loglevel);
    celerity::logging::init(&log, default_level);
    apply_config(&config, &matches, &mut cli);
    // One thread unless asked: a worker process runs its jobs as async tasks on one core (more with
    // --threads); the demo shares its runtime between the producer and an in-process worker.
    let mut builder = match &cli.command {
        Command::Worker(cmd) if cmd.worker.threads > 1 => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(usize::from(cmd.worker.threads));
            b
        }
        Command::Demo(_) => tokio::runtime::Builder::new_multi_thread(),
        _ => tokio::runtime::Builder::new_current_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(&e),
    };
    let outcome: Result<ExitCode, Box<dyn std::error::Error>> = runtime.block_on(async {
        match &cli.command {
            Command::Producer(cmd) => producer::run(cmd, &cli.conn).await.map_err(Into::into),
            Command::Inspect(args) => run_inspect(args, &cli.conn).await.map_err(Into::into),
            Command::Control(args) => run_control(args, &cli.conn).await.map_err(Into::into),
            Command::Worker(cmd) => run_worker_command(cmd, &cli.conn).await,
            Command::Beat(args) => run_beat_command(args, &cli.conn).await.map_err(Into::into),
            Command::Config(ConfigArgs {
                what: ConfigWhat::Check { file },
            }) => celerity::cli::config::run_check(file, &matches, &cli.conn, &cli.log),
            Command::Demo(args) => {
                let r = run_demo(args, &cli.conn).await?;
                println!(
                    "{} jobs in {:.3} s: {:.0} jobs/s, {} failed; latency send→result p50 {:.2} ms, p99 {:.2} ms",
                    r.jobs,
                    r.seconds,
                    r.jobs as f64 / r.seconds.max(1e-9),
                    r.failures,
                    r.p50_ms,
                    r.p99_ms
                );
                Ok(if r.failures == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
            }
        }
    });
    match outcome {
        Ok(code) => code,
        Err(e) => fail(e.as_ref()),
    }
}

/// The config file that `--config` / `CELERITY_CONFIG` names, if any (`config check` reads its own).
fn load_config(cli: &Cli) -> Result<Config, ConfigError> {
    match (&cli.command, &cli.file.config) {
        (Command::Config(_), _) | (_, None) => Ok(Config::default()),
        (_, Some(path)) => Config::load(path),
    }
}

/// Fills the options that neither a flag nor the environment gave from the config file.
fn apply_config(config: &Config, matches: &ArgMatches, cli: &mut Cli) {
    config.apply_connection(matches, &mut cli.conn);
    match (&mut cli.command, matches.subcommand()) {
        (Command::Worker(cmd), Some((_, m))) => config.apply_worker_command(m, cmd),
        (Command::Beat(args), Some((_, m))) => config.apply_beat(m, args),
        _ => {}
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
