//! The `celerity` command: producer verbs (`call`, `result`, `purge`, `queues`), `worker` (with the
//! built-in `demo.*` tasks), `demo` (producer + worker + results in one process), `beat` (the
//! periodic scheduler), and remote control of running workers (`inspect`, `control`).
//!
//! Errors are printed as one line (`celerity: error: …`) with exit code 2; a failed job exits 1.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use celerity_client::cli::{self as producer, ConnectionArgs, ProducerCommand};
use celerity_worker::cli::{run_demo, run_worker, DemoArgs, WorkerArgs};
use celerity_worker::Registry;

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
    /// Run a worker with the built-in demo tasks (demo.add, demo.mul, demo.echo, demo.sleep_ms, …)
    Worker(WorkerCommand),
    /// Send N demo.add jobs to an in-process worker, check every result, print jobs/s and latency
    Demo(DemoArgs),
    /// Run the periodic scheduler (one active beat per broker), or --check a schedule file
    Beat(celerity_beat::BeatArgs),
    /// Ask running workers (Celerity or Python Celery): ping, active, reserved, scheduled, registered, stats, …
    Inspect(celerity_client::control_cli::InspectArgs),
    /// Tell running workers (Celerity or Python Celery): revoke, shutdown, rate-limit, pool-grow, pool-shrink, …
    Control(celerity_client::control_cli::ControlArgs),
}

/// `celerity worker`: the worker's flags, plus an embedded beat as Celery's `worker -B` has.
#[derive(Debug, clap::Args)]
struct WorkerCommand {
    #[command(flatten)]
    worker: WorkerArgs,
    /// Also run beat in this worker (once, in the supervisor; it still takes the leader lock)
    #[arg(short = 'B', long)]
    beat: bool,
    /// The schedule file the embedded beat runs
    #[arg(
        long,
        value_name = "FILE",
        requires = "beat",
        env = "CELERITY_BEAT_SCHEDULE"
    )]
    beat_schedule: Option<std::path::PathBuf>,
}

/// Runs the worker, with beat beside it when asked (not in pool children: beat runs once).
async fn run_worker_command(
    cmd: &WorkerCommand,
    conn: &ConnectionArgs,
) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let mut registry = Registry::new();
    celerity_worker::demo::register(&mut registry);
    let is_child = std::env::var_os(celerity_worker::supervisor::CHILD_ENV).is_some();
    let beat = if cmd.beat && !is_child {
        let Some(schedule) = &cmd.beat_schedule else {
            return Err("--beat needs --beat-schedule FILE (or CELERITY_BEAT_SCHEDULE)".into());
        };
        use clap::{Args as _, FromArgMatches as _};
        let matches = celerity_beat::BeatArgs::augment_args(clap::Command::new("beat"))
            .try_get_matches_from([
                std::ffi::OsStr::new("beat"),
                "--schedule".as_ref(),
                schedule.as_os_str(),
            ])?;
        let args = celerity_beat::BeatArgs::from_arg_matches(&matches)?;
        let stop = tokio_util::sync::CancellationToken::new();
        let conn = conn.clone();
        let task_stop = stop.clone();
        Some((
            stop,
            tokio::spawn(async move { celerity_beat::run_beat(&args, &conn, task_stop).await }),
        ))
    } else {
        None
    };
    let outcome = run_worker(registry, &cmd.worker, conn).await;
    if let Some((stop, task)) = beat {
        stop.cancel();
        match task.await {
            Ok(Err(e)) => tracing::error!(error = %e, "embedded beat stopped with an error"),
            Err(e) => tracing::error!(error = %e, "embedded beat panicked"),
            Ok(Ok(())) => {}
        }
    }
    if let Some(s) = outcome? {
        eprintln!(
            "worker {} stopped: {} succeeded, {} failed, {} retried, {} revoked, {} dead-lettered",
            std::process::id(),
            s.succeeded,
            s.failed,
            s.retried,
            s.revoked,
            s.rejected
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = if matches!(cli.command, Command::Worker(_) | Command::Beat(_)) {
        "info"
    } else {
        "warn"
    };
    celerity::init_logging(default_level);
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
            Command::Inspect(args) => celerity_client::control_cli::run_inspect(args, &cli.conn)
                .await
                .map_err(Into::into),
            Command::Control(args) => celerity_client::control_cli::run_control(args, &cli.conn)
                .await
                .map_err(Into::into),
            Command::Worker(cmd) => run_worker_command(cmd, &cli.conn).await,
            Command::Beat(args) => {
                if let Some(path) = &args.check {
                    print!("{}", celerity_beat::check(path)?);
                    return Ok(ExitCode::SUCCESS);
                }
                let stop = tokio_util::sync::CancellationToken::new();
                tokio::spawn(stop_on_signal(stop.clone()));
                celerity_beat::run_beat(args, &cli.conn, stop).await?;
                Ok(ExitCode::SUCCESS)
            }
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

/// Cancels `stop` on the first SIGINT or SIGTERM.
async fn stop_on_signal(stop: tokio_util::sync::CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    stop.cancel();
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
