//! The low-level canvas encoder: how one signature becomes the task message Celery would send for
//! it, and how a signature's ids are frozen. A leaf under both the typed builder
//! ([`crate::canvas`]) and the nested-workflow planner ([`crate::canvas_plan`]); it imports neither.
//!
//! - [`signature_message`] turns a plain task signature into its [`TaskMessage`] and queue: the parent's
//!   result in front of the args (unless immutable), `options` mapped to [`SendOptions`], `link` /
//!   `link_error` into `embed.callbacks` / `embed.errbacks`, `chord` into `embed.chord`, and the rest of
//!   a chain into `embed.chain` (Celery's reverse order). The worker uses it too when it sends
//!   callbacks, the next chain step and chord bodies (as `celerity_client::canvas::signature_message`).
//! - [`Call`] says where the signature is sent from (parent result / id, root id, pending chain,
//!   default queue).
//! - `freeze` gives a task signature and its links fixed ids up front.

use chrono::Utc;
use serde_json::Value;

use celerity_broker::protocol::node::{new_task_id, process_oid};
use celerity_broker::protocol::time::parse_iso;
use celerity_broker::protocol::{Signature as Sig, TaskMessage};

use crate::error::{ClientError, Result};
use crate::options::{Expires, SendOptions};

/// Gives a plain task signature and its linked signatures (`link`, `link_error`) fixed ids
/// (Celery's `freeze`), and a `reply_to`; returns its id. Ids already set are kept.
pub(crate) fn freeze(sig: &mut Sig) -> String {
    let id = match sig.task_id() {
        Some(id) => id.to_owned(),
        None => {
            let id = new_task_id();
            sig.options
                .insert("task_id".into(), Value::String(id.clone()));
            id
        }
    };
    sig.options
        .entry("reply_to")
        .or_insert_with(|| Value::String(process_oid().to_owned()));
    for key in ["link", "link_error"] {
        if let Some(list) = sig.options.get_mut(key) {
            let items: Vec<&mut Value> = match list {
                Value::Array(a) => a.iter_mut().collect(),
                one => vec![one],
            };
            for item in items {
                if let Ok(mut s) = Sig::from_value(item) {
                    freeze(&mut s);
                    *item = s.to_value();
                }
            }
        }
    }
    id
}

/// Where a signature is being sent from: the result to put in front of its arguments, the
/// workflow ids to carry on, and the queue to use when the signature names none.
#[derive(Debug, Clone, Default)]
pub struct Call<'a> {
    /// The parent's result, put in front of the args unless the signature is immutable.
    pub parent_result: Option<&'a Value>,
    /// Replaces the args' front instead: errbacks get the failed task's id.
    pub parent_id: Option<&'a str>,
    pub root_id: Option<&'a str>,
    /// The rest of a chain, to carry in `embed.chain` (already in Celery's reverse order).
    pub chain: Option<Vec<Value>>,
    /// The queue when the signature's options name none.
    pub default_queue: Option<&'a str>,
}

/// Builds the task message a signature stands for, and the queue it goes to.
pub fn signature_message(sig: &Sig, call: &Call<'_>) -> Result<(TaskMessage, String)> {
    if sig.subtask_type.as_deref().is_some_and(|t| !t.is_empty()) {
        return Err(ClientError::InvalidArgument(format!(
            "a `{}` signature cannot be sent as one message here; only plain task signatures are supported in this position",
            sig.subtask_type.as_deref().unwrap_or_default()
        )));
    }
    let o = &sig.options;
    let mut args = Vec::with_capacity(sig.args.len() + 1);
    if let (Some(r), false) = (call.parent_result, sig.immutable) {
        args.push(r.clone());
    }
    args.extend(sig.args.iter().cloned());
    let mut send = SendOptions::new();
    let text = |k: &str| o.get(k).and_then(Value::as_str).map(str::to_owned);
    let num = |k: &str| o.get(k).and_then(Value::as_f64);
    send.task_id = text("task_id");
    send.queue = text("queue")
        .or_else(|| text("routing_key"))
        .or_else(|| call.default_queue.map(str::to_owned));
    send.priority = o
        .get("priority")
        .and_then(Value::as_u64)
        .map(|p| p.min(255) as u8);
    if let Some(c) = num("countdown").filter(|c| *c > 0.0) {
        send.countdown = std::time::Duration::try_from_secs_f64(c).ok();
    }
    if let Some(e) = text("eta") {
        send.eta = parse_iso(&e).ok().map(|t| t.to_utc());
    }
    send.expires = match o.get("expires") {
        Some(Value::Number(n)) => n
            .as_f64()
            .and_then(|s| std::time::Duration::try_from_secs_f64(s).ok())
            .map(Expires::In),
        Some(Value::String(s)) => parse_iso(s).ok().map(|t| Expires::At(t.to_utc())),
        _ => None,
    };
    send.time_limit = num("time_limit");
    send.soft_time_limit = num("soft_time_limit");
    send.shadow = text("shadow");
    send.ignore_result = o.get("ignore_result").and_then(Value::as_bool);
    send.group_id = text("group_id");
    send.group_index = o.get("group_index").and_then(Value::as_i64);
    send.parent_id = text("parent_id").or_else(|| call.parent_id.map(str::to_owned));
    send.root_id = text("root_id").or_else(|| call.root_id.map(str::to_owned));
    let mut m = send.build(&sig.task, args, sig.kwargs.clone(), Utc::now())?;
    if send.root_id.is_none() {
        m.headers.root_id = Some(m.id().to_owned());
    }
    let list = |v: Option<&Value>| match v {
        None | Some(Value::Null) => Value::Null,
        Some(Value::Array(a)) if a.is_empty() => Value::Null,
        Some(a @ Value::Array(_)) => a.clone(),
        Some(one) => Value::Array(vec![one.clone()]),
    };
    m.embed.callbacks = list(o.get("link"));
    m.embed.errbacks = list(o.get("link_error"));
    m.embed.chord = o.get("chord").cloned().unwrap_or(Value::Null);
    m.embed.chain = match &call.chain {
        Some(c) if !c.is_empty() => Value::Array(c.clone()),
        Some(_) => Value::Null,
        None => list(o.get("chain")),
    };
    let queue = send.queue_name().to_owned();
    Ok((m, queue))
}
