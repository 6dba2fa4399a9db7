//! The remote-control commands a worker answers, with Celery's argument names and reply shapes
//! (`celery/worker/control.py`), so `celery inspect …`, Flower and `celerity inspect|control …` all
//! understand them:
//!
//! - inspect: `ping`, `active`, `reserved`, `scheduled`, `revoked`, `registered`, `stats`,
//!   `active_queues`, `conf` (a small subset), `clock`, `hello` (mingle: revoked ids are merged
//!   both ways), `query_task`;
//! - control: `revoke` / `terminate`, `rate_limit` (per process, applies to jobs not started yet),
//!   `pool_grow` / `pool_shrink` (jobs run at once, and the prefetch that follows), `shutdown`
//!   (warm), `enable_events` / `disable_events`, `heartbeat`.
//!
//! Anything else gets `{"error": "No such command: …"}`, as from Celery. `stats` adds two fields of
//! ours: `rate_limits` (task → current limit) and `events_dropped`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde_json::{json, Map, Value};
use tokio_util::sync::CancellationToken;

use celerity_broker::protocol::clock::LamportClock;
use celerity_broker::protocol::control::ControlRequest;

use crate::events::EventSender;
use crate::jobs::{Job, Jobs, Phase};
use crate::limits::{RateLimit, RateLimits};
use crate::pool::Pool;
use crate::registry::Registry;

/// What the commands read and act on: handles on the worker's components, each owned elsewhere.
pub(crate) struct Remote {
    /// This node's name.
    pub hostname: String,
    /// The broker's transport name (`redis`, `amqp`, `memory`), for `stats` and `conf`.
    pub transport: &'static str,
    /// The queues consumed (`active_queues`).
    pub queues: Vec<String>,
    /// When this worker started (`stats` → `uptime`).
    pub started: std::time::Instant,
    pub clock: Arc<LamportClock>,
    /// In-flight jobs, revoked ids and counters.
    pub jobs: Arc<Jobs>,
    pub registry: Arc<Registry>,
    pub limits: Arc<RateLimits>,
    pub pool: Arc<Pool>,
    pub events: EventSender,
    /// Cancelled by a remote `shutdown` (a warm stop).
    pub shutdown: CancellationToken,
    /// Set by a remote `shutdown`, so the stop is reported as asked for.
    pub shutdown_requested: Arc<AtomicBool>,
}

/// Acts on `request`; returns the reply body for this node (`None`: nothing to reply, as for
/// `heartbeat`).
pub(crate) fn dispatch(remote: &Remote, request: &ControlRequest) -> Option<Value> {
    let args = &request.arguments;
    let reply = match request.method.as_str() {
        "ping" => ok("pong"),
        "active" => Value::Array(infos(remote, Phase::Active)),
        "reserved" => Value::Array(infos(remote, Phase::Reserved)),
        "scheduled" => scheduled(remote),
        "revoked" => json!(remote.jobs.revoked_ids()),
        "registered" => registered(remote),
        "stats" => stats(remote),
        "active_queues" => Value::Array(remote.queues.iter().map(|q| queue_dict(q)).collect()),
        "conf" => json!({
            "worker_concurrency": remote.pool.size(),
            "task_default_queue": celerity_client::DEFAULT_QUEUE,
            "broker_transport": remote.transport,
        }),
        "clock" => json!({"clock": remote.clock.value()}),
        "hello" => hello(remote, args),
        "query_task" => query_task(remote, args.get("ids")),
        "revoke" | "terminate" => revoke(remote, request),
        "rate_limit" => rate_limit(remote, args),
        "pool_grow" => pool_grow(remote, args),
        "pool_shrink" => pool_shrink(remote, args),
        "shutdown" => {
            tracing::warn!("shutdown requested by remote control");
            remote.shutdown_requested.store(true, Ordering::SeqCst);
            remote.shutdown.cancel();
            ok("Got shutdown from remote")
        }
        "enable_events" => {
            remote.events.set_task_events(true);
            ok("task events enabled")
        }
        "disable_events" => {
            remote.events.set_task_events(false);
            ok("task events disabled")
        }
        "heartbeat" => {
            remote.events.heartbeat_now();
            return None;
        }
        other => {
            tracing::debug!(method = other, "unknown control command");
            json!({"error": format!("No such command: {other}")})
        }
    };
    Some(reply)
}

