//! The `celerity inspect …` and `celerity control …` verbs: remote control from the command line,
//! answered by Celerity and Python Celery workers alike. Replies are printed per node, as Celery's
//! CLI prints them (`-> node: OK` and the body), or as one JSON object with `--json`. No reply within
//! the timeout is an error (exit 1), as with `celery inspect`; so is a node named with `-d` that did
//! not reply, which makes `celerity inspect ping -d NODE -t SECONDS` an exec probe.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{json, Map, Value};

use celerity_broker::connect_broker;
use celerity_client::control::{Reply, Target};
use celerity_client::{Client, ClientError};

use super::connection::ConnectionArgs;

type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Who to ask and how long to wait (shared by both verbs).
#[derive(Debug, Clone, Args)]
pub struct TargetArgs {
    /// Only these nodes (comma-separated or repeated), e.g. celerity@host; default: every node
    #[arg(short = 'd', long, value_delimiter = ',', global = true)]
    pub destination: Vec<String>,
    /// Seconds to wait for replies
    #[arg(short = 't', long, default_value_t = 1.0, global = true)]
    pub timeout: f64,
    /// Print the replies as one JSON object {node: reply}
    #[arg(long, global = true)]
    pub json: bool,
}

/// `celerity inspect`.
#[derive(Debug, Clone, Args)]
pub struct InspectArgs {
    #[command(subcommand)]
    pub what: InspectWhat,
    #[command(flatten)]
    pub target: TargetArgs,
}

/// What `celerity inspect` asks.
#[derive(Debug, Clone, Subcommand)]
pub enum InspectWhat {
    /// Is anyone there? Every node answers pong
    Ping,
    /// Jobs running now
    Active,
    /// Jobs received and waiting for a slot
    Reserved,
    /// Jobs waiting for their ETA
    Scheduled,
    /// Task names each node can run (with their rate limits)
    Registered,
    /// Counters, pool, broker, resource usage
    Stats,
    /// Revoked ids each node remembers
    Revoked,
    /// Queues each node consumes
    ActiveQueues,
}

/// `celerity control`.
#[derive(Debug, Clone, Args)]
pub struct ControlArgs {
    #[command(subcommand)]
    pub what: ControlWhat,
    #[command(flatten)]
    pub target: TargetArgs,
}

/// What `celerity control` asks for.
#[derive(Debug, Clone, Subcommand)]
pub enum ControlWhat {
    /// Revoke jobs: not started → skipped (REVOKED); with --terminate also stopped if running
    Revoke {
        #[arg(required = true)]
        ids: Vec<String>,
        #[arg(long)]
        terminate: bool,
    },
    /// Warm shutdown of the nodes
    Shutdown,
    /// Change a task's rate limit on each node (e.g. 10/s, 100/m; 0 removes it)
    RateLimit { task: String, rate: String },
    /// Let each node run N more jobs at once
    PoolGrow {
        #[arg(default_value_t = 1)]
        n: u64,
    },
    /// Let each node run N fewer jobs at once (at least one remains)
    PoolShrink {
        #[arg(default_value_t = 1)]
        n: u64,
    },
    /// Turn task events on
    EnableEvents,
    /// Turn task events off
    DisableEvents,
}

/// Runs `celerity inspect …`.
pub async fn run_inspect(args: &InspectArgs, conn: &ConnectionArgs) -> Result<ExitCode> {
    let (method, arguments) = match args.what {
        InspectWhat::Ping => ("ping", Map::new()),
        InspectWhat::Active => ("active", object(json!({"safe": null}))),
        InspectWhat::Reserved => ("reserved", Map::new()),
        InspectWhat::Scheduled => ("scheduled", Map::new()),
        InspectWhat::Registered => ("registered", object(json!({"taskinfoitems": null}))),
        InspectWhat::Stats => ("stats", Map::new()),
        InspectWhat::Revoked => ("revoked", Map::new()),
        InspectWhat::ActiveQueues => ("active_queues", Map::new()),
    };
    call(conn, &args.target, method, arguments).await
}

