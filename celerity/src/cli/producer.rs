//! The producer-side verbs of the `celerity` command: `call`, `result`, `purge`, `queues`, `revoke`.
//!
//! The binary dispatches [`ProducerCommand`] here with the top-level [`ConnectionArgs`]. Each verb
//! prints its outcome and returns the process exit code; errors come back as [`ClientError`] for the
//! binary to print as one line.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Map, Value};

use celerity_broker::protocol::time::parse_iso;
use celerity_broker::url::{BrokerUrl, Scheme};
use celerity_broker::{connect_backend, ResultBackend, TaskMeta};
use celerity_client::result::outcome;
use celerity_client::{
    default_backend_url, AsyncResult, Client, ClientError, Expires, SendOptions, DEFAULT_QUEUE,
    MAX_DELAY,
};

use super::connection::ConnectionArgs;

type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Producer-side subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum ProducerCommand {
    /// Send a job by task name; prints its id (or its result with --wait).
    Call(Box<CallArgs>),
    /// Show a job's result (or wait for it).
    Result(ResultArgs),
    /// Delete every waiting message of the given queues.
    Purge(PurgeArgs),
    /// Show how many messages wait in the given queues.
    Queues(QueuesArgs),
    /// Revoke jobs on every worker: not started → skipped (REVOKED); with --terminate also stopped if running.
    Revoke(RevokeArgs),
}

/// `celerity revoke`.
#[derive(Debug, Clone, Args)]
pub struct RevokeArgs {
    /// Task ids
    #[arg(required = true)]
    pub ids: Vec<String>,
    /// Also stop the jobs if they are running
    #[arg(long)]
    pub terminate: bool,
}

/// `celerity call`.
#[derive(Debug, Clone, Args)]
pub struct CallArgs {
    /// Registered task name, e.g. demo.add
    #[arg(required_unless_present = "workflow")]
    pub name: Option<String>,
    /// Send a chain/group/chord described in JSON instead, e.g.
    /// '{"chain": [{"task": "demo.add", "args": [1, 2]}, {"task": "demo.mul", "args": [10]}]}'
    /// (also {"group": [...]} and {"chord": {"header": [...], "body": {...}}}); prints the ids
    #[arg(long, conflicts_with = "name")]
    pub workflow: Option<String>,
    /// Positional arguments as a JSON list, e.g. '[2, 3]'
    #[arg(long, default_value = "[]")]
    pub args: String,
    /// Keyword arguments as a JSON object, e.g. '{"x": 2}'
    #[arg(long, default_value = "{}")]
    pub kwargs: String,
    /// Queue to send to
    #[arg(long, short = 'Q', default_value = DEFAULT_QUEUE)]
    pub queue: String,
    /// Run no earlier than this many seconds from now
    #[arg(long)]
    pub countdown: Option<f64>,
    /// Run no earlier than this time (ISO-8601, UTC if no offset)
    #[arg(long)]
    pub eta: Option<String>,
    /// Expire after this many seconds, or at this ISO-8601 time
    #[arg(long)]
    pub expires: Option<String>,
    /// Message priority (0-255; Redis uses 0-9 with 0 first)
    #[arg(long)]
    pub priority: Option<u8>,
    /// Use this task id
    #[arg(long)]
    pub task_id: Option<String>,
    /// Hard time limit in seconds (the worker process running it is killed)
    #[arg(long)]
    pub time_limit: Option<f64>,
    /// Soft time limit in seconds (the job is cancelled and fails)
    #[arg(long)]
    pub soft_time_limit: Option<f64>,
    /// Wait for the result and print it
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up after this many seconds
    #[arg(long)]
    pub timeout: Option<f64>,
    /// Send this many copies (each with its own id), in batches, with a progress bar and a final rate
    #[arg(long, default_value_t = 1)]
    pub count: u64,
    /// Also publish a task-sent event per job (Celery's task_send_sent_event), for Flower
    #[arg(long)]
    pub sent_event: bool,
}

/// `celerity result`.
#[derive(Debug, Clone, Args)]
pub struct ResultArgs {
    /// Task id
    pub id: String,
    /// Wait until the job is finished
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up after this many seconds
    #[arg(long)]
    pub timeout: Option<f64>,
    /// Print Celery's whole result document instead of the value
    #[arg(long)]
    pub json: bool,
}

/// `celerity purge`.
#[derive(Debug, Clone, Args)]
pub struct PurgeArgs {
    /// Queues to empty
    #[arg(required = true)]
    pub queues: Vec<String>,
}

/// `celerity queues`.
#[derive(Debug, Clone, Args)]
pub struct QueuesArgs {
    /// Queues to show
    #[arg(default_value = DEFAULT_QUEUE)]
    pub queues: Vec<String>,
}