fn scheduled(remote: &Remote) -> Value {
    let jobs = remote.jobs.in_phase(Phase::Scheduled);
    let entries = jobs.into_iter().map(
        |j| json!({"eta": j.eta, "priority": j.priority, "request": j.info(&remote.hostname)}),
    );
    Value::Array(entries.collect())
}

/// Mingle: a worker starting up tells its revoked ids and learns ours (null to our own hello).
fn hello(remote: &Remote, args: &Map<String, Value>) -> Value {
    if args.get("from_node").and_then(Value::as_str) == Some(&remote.hostname) {
        return Value::Null;
    }
    if let Some(Value::Object(theirs)) = args.get("revoked") {
        let ids: Vec<String> = theirs.keys().cloned().collect();
        remote.jobs.revoke(&ids, false);
    }
    json!({"revoked": remote.jobs.revoked_for_hello(), "clock": remote.clock.forward()})
}

fn revoke(remote: &Remote, request: &ControlRequest) -> Value {
    let args = &request.arguments;
    let ids = task_ids(args.get("task_id"));
    let terminate = request.method == "terminate"
        || args
            .get("terminate")
            .and_then(Value::as_bool)
            .unwrap_or(false);
    let stopped = remote.jobs.revoke(&ids, terminate);
    tracing::info!(?ids, terminate, terminated_here = stopped, "revoked");
    let list = ids.join(", ");
    if terminate {
        ok(&format!("terminate: tasks {{{list}}} flagged as revoked"))
    } else {
        ok(&format!("tasks {{{list}}} flagged as revoked"))
    }
}

fn pool_grow(remote: &Remote, args: &Map<String, Value>) -> Value {
    let n = count_arg(args);
    match remote.pool.grow(n) {
        Ok(()) => {
            tracing::info!(n, size = remote.pool.size(), "pool grown by remote control");
            ok("pool will grow")
        }
        Err(e) => {
            tracing::warn!(n, "refused a pool growth: {e}");
            nok(&e)
        }
    }
}

fn pool_shrink(remote: &Remote, args: &Map<String, Value>) -> Value {
    let removed = remote.pool.shrink(count_arg(args));
    tracing::info!(
        removed,
        size = remote.pool.size(),
        "pool shrunk by remote control"
    );
    ok("pool will shrink")
}

fn ok(text: &str) -> Value {
    json!({"ok": text})
}

fn nok(text: &str) -> Value {
    json!({"error": text})
}

/// `n` of pool_grow/pool_shrink (default 1; Celery sends an int, the CLI may send a string).
fn count_arg(args: &Map<String, Value>) -> usize {
    match args.get("n") {
        Some(Value::Number(n)) => n
            .as_u64()
            .map_or(1, |n| usize::try_from(n).unwrap_or(usize::MAX)),
        Some(Value::String(s)) => s.trim().parse().unwrap_or(1),
        _ => 1,
    }
}

fn infos(remote: &Remote, phase: Phase) -> Vec<Value> {
    let mut jobs: Vec<Job> = remote.jobs.in_phase(phase);
    jobs.sort_by(|a, b| {
        a.time_start
            .unwrap_or(0.0)
            .total_cmp(&b.time_start.unwrap_or(0.0))
    });
    jobs.iter().map(|j| j.info(&remote.hostname)).collect()
}

/// Task names, with ` [rate_limit=…]` when one is set (Celery's default `taskinfoitems` shows it).
fn registered(remote: &Remote) -> Value {
    Value::Array(
        remote
            .registry
            .names()
            .into_iter()
            .filter(|n| !n.starts_with("celery."))
            .map(|n| match remote.limits.get_limit(n) {
                Some(l) => Value::String(format!("{n} [rate_limit={l}]")),
                None => Value::String(n.to_owned()),
            })
            .collect(),
    )
}