/// Runs `celerity control …`.
pub async fn run_control(args: &ControlArgs, conn: &ConnectionArgs) -> Result<ExitCode> {
    let (method, arguments) = match &args.what {
        ControlWhat::Revoke { ids, terminate } => (
            "revoke",
            object(json!({"task_id": ids, "terminate": terminate, "signal": "SIGTERM"})),
        ),
        ControlWhat::Shutdown => ("shutdown", Map::new()),
        ControlWhat::RateLimit { task, rate } => (
            "rate_limit",
            object(json!({"task_name": task, "rate_limit": rate})),
        ),
        ControlWhat::PoolGrow { n } => ("pool_grow", object(json!({"n": n}))),
        ControlWhat::PoolShrink { n } => ("pool_shrink", object(json!({"n": n}))),
        ControlWhat::EnableEvents => ("enable_events", Map::new()),
        ControlWhat::DisableEvents => ("disable_events", Map::new()),
    };
    call(conn, &args.target, method, arguments).await
}

async fn call(
    conn: &ConnectionArgs,
    target: &TargetArgs,
    method: &str,
    arguments: Map<String, Value>,
) -> Result<ExitCode> {
    let timeout = Duration::try_from_secs_f64(target.timeout).map_err(|_| {
        ClientError::InvalidArgument(format!(
            "--timeout must be a number of seconds ≥ 0, got {}",
            target.timeout
        ))
    })?;
    let broker = connect_broker(&conn.broker).await?;
    let client = Client::new(broker, None);
    let replies = client
        .control_call(
            method,
            arguments,
            &Target {
                destination: target.destination.clone(),
                timeout,
            },
        )
        .await;
    let _ = client.close().await;
    let replies = replies?;
    if replies.is_empty() {
        eprintln!("Error: No nodes replied within time constraint.");
        return Ok(ExitCode::FAILURE);
    }
    let silent = silent_nodes(&target.destination, &replies);
    if target.json {
        let all: Map<String, Value> = replies.into_iter().map(|r| (r.node, r.value)).collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&Value::Object(all)).unwrap_or_default()
        );
    } else {
        let n = replies.len();
        for r in &replies {
            print!("{}", render(r));
        }
        println!("\n{n} node{} online.", if n == 1 { "" } else { "s" });
    }
    // Usable as an exec probe: success only if every named node answered.
    if !silent.is_empty() {
        eprintln!(
            "Error: no reply within the timeout from {}.",
            silent.join(", ")
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// The named destinations no reply came from (a glob pattern counts as answered by any reply).
fn silent_nodes(destination: &[String], replies: &[Reply]) -> Vec<String> {
    destination
        .iter()
        .filter(|d| {
            let glob = d.contains(['*', '?', '[']);
            !replies.iter().any(|r| glob || &r.node == *d)
        })
        .cloned()
        .collect()
}

/// One node's reply as Celery's CLI shows it.
fn render(r: &Reply) -> String {
    let (status, body) = match &r.value {
        Value::Object(o) if o.len() == 1 && o.contains_key("ok") => {
            ("OK", text(o.get("ok").unwrap_or(&Value::Null)))
        }
        Value::Object(o) if o.len() == 1 && o.contains_key("error") => {
            ("ERROR", text(o.get("error").unwrap_or(&Value::Null)))
        }
        Value::Array(a) if a.is_empty() => ("OK", "- empty -".to_owned()),
        Value::Array(a) => (
            "OK",
            a.iter()
                .map(|v| match v {
                    Value::String(s) => format!("* {s}"),
                    other => format!("* {other}"),
                })
                .collect::<Vec<_>>()
                .join("\n"),
        ),
        other => (
            "OK",
            serde_json::to_string_pretty(other).unwrap_or_default(),
        ),
    };
    let body: String = body.lines().map(|l| format!("    {l}\n")).collect();
    format!("-> {}: {status}\n{body}", r.node)
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(o) => o,
        _ => Map::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_print_like_celerys() {
        let r = Reply {
            node: "a@h".into(),
            value: json!({"ok": "pong"}),
        };
        assert_eq!(render(&r), "-> a@h: OK\n    pong\n");
        let r = Reply {
            node: "a@h".into(),
            value: json!(["demo.add", "demo.mul [rate_limit=5/s]"]),
        };
        assert_eq!(
            render(&r),
            "-> a@h: OK\n    * demo.add\n    * demo.mul [rate_limit=5/s]\n"
        );
        let r = Reply {
            node: "a@h".into(),
            value: json!({"error": "unknown task"}),
        };
        assert_eq!(render(&r), "-> a@h: ERROR\n    unknown task\n");
    }
}