/// Runs one producer verb.
pub async fn run(command: &ProducerCommand, conn: &ConnectionArgs) -> Result<ExitCode> {
    if let ProducerCommand::Result(a) = command {
        return result(conn, a).await;
    }
    refuse_memory(&conn.broker)?;
    let client = Client::connect(&conn.broker, conn.backend.as_deref()).await?;
    let code = match command {
        ProducerCommand::Call(a) => call(&client.clone().with_sent_events(a.sent_event), a).await,
        ProducerCommand::Result(a) => result(conn, a).await,
        ProducerCommand::Purge(a) => {
            for q in &a.queues {
                let n = client.broker().purge(q).await?;
                println!("purged {n} message(s) from {q}");
            }
            Ok(ExitCode::SUCCESS)
        }
        ProducerCommand::Revoke(a) => {
            client.revoke(&a.ids, a.terminate).await?;
            println!(
                "revoke{} sent for {} job(s)",
                if a.terminate { " (terminate)" } else { "" },
                a.ids.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        ProducerCommand::Queues(a) => {
            for q in &a.queues {
                println!("{q}\t{}", client.broker().queue_len(q).await?);
            }
            Ok(ExitCode::SUCCESS)
        }
    };
    // Closing is best effort: the outcome is already printed.
    let _ = client.close().await;
    code
}

/// `memory://` lives inside one process, so a separate CLI process cannot reach it.
fn refuse_memory(broker: &str) -> Result<()> {
    if BrokerUrl::parse(broker)?.scheme == Scheme::Memory {
        return Err(ClientError::InvalidArgument(
            "memory:// exists only inside one process; give --broker redis://… or amqp://… \
             (or set CELERITY_BROKER_URL) — `celerity demo` runs a memory:// worker in-process"
                .into(),
        ));
    }
    Ok(())
}

fn seconds(what: &str, s: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(s).map_err(|_| {
        ClientError::InvalidArgument(format!("{what} must be a number of seconds ≥ 0, got {s}"))
    })
}

/// A delay or a time limit: seconds from 0 to [`MAX_DELAY`] (100 years).
fn delay(what: &str, s: f64) -> Result<Duration> {
    seconds(what, s)
        .ok()
        .filter(|d| *d <= MAX_DELAY)
        .ok_or_else(|| {
            ClientError::InvalidArgument(format!(
                "{what} must be a number of seconds from 0 to {} (100 years), got {s}",
                MAX_DELAY.as_secs()
            ))
        })
}

fn time(what: &str, s: &str) -> Result<DateTime<Utc>> {
    parse_iso(s)
        .map(|t| t.to_utc())
        .map_err(|_| ClientError::InvalidArgument(format!("{what}: `{s}` is not an ISO-8601 time")))
}

/// Reads `call`'s flags into arguments and options.
fn call_request(a: &CallArgs) -> Result<(Vec<Value>, Map<String, Value>, SendOptions)> {
    let args = match serde_json::from_str::<Value>(&a.args) {
        Ok(Value::Array(v)) => v,
        Ok(_) => {
            return Err(ClientError::InvalidArgument(
                "--args must be a JSON list, e.g. '[2, 3]'".into(),
            ))
        }
        Err(e) => {
            return Err(ClientError::InvalidArgument(format!(
                "--args is not valid JSON: {e}"
            )))
        }
    };
    let kwargs = match serde_json::from_str::<Value>(&a.kwargs) {
        Ok(Value::Object(m)) => m,
        Ok(_) => {
            return Err(ClientError::InvalidArgument(
                "--kwargs must be a JSON object, e.g. '{\"x\": 2}'".into(),
            ))
        }
        Err(e) => {
            return Err(ClientError::InvalidArgument(format!(
                "--kwargs is not valid JSON: {e}"
            )))
        }
    };
    let mut o = SendOptions::new().queue(a.queue.clone());
    if let Some(c) = a.countdown {
        o.countdown = Some(delay("--countdown", c)?);
    }
    if let Some(e) = &a.eta {
        o.eta = Some(time("--eta", e)?);
    }
    if let Some(x) = &a.expires {
        o.expires = Some(match x.trim().parse::<f64>() {
            Ok(s) => Expires::In(delay("--expires", s)?),
            Err(_) => Expires::At(time("--expires", x)?),
        });
    }
    o.priority = a.priority;
    o.task_id = a.task_id.clone();
    o.time_limit = a
        .time_limit
        .map(|t| delay("--time-limit", t).map(|d| d.as_secs_f64()))
        .transpose()?;
    o.soft_time_limit = a
        .soft_time_limit
        .map(|t| delay("--soft-time-limit", t).map(|d| d.as_secs_f64()))
        .transpose()?;
    if a.count == 0 {
        return Err(ClientError::InvalidArgument(
            "--count must be at least 1".into(),
        ));
    }
    if a.count > 1 && (a.wait || a.task_id.is_some()) {
        return Err(ClientError::InvalidArgument(
            "--count cannot be combined with --wait or --task-id".into(),
        ));
    }
    Ok((args, kwargs, o))
}

async fn call(client: &Client, a: &CallArgs) -> Result<ExitCode> {
    if let Some(w) = &a.workflow {
        let timeout = a.timeout.map(|t| seconds("--timeout", t)).transpose()?;
        return super::workflow::run(client, w, &a.queue, a.wait, timeout).await;
    }
    let (args, kwargs, options) = call_request(a)?;
    let name = a.name.as_deref().unwrap_or_default();
    if a.count > 1 {
        return call_many(client, a, name, args, kwargs, &options).await;
    }
    let handle = client.send_task(name, args, kwargs, &options).await?;
    if !a.wait {
        println!("{}", handle.id());
        return Ok(ExitCode::SUCCESS);
    }
    let timeout = a.timeout.map(|t| seconds("--timeout", t)).transpose()?;
    let meta = handle.wait_meta(timeout).await?;
    print_outcome(meta, false)
}

async fn call_many(
    client: &Client,
    a: &CallArgs,
    name: &str,
    args: Vec<Value>,
    kwargs: Map<String, Value>,
    options: &SendOptions,
) -> Result<ExitCode> {
    const CHUNK: u64 = 1000;
    let bar = ProgressBar::new(a.count);
    if let Ok(style) = ProgressStyle::with_template("{bar:40} {pos}/{len} {per_sec} eta {eta}") {
        bar.set_style(style);
    }
    let started = Instant::now();
    let mut sent = 0;
    while sent < a.count {
        let n = CHUNK.min(a.count - sent);
        let now = Utc::now();
        let batch = (0..n)
            .map(|_| options.build(name, args.clone(), kwargs.clone(), now))
            .collect::<Result<Vec<_>>>()?;
        client.send_batch(&batch, options.queue_name()).await?;
        sent += n;
        bar.set_position(sent);
    }
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "sent {sent} messages to {} in {secs:.3} s ({:.0} msgs/s)",
        options.queue_name(),
        sent as f64 / secs.max(1e-9)
    );
    Ok(ExitCode::SUCCESS)
}

/// The result backend `result` reads: `--backend`, else the one the broker implies. Only the
/// backend is connected (as `celery result` does): no broker is needed to read a result.
async fn result_backend(conn: &ConnectionArgs) -> Result<Arc<dyn ResultBackend>> {
    let url = match &conn.backend {
        Some(url) => url.clone(),
        None => default_backend_url(&conn.broker).ok_or(ClientError::NoBackend)?,
    };
    if celerity_broker::backend::rpc::is_rpc_url(&url) {
        return Err(ClientError::InvalidArgument(
            "an rpc:// result can be read only by the client that sent the task (it is a message \
             to that client's reply queue, as in Celery): read it from there, or use a redis:// backend"
                .into(),
        ));
    }
    if BrokerUrl::parse(&url)?.scheme == Scheme::Memory {
        return Err(ClientError::InvalidArgument(
            "memory:// exists only inside one process; give --backend redis://… \
             (or set CELERITY_RESULT_BACKEND; a redis:// --broker also serves)"
                .into(),
        ));
    }
    Ok(connect_backend(&url).await?)
}

async fn result(conn: &ConnectionArgs, a: &ResultArgs) -> Result<ExitCode> {
    let backend = result_backend(conn).await?;
    let outcome = show_result(AsyncResult::from_backend(&a.id, backend.clone()), a).await;
    // Closing is best effort: the outcome is already printed.
    let _ = backend.close().await;
    outcome
}

async fn show_result(handle: AsyncResult<Value>, a: &ResultArgs) -> Result<ExitCode> {
    let meta = if a.wait {
        let timeout = a.timeout.map(|t| seconds("--timeout", t)).transpose()?;
        handle.wait_meta(timeout).await?
    } else {
        handle.meta().await?
    };
    print_outcome(meta, a.json)
}

/// Prints a result: the value for SUCCESS, the state for unfinished jobs, the error for failures.
pub(crate) fn print_outcome(meta: TaskMeta, json: bool) -> Result<ExitCode> {
    let failed = matches!(
        meta.status,
        celerity_broker::State::Failure | celerity_broker::State::Revoked
    );
    if json {
        println!("{}", String::from_utf8_lossy(&meta.to_json()));
        return Ok(if failed {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        });
    }
    if !meta.status.is_ready() {
        println!("{}", meta.status);
        return Ok(ExitCode::SUCCESS);
    }
    match outcome::<Value>(meta) {
        Ok(v) => {
            println!("{v}");
            Ok(ExitCode::SUCCESS)
        }
        Err(ClientError::TaskFailed {
            task_id,
            exception,
            traceback,
        }) => {
            eprintln!("task {task_id} failed: {exception}");
            if let Some(tb) = traceback.filter(|t| !t.is_empty()) {
                eprintln!("{}", tb.trim_end());
            }
            Ok(ExitCode::FAILURE)
        }
        Err(e) => {
            eprintln!("{e}");
            Ok(ExitCode::FAILURE)
        }
    }
}