fn rate_limit(remote: &Remote, args: &Map<String, Value>) -> Value {
    let Some(task) = args.get("task_name").and_then(Value::as_str) else {
        return nok("task_name is missing");
    };
    if remote.registry.get(task).is_none() {
        tracing::error!(task, "rate limit attempt for an unknown task");
        return nok("unknown task");
    }
    // Celery: a false value, 0 or "0" turns the limit off.
    let spec = match args.get("rate_limit") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => None,
        Some(Value::Number(n)) if n.as_f64() == Some(0.0) => None,
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(Value::String(s)) if s.trim().is_empty() || s.trim() == "0" => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => return nok(&format!("Invalid rate limit string: {other}")),
    };
    match spec {
        None => {
            remote.limits.set(task, None);
            tracing::info!(task, "rate limit disabled by remote control");
            ok("rate limit disabled successfully")
        }
        Some(spec) => match spec.parse::<RateLimit>() {
            Ok(limit) => {
                remote.limits.set(task, Some(limit));
                tracing::info!(task, %limit, "rate limit changed by remote control");
                ok("new rate limit set successfully")
            }
            Err(e) => nok(&format!("Invalid rate limit string: {e}")),
        },
    }
}

/// `query_task`: `{id: [state, info]}` for the given ids this worker holds.
fn query_task(remote: &Remote, ids: Option<&Value>) -> Value {
    let wanted = task_ids(ids);
    let mut out = Map::new();
    for (phase, name) in [
        (Phase::Active, "active"),
        (Phase::Reserved, "reserved"),
        (Phase::Scheduled, "scheduled"),
    ] {
        for j in remote.jobs.in_phase(phase) {
            if wanted.contains(&j.id) {
                out.insert(j.id.clone(), json!([name, j.info(&remote.hostname)]));
            }
        }
    }
    Value::Object(out)
}

/// Celery's `Queue.as_dict(recurse=True)` for one of our task queues (as Celery declares them).
fn queue_dict(queue: &str) -> Value {
    json!({
        "name": queue,
        "exchange": {
            "name": queue, "type": "direct", "arguments": null, "durable": true,
            "passive": false, "auto_delete": false, "delivery_mode": null, "no_declare": false,
        },
        "routing_key": queue,
        "queue_arguments": null, "binding_arguments": null, "consumer_arguments": null,
        "durable": true, "exclusive": false, "auto_delete": false, "no_ack": false,
        "alias": null, "bindings": [], "no_declare": null, "expires": null,
        "message_ttl": null, "max_length": null, "max_length_bytes": null, "max_priority": null,
    })
}

/// Celery's `stats` (the parts that mean something here), plus `rate_limits` and `events_dropped`.
fn stats(remote: &Remote) -> Value {
    let limits: Map<String, Value> = remote
        .limits
        .snapshot()
        .into_iter()
        .map(|(t, l)| (t, Value::String(l.to_string())))
        .collect();
    let size = remote.pool.size();
    json!({
        "total": remote.jobs.totals(),
        "pid": std::process::id(),
        "clock": remote.clock.value().to_string(),
        "uptime": remote.started.elapsed().as_secs(),
        "pool": {
            "implementation": "celerity:tokio",
            "max-concurrency": size,
            "processes": [std::process::id()],
            "max-tasks-per-child": "N/A",
            "put-guarded-by-semaphore": false,
            "timeouts": [0, 0],
            "running": remote.jobs.active_count(),
        },
        "broker": {"transport": remote.transport},
        "prefetch_count": size,
        "rusage": rusage(),
        "processed": remote.jobs.processed(),
        "rate_limits": limits,
        "events_dropped": remote.events.dropped(),
        "sw_ident": celerity_broker::protocol::event::SW_IDENT,
        "sw_ver": env!("CARGO_PKG_VERSION"),
    })
}

/// `getrusage(RUSAGE_SELF)` in Celery's shape.
fn rusage() -> Value {
    // SAFETY: getrusage writes into the zeroed struct we pass and reads nothing else of ours.
    let mut r: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is a valid `who`.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut r) } != 0 {
        return json!({});
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    json!({
        "utime": secs(r.ru_utime), "stime": secs(r.ru_stime), "maxrss": r.ru_maxrss,
        "ixrss": r.ru_ixrss, "idrss": r.ru_idrss, "isrss": r.ru_isrss,
        "minflt": r.ru_minflt, "majflt": r.ru_majflt, "nswap": r.ru_nswap,
        "inblock": r.ru_inblock, "oublock": r.ru_oublock, "msgsnd": r.ru_msgsnd,
        "msgrcv": r.ru_msgrcv, "nsignals": r.ru_nsignals, "nvcsw": r.ru_nvcsw,
        "nivcsw": r.ru_nivcsw,
    })
}

/// `task_id` as one id or a list of ids.
fn task_ids(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}
