//! Nested workflows: applying a signature that is itself a group, chain or chord, the way Celery
//! 5.7's canvas applies it, reduced to a list of [`Action`]s (set a chord size, publish a message).
//!
//! The client uses it to send nested canvases built in Rust; the worker uses it whenever a callback,
//! the next chain step or a chord body is a composite (Celery nests those as dicts with
//! `subtask_type` `"group"` / `"chain"` / `"chord"`, the members in `kwargs.tasks`, a chord's parts
//! in `kwargs.header` / `kwargs.body`). What Celery does, and so what this does:
//! - **group** applied with a parent result: every member gets the result put in front of its
//!   args (unless immutable), the group id (the group's `options.task_id`) and its `group_index`;
//!   nested groups are flattened into their parent.
//! - **chain**: nested chains are spliced in; a group followed by another step becomes a chord with
//!   that step as its body (`chain(a, group(b, c), d)` → `a` then `chord([b, c], d)`); a chord whose
//!   body is a chain becomes a chord of the body's first step followed by the rest. The first step is
//!   sent with the rest in `embed.chain` (reverse order, after whatever outer chain is still pending);
//!   the last step carries the chain's group membership and chord, if any.
//! - **chord**: the size is recorded first, then every header member is applied with the parent
//!   result in front, the header's group id and index, and the body as `embed.chord` (for a chain
//!   member: on its last step). The body gets the header's group id, and the rest of an outer chain
//!   in its `options.chain`, so it carries on once the chord is done. An empty header sends the body
//!   at once with `[]`.
//!
//! Ids are frozen first ([`freeze_deep`]), so every handle is known before anything runs and a
//! replayed step re-sends the same ids.

use serde_json::{json, Map, Value};

use celerity_broker::protocol::node::new_task_id;
use celerity_broker::protocol::{Signature as Sig, TaskMessage};

use crate::canvas_encode::{freeze, signature_message, Call};
use crate::error::{ClientError, Result};

/// The task name Celery gives a serialized group.
pub const GROUP_TASK: &str = "celery.group";
/// The task name Celery gives a serialized chain.
pub const CHAIN_TASK: &str = "celery.chain";
/// The task name Celery gives a serialized chord.
pub const CHORD_TASK: &str = "celery.chord";

/// Options that describe where a signature sits in a workflow, never passed on to members.
const PLACEMENT: &[&str] = &[
    "task_id",
    "group_id",
    "group_index",
    "chord",
    "chain",
    "root_id",
    "parent_id",
    "reply_to",
    "link",
    "link_error",
];

/// True if a signature (as JSON) holds a chord anywhere: a `chord` signature or `celery.chord`
/// task, or a member carrying a `chord` option.
pub fn has_chord(v: &Value) -> bool {
    match v {
        Value::Object(o) => {
            o.get("subtask_type").and_then(Value::as_str) == Some("chord")
                || o.get("task").and_then(Value::as_str) == Some("celery.chord")
                || o.get("options")
                    .and_then(|opts| opts.get("chord"))
                    .is_some_and(|c| !c.is_null())
                || o.values().any(has_chord)
        }
        Value::Array(a) => a.iter().any(has_chord),
        _ => false,
    }
}

/// One thing to do to apply a workflow, in order.
#[derive(Debug)]
pub enum Action {
    /// Record a chord's header size in the result backend (before any of its members is sent).
    ChordSize { group_id: String, size: usize },
    /// Publish this task message to this queue.
    Publish {
        message: Box<TaskMessage>,
        queue: String,
    },
}

/// What applying a signature takes: the actions, and the result tuple to record in the parent's
/// `children` (Celery's `as_tuple()`: `[[id, null], null]`, a group's `[[gid, null], [members]]`).
#[derive(Debug)]
pub struct Planned {
    pub actions: Vec<Action>,
    pub child: Value,
}

/// The shape of a signature.
enum Kind {
    Task,
    Group(Vec<Sig>),
    Chain(Vec<Sig>),
    Chord {
        header: Vec<Sig>,
        header_opts: Map<String, Value>,
        gid: Option<String>,
        body: Box<Sig>,
    },
}

fn bad(why: impl Into<String>) -> ClientError {
    ClientError::InvalidArgument(why.into())
}

fn list_of(v: Option<&Value>, what: &str) -> Result<Vec<Sig>> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a.iter().map(|s| Ok(Sig::from_value(s)?)).collect(),
        Some(other) => Err(bad(format!(
            "{what} must be a list of signatures, got {other}"
        ))),
    }
}

fn kind(sig: &Sig) -> Result<Kind> {
    match sig.subtask_type.as_deref() {
        None | Some("") => Ok(Kind::Task),
        Some("group") => Ok(Kind::Group(list_of(
            sig.kwargs.get("tasks"),
            "a group's tasks",
        )?)),
        Some("chain") => Ok(Kind::Chain(list_of(
            sig.kwargs.get("tasks"),
            "a chain's tasks",
        )?)),
        Some("chord") => {
            let body = sig
                .kwargs
                .get("body")
                .filter(|b| b.is_object())
                .ok_or_else(|| bad("a chord signature has no body"))?;
            let body = Box::new(Sig::from_value(body)?);
            let (header, header_opts, gid) = match sig.kwargs.get("header") {
                Some(h @ Value::Object(_)) => {
                    let h = Sig::from_value(h)?;
                    match kind(&h)? {
                        Kind::Group(members) => {
                            let gid = h.task_id().map(str::to_owned);
                            (members, h.options, gid)
                        }
                        _ => (vec![h], Map::new(), None),
                    }
                }
                other => (list_of(other, "a chord's header")?, Map::new(), None),
            };
            Ok(Kind::Chord {
                header,
                header_opts,
                gid,
                body,
            })
        }
        Some(other) => Err(bad(format!(
            "`{other}` signatures (task {}) are not supported",
            sig.task
        ))),
    }
}

fn composite(
    task: &str,
    subtask_type: &str,
    kwargs: Map<String, Value>,
    options: Map<String, Value>,
) -> Sig {
    Sig {
        task: task.into(),
        kwargs,
        options,
        subtask_type: Some(subtask_type.into()),
        ..Sig::default()
    }
}

/// Celery's serialized group of these members.
pub fn group_signature(members: &[Sig], options: Map<String, Value>) -> Sig {
    let tasks = Value::Array(members.iter().map(Sig::to_value).collect());
    let mut kwargs = Map::new();
    kwargs.insert("tasks".into(), tasks);
    composite(GROUP_TASK, "group", kwargs, options)
}

/// Celery's serialized chain of these steps.
pub fn chain_signature(steps: &[Sig], options: Map<String, Value>) -> Sig {
    let tasks = Value::Array(steps.iter().map(Sig::to_value).collect());
    let mut kwargs = Map::new();
    kwargs.insert("tasks".into(), tasks);
    composite(CHAIN_TASK, "chain", kwargs, options)
}

/// Celery's serialized chord of a header group (already a group signature) and a body.
pub fn chord_signature(header: Sig, body: &Sig, options: Map<String, Value>) -> Sig {
    let mut kwargs = Map::new();
    kwargs.insert("kwargs".into(), Value::Object(Map::new()));
    kwargs.insert("header".into(), header.to_value());
    kwargs.insert("body".into(), body.to_value());
    composite(CHORD_TASK, "chord", kwargs, options)
}

fn set_tasks(sig: &mut Sig, key: &str, tasks: &[Sig]) {
    sig.kwargs.insert(
        key.into(),
        Value::Array(tasks.iter().map(Sig::to_value).collect()),
    );
}

/// Gives every task of a (possibly nested) signature a fixed id, if it has none yet; returns the
/// id of its result (see [`result_id`]).
pub fn freeze_deep(sig: &mut Sig) -> Result<String> {
    match kind(sig)? {
        Kind::Task => Ok(freeze(sig)),
        Kind::Group(mut members) => {
            let gid = match sig.task_id() {
                Some(g) => g.to_owned(),
                None => new_task_id(),
            };
            sig.options
                .insert("task_id".into(), Value::String(gid.clone()));
            for key in ["root_id", "parent_id"] {
                sig.options.entry(key).or_insert(Value::Null);
            }
            for (i, m) in members.iter_mut().enumerate() {
                freeze_deep(m)?;
                if m.subtask_type.is_none() {
                    m.options.entry("group_index").or_insert(Value::from(i));
                }
            }
            set_tasks(sig, "tasks", &members);
            Ok(gid)
        }
        Kind::Chain(mut steps) => {
            let Some(last) = steps.last_mut() else {
                return Err(bad("a chain needs at least one step"));
            };
            if let (Some(id), Kind::Task, None) = (sig.task_id(), kind(last)?, last.task_id()) {
                let id = id.to_owned();
                last.options.insert("task_id".into(), Value::String(id));
            }
            let mut id = String::new();
            for s in &mut steps {
                id = freeze_deep(s)?;
            }
            set_tasks(sig, "tasks", &steps);
            sig.options
                .insert("task_id".into(), Value::String(id.clone()));
            Ok(id)
        }
        Kind::Chord {
            mut header,
            mut header_opts,
            gid,
            mut body,
        } => {
            let gid = gid
                .or_else(|| sig.task_id().map(str::to_owned))
                .unwrap_or_else(new_task_id);
            for (i, m) in header.iter_mut().enumerate() {
                freeze_deep(m)?;
                if m.subtask_type.is_none() {
                    m.options.entry("group_index").or_insert(Value::from(i));
                }
            }
            header_opts.insert("task_id".into(), Value::String(gid.clone()));
            for key in ["root_id", "parent_id"] {
                header_opts.entry(key).or_insert(Value::Null);
            }
            let body_id = freeze_deep(&mut body)?;
            sig.kwargs.insert(
                "header".into(),
                group_signature(&header, header_opts).to_value(),
            );
            sig.kwargs.insert("body".into(), body.to_value());
            sig.options.insert("task_id".into(), Value::String(gid));
            Ok(body_id)
        }
    }
}

/// The id whose result a signature resolves to: a task's own id, a chain's last step's, a chord's
/// body's, a group's group id. `None` if not frozen.
pub fn result_id(sig: &Sig) -> Option<String> {
    match kind(sig).ok()? {
        Kind::Task | Kind::Group(_) => sig.task_id().map(str::to_owned),
        Kind::Chain(steps) => result_id(steps.last()?),
        Kind::Chord { body, .. } => result_id(&body),
    }
}

/// The part of a signature that produces its result: a chain's last step's, a chord's body's
/// (followed down), the signature itself otherwise.
pub fn final_part(sig: &Sig) -> Sig {
    match kind(sig) {
        Ok(Kind::Chain(steps)) => steps.last().map_or_else(|| sig.clone(), final_part),
        Ok(Kind::Chord { body, .. }) => final_part(&body),
        _ => sig.clone(),
    }
}

/// The members of a group signature (empty for anything else).
pub fn group_members(sig: &Sig) -> Vec<Sig> {
    match kind(sig) {
        Ok(Kind::Group(members)) => members,
        _ => Vec::new(),
    }
}

/// The ids of the tasks whose results make up a signature's result (a group's members', each
/// resolved through [`result_id`]; one id otherwise).
pub fn leaf_ids(sig: &Sig) -> Vec<String> {
    match kind(sig) {
        Ok(Kind::Group(members)) => members.iter().flat_map(leaf_ids).collect(),
        Ok(Kind::Chain(steps)) => steps.last().map(leaf_ids).unwrap_or_default(),
        Ok(Kind::Chord { body, .. }) => leaf_ids(&body),
        _ => sig.task_id().map(str::to_owned).into_iter().collect(),
    }
}

/// Marks the task that finishes a signature (a chain's last step, a chord's body) as a member of a
/// group and/or the header of a chord.
fn set_final(
    sig: &mut Sig,
    member: Option<(&str, Option<usize>)>,
    chord: Option<&Value>,
) -> Result<()> {
    match kind(sig)? {
        Kind::Task | Kind::Group(_) => {
            if let Some((gid, index)) = member {
                sig.options
                    .insert("group_id".into(), Value::String(gid.to_owned()));
                if let Some(i) = index {
                    sig.options.insert("group_index".into(), Value::from(i));
                }
            }
            if let Some(c) = chord {
                sig.options.insert("chord".into(), c.clone());
            }
        }
        Kind::Chain(mut steps) => {
            if let Some(last) = steps.last_mut() {
                set_final(last, member, chord)?;
            }
            set_tasks(sig, "tasks", &steps);
        }
        Kind::Chord { mut body, .. } => {
            set_final(&mut body, member, chord)?;
            sig.kwargs.insert("body".into(), body.to_value());
        }
    }
    Ok(())
}

/// Splices nested chains and nested groups into a flat list.
fn flatten(sigs: Vec<Sig>, nested: &str, out: &mut Vec<Sig>) -> Result<()> {
    for s in sigs {
        match kind(&s)? {
            Kind::Chain(steps) if nested == "chain" => {
                let mut steps = steps;
                if !s.args.is_empty() && !s.immutable {
                    if let Some(first) = steps.first_mut() {
                        let mut args = s.args.clone();
                        args.append(&mut first.args);
                        first.args = args;
                    }
                }
                flatten(steps, nested, out)?
            }
            Kind::Group(members) if nested == "group" => flatten(members, nested, out)?,
            _ => out.push(s),
        }
    }
    Ok(())
}

/// Celery's `prepare_steps` rewrites: splice nested chains, drop empty groups, `group | step` → `chord(group, step)`, `chord(h, chain(a, b))` → `chord(h, a), b`.
fn normalize_chain(steps: Vec<Sig>) -> Result<Vec<Sig>> {
    let mut flat = Vec::new();
    flatten(steps, "chain", &mut flat)?;
    let mut out: Vec<Sig> = Vec::new();
    let mut i = 0;
    while i < flat.len() {
        let mut s = flat[i].clone();
        i += 1;
        if let Kind::Group(members) = kind(&s)? {
            if members.is_empty() && (i < flat.len() || !out.is_empty()) {
                continue;
            } else if i < flat.len() {
                let body = flat[i].clone();
                i += 1;
                let mut opts = Map::new();
                if let Some(id) = s.task_id() {
                    opts.insert("task_id".into(), Value::String(id.to_owned()));
                }
                s = chord_signature(s, &body, opts);
            }
        }
        if let Kind::Chord { body, .. } = kind(&s)? {
            if let Kind::Chain(body_steps) = kind(&body)? {
                let mut body_flat = Vec::new();
                flatten(body_steps, "chain", &mut body_flat)?;
                if body_flat.len() > 1 && kind(&body_flat[0])?.is_task() {
                    s.kwargs.insert("body".into(), body_flat[0].to_value());
                    let rest: Vec<Sig> = body_flat.drain(1..).collect();
                    flat.splice(i..i, rest);
                }
            }
        }
        out.push(s);
    }
    Ok(out)
}

impl Kind {
    fn is_task(&self) -> bool {
        matches!(self, Kind::Task)
    }
}

/// Where a signature is applied: what it inherits from its parent and its enclosing canvas.
#[derive(Clone, Default)]
struct Ctx {
    /// The parent's result, put in front of the args (unless immutable).
    front: Option<Value>,
    /// The rest of an outer chain, in Celery's reverse order.
    chain: Vec<Value>,
    /// Options an enclosing group or chord passes on to its members.
    opts: Map<String, Value>,
}

struct Planner<'a> {
    call: &'a Call<'a>,
    actions: Vec<Action>,
}

/// Applies a signature (plain or composite) the way Celery would from `call`'s position (its parent
/// result, ids, outer chain and default queue); returns what to do, in order.
pub fn plan(sig: &Sig, call: &Call<'_>) -> Result<Planned> {
    let mut p = Planner {
        call,
        actions: Vec::new(),
    };
    let ctx = Ctx {
        front: call.parent_result.cloned(),
        chain: call.chain.clone().unwrap_or_default(),
        opts: Map::new(),
    };
    let child = p.apply(sig.clone(), ctx)?;
    Ok(Planned {
        actions: p.actions,
        child,
    })
}

/// True if a signature is a group, chain or chord.
pub fn is_composite(sig: &Sig) -> bool {
    sig.subtask_type.as_deref().is_some_and(|t| !t.is_empty())
}

fn passed_on(options: &Map<String, Value>) -> Map<String, Value> {
    options
        .iter()
        .filter(|(k, v)| !PLACEMENT.contains(&k.as_str()) && !v.is_null())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn push_list(sig: &mut Sig, key: &str, v: Value) {
    let mut list = match sig.options.remove(key) {
        Some(Value::Array(a)) => a,
        Some(Value::Null) | None => Vec::new(),
        Some(one) => vec![one],
    };
    match v {
        Value::Array(a) => list.extend(a),
        Value::Null => {}
        one => list.push(one),
    }
    sig.options.insert(key.into(), Value::Array(list));
}

impl Planner<'_> {
    fn apply(&mut self, mut sig: Sig, ctx: Ctx) -> Result<Value> {
        match kind(&sig)? {
            Kind::Task => self.task(sig, ctx),
            Kind::Group(members) => self.group(&sig, members, ctx),
            Kind::Chain(steps) => {
                let steps = normalize_chain(steps)?;
                self.chain(&mut sig, steps, ctx)
            }
            Kind::Chord {
                header,
                header_opts,
                gid,
                body,
            } => self.chord(&sig, header, header_opts, gid, *body, ctx),
        }
    }

    fn task(&mut self, mut sig: Sig, ctx: Ctx) -> Result<Value> {
        let id = freeze(&mut sig);
        for (k, v) in ctx.opts {
            if k == "group_id" && sig.options.contains_key("group_id") {
                continue;
            }
            sig.options.insert(k, v);
        }
        let call = Call {
            parent_result: ctx.front.as_ref(),
            parent_id: self.call.parent_id,
            root_id: self.call.root_id,
            chain: (!ctx.chain.is_empty()).then_some(ctx.chain),
            default_queue: self.call.default_queue,
        };
        let (message, queue) = signature_message(&sig, &call)?;
        self.actions.push(Action::Publish {
            message: Box::new(message),
            queue,
        });
        Ok(json!([[id, null], null]))
    }

    fn group(&mut self, sig: &Sig, members: Vec<Sig>, ctx: Ctx) -> Result<Value> {
        let gid = sig.task_id().map_or_else(new_task_id, str::to_owned);
        let mut flat = Vec::new();
        flatten(members, "group", &mut flat)?;
        let mut opts = ctx.opts.clone();
        opts.extend(passed_on(&sig.options));
        let front = if sig.immutable { None } else { ctx.front };
        let mut children = Vec::with_capacity(flat.len());
        // Celery's group.link_error: every member may fail, so each one gets the errbacks.
        let errbacks = sig.options.get("link_error").filter(|v| !v.is_null());
        for (i, mut m) in flat.into_iter().enumerate() {
            set_final(&mut m, Some((&gid, Some(i))), None)?;
            if let Some(eb) = errbacks {
                push_list(&mut m, "link_error", eb.clone());
            }
            let child = self.apply(
                m,
                Ctx {
                    front: front.clone(),
                    chain: ctx.chain.clone(),
                    opts: opts.clone(),
                },
            )?;
            children.push(child);
        }
        Ok(json!([[gid, null], children]))
    }

    fn chain(&mut self, sig: &mut Sig, mut steps: Vec<Sig>, ctx: Ctx) -> Result<Value> {
        if steps.is_empty() {
            return Ok(Value::Null);
        }
        for s in &mut steps {
            freeze_deep(s)?;
        }
        let o = &sig.options;
        if let Some(link) = o.get("link").filter(|l| !l.is_null()) {
            if let Some(last) = steps.last_mut() {
                push_list(last, "link", link.clone());
            }
        }
        if let Some(eb) = o.get("link_error").filter(|l| !l.is_null()) {
            for s in &mut steps {
                push_list(s, "link_error", eb.clone());
            }
        }
        let member = o.get("group_id").and_then(Value::as_str).map(|g| {
            let index = o
                .get("group_index")
                .and_then(Value::as_u64)
                .map(|i| i as usize);
            (g.to_owned(), index)
        });
        let chord = o.get("chord").filter(|c| c.is_object()).cloned();
        if member.is_some() || chord.is_some() {
            if let Some(last) = steps.last_mut() {
                set_final(
                    last,
                    member.as_ref().map(|(g, i)| (g.as_str(), *i)),
                    chord.as_ref(),
                )?;
            }
        }
        let mut rest = if ctx.chain.is_empty() {
            match o.get("chain") {
                Some(Value::Array(a)) => a.clone(),
                _ => Vec::new(),
            }
        } else {
            ctx.chain
        };
        rest.extend(steps[1..].iter().rev().map(Sig::to_value));
        let mut opts = ctx.opts;
        opts.extend(passed_on(&sig.options));
        let mut first = steps.swap_remove(0);
        if !sig.args.is_empty() && !sig.immutable {
            let mut args = sig.args.clone();
            args.append(&mut first.args);
            first.args = args;
        }
        let front = if sig.immutable { None } else { ctx.front };
        self.apply(
            first,
            Ctx {
                front,
                chain: rest,
                opts,
            },
        )
    }

    fn chord(
        &mut self,
        sig: &Sig,
        header: Vec<Sig>,
        header_opts: Map<String, Value>,
        gid: Option<String>,
        mut body: Sig,
        ctx: Ctx,
    ) -> Result<Value> {
        let gid = gid
            .or_else(|| sig.task_id().map(str::to_owned))
            .unwrap_or_else(new_task_id);
        freeze_deep(&mut body)?;
        let o = &sig.options;
        let member = o.get("group_id").and_then(Value::as_str);
        let index = o
            .get("group_index")
            .and_then(Value::as_u64)
            .map(|i| i as usize);
        let chord = o.get("chord").filter(|c| c.is_object());
        match member {
            Some(outer) => set_final(&mut body, Some((outer, index)), chord)?,
            None => set_final(&mut body, Some((&gid, None)), chord)?,
        }
        for key in ["link", "link_error"] {
            if let Some(v) = o.get(key).filter(|v| !v.is_null()) {
                push_list(&mut body, key, v.clone());
            }
        }
        let mut opts = ctx.opts;
        opts.extend(passed_on(&sig.options));
        for (k, v) in &opts {
            body.options.insert(k.clone(), v.clone());
        }
        if !ctx.chain.is_empty() {
            body.options.insert("chain".into(), Value::Array(ctx.chain));
        }
        let mut members = Vec::new();
        flatten(header, "group", &mut members)?;
        if members.is_empty() {
            self.apply(
                body,
                Ctx {
                    front: Some(Value::Array(Vec::new())),
                    ..Ctx::default()
                },
            )?;
            return Ok(json!([[gid, null], []]));
        }
        self.actions.push(Action::ChordSize {
            group_id: gid.clone(),
            size: members.len(),
        });
        let body_value = body.to_value();
        let mut header_pass = opts;
        header_pass.extend(passed_on(&header_opts));
        let front = if sig.immutable { None } else { ctx.front };
        let mut children = Vec::with_capacity(members.len());
        for (i, mut m) in members.into_iter().enumerate() {
            set_final(&mut m, Some((&gid, Some(i))), Some(&body_value))?;
            children.push(self.apply(
                m,
                Ctx {
                    front: front.clone(),
                    chain: Vec::new(),
                    opts: header_pass.clone(),
                },
            )?);
        }
        Ok(json!([[gid, null], children]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, args: Value) -> Sig {
        let Value::Array(a) = args else {
            unreachable!()
        };
        Sig::new(name, a, Map::new())
    }

    fn published(p: &Planned) -> Vec<&TaskMessage> {
        p.actions
            .iter()
            .filter_map(|a| match a {
                Action::Publish { message, .. } => Some(&**message),
                Action::ChordSize { .. } => None,
            })
            .collect()
    }

    /// Every uuid replaced by "ID", so our encoding can be compared with Python's.
    fn masked(v: &Value) -> Value {
        match v {
            Value::String(s) if uuid::Uuid::parse_str(s).is_ok() => json!("ID"),
            Value::Array(a) => Value::Array(a.iter().map(masked).collect()),
            Value::Object(o) => {
                Value::Object(o.iter().map(|(k, v)| (k.clone(), masked(v))).collect())
            }
            other => other.clone(),
        }
    }

    /// `embed.chain` of the first message of `chain(add.s(1, 1), group(add.s(1), add.s(2)),
    /// xsum.s()).apply_async()`, as Celery 5.7.0 sends it (ids masked).
    const PYTHON_GROUP_STEP: &str = r#"[{"task": "celery.chord", "args": [], "kwargs": {"kwargs": {}, "header": {"task": "celery.group", "args": [], "kwargs": {"tasks": [{"task": "demo.add", "args": [1], "kwargs": {}, "options": {"task_id": "ID", "reply_to": "ID", "group_index": 0}, "subtask_type": null, "immutable": false}, {"task": "demo.add", "args": [2], "kwargs": {}, "options": {"task_id": "ID", "reply_to": "ID", "group_index": 1}, "subtask_type": null, "immutable": false}]}, "options": {"task_id": "ID", "root_id": null, "parent_id": null}, "subtask_type": "group", "immutable": false}, "body": {"task": "demo.xsum", "args": [], "kwargs": {}, "options": {"task_id": "ID", "reply_to": "ID"}, "subtask_type": null, "immutable": false}}, "options": {"task_id": "ID"}, "subtask_type": "chord", "immutable": false}]"#;

    /// `embed.chord` of a header member of `chord([add.s(1, 1), add.s(2, 2)], chain(add.s(10),
    /// add.s(100))).apply_async()`, as Celery 5.7.0 sends it (ids masked).
    const PYTHON_CHAIN_BODY: &str = r#"{"task": "celery.chain", "args": [], "kwargs": {"tasks": [{"task": "demo.add", "args": [10], "kwargs": {}, "options": {"task_id": "ID", "reply_to": "ID"}, "subtask_type": null, "immutable": false}, {"task": "demo.add", "args": [100], "kwargs": {}, "options": {"task_id": "ID", "reply_to": "ID", "group_id": "ID"}, "subtask_type": null, "immutable": false}]}, "options": {"task_id": "ID"}, "subtask_type": "chain", "immutable": false}"#;

    #[test]
    fn nested_encoding_is_celerys() {
        let g = group_signature(
            &[t("demo.add", json!([1])), t("demo.add", json!([2]))],
            Map::new(),
        );
        let mut c = chain_signature(
            &[t("demo.add", json!([1, 1])), g, t("demo.xsum", json!([]))],
            Map::new(),
        );
        freeze_deep(&mut c).unwrap();
        let p = plan(&c, &Call::default()).unwrap();
        let python: Value = serde_json::from_str(PYTHON_GROUP_STEP).unwrap();
        assert_eq!(masked(&published(&p)[0].embed.chain), python);

        let h = group_signature(
            &[t("demo.add", json!([1, 1])), t("demo.add", json!([2, 2]))],
            Map::new(),
        );
        let b = chain_signature(
            &[t("demo.add", json!([10])), t("demo.add", json!([100]))],
            Map::new(),
        );
        let mut ch = chord_signature(h, &b, Map::new());
        freeze_deep(&mut ch).unwrap();
        let p = plan(&ch, &Call::default()).unwrap();
        let m = published(&p);
        let python: Value = serde_json::from_str(PYTHON_CHAIN_BODY).unwrap();
        assert_eq!(masked(&m[1].embed.chord), python);
        assert_eq!(
            (m[1].headers.group.is_some(), m[1].headers.group_index),
            (true, Some(1))
        );
    }

    #[test]
    fn group_step_gets_the_parent_result_in_front_of_each_member() {
        let g = group_signature(
            &[t("demo.add", json!([1])), t("demo.add", json!([2]))],
            Map::new(),
        );
        let r = json!(2);
        let call = Call {
            parent_result: Some(&r),
            parent_id: Some("p"),
            ..Call::default()
        };
        let p = plan(&g, &call).unwrap();
        let m = published(&p);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].args, vec![json!(2), json!(1)]);
        assert_eq!(m[1].args, vec![json!(2), json!(2)]);
        assert_eq!(m[0].headers.group, m[1].headers.group);
        assert_eq!(
            (m[0].headers.group_index, m[1].headers.group_index),
            (Some(0), Some(1))
        );
        assert_eq!(m[1].headers.parent_id.as_deref(), Some("p"));
    }

    #[test]
    fn group_then_step_in_a_chain_becomes_a_chord() {
        let g = group_signature(
            &[t("demo.add", json!([1])), t("demo.add", json!([2]))],
            Map::new(),
        );
        let c = chain_signature(
            &[t("demo.add", json!([1, 1])), g, t("demo.xsum", json!([]))],
            Map::new(),
        );
        let p = plan(&c, &Call::default()).unwrap();
        let m = published(&p);
        assert_eq!(m.len(), 1, "only the first step is sent");
        let rest = Sig::list_from_value(&m[0].embed.chain).unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].subtask_type.as_deref(), Some("chord"));
        // The worker applies it with the first step's result: size first, then the members.
        let r = json!(2);
        let call = Call {
            parent_result: Some(&r),
            ..Call::default()
        };
        let p = plan(&rest[0], &call).unwrap();
        assert!(matches!(p.actions[0], Action::ChordSize { size: 2, .. }));
        let m = published(&p);
        assert_eq!(m[0].args, vec![json!(2), json!(1)]);
        let body = Sig::from_value(&m[1].embed.chord).unwrap();
        assert_eq!(body.task, "demo.xsum");
        assert_eq!(
            body.options.get("group_id").and_then(Value::as_str),
            m[1].headers.group.as_deref()
        );
    }

    #[test]
    fn a_groups_errbacks_go_to_every_member() {
        let mut opts = Map::new();
        opts.insert(
            "link_error".into(),
            json!([t("demo.echo", json!([])).to_value()]),
        );
        let g = group_signature(
            &[t("demo.add", json!([1, 1])), t("demo.fail", json!(["x"]))],
            opts,
        );
        let p = plan(&g, &Call::default()).unwrap();
        for m in published(&p) {
            let ebs = Sig::list_from_value(&m.embed.errbacks).unwrap();
            assert_eq!(ebs.len(), 1);
            assert_eq!(ebs[0].task, "demo.echo");
        }
    }

    #[test]
    fn chain_members_of_a_group_carry_the_group_on_their_last_step() {
        let c1 = chain_signature(
            &[t("demo.add", json!([1, 1])), t("demo.add", json!([10]))],
            Map::new(),
        );
        let c2 = chain_signature(
            &[t("demo.add", json!([2, 2])), t("demo.add", json!([20]))],
            Map::new(),
        );
        let mut g = group_signature(&[c1, c2], Map::new());
        freeze_deep(&mut g).unwrap();
        let p = plan(&g, &Call::default()).unwrap();
        let m = published(&p);
        assert_eq!(m.len(), 2);
        assert!(
            m[0].headers.group.is_none(),
            "the first step is not the member"
        );
        let last = Sig::list_from_value(&m[1].embed.chain).unwrap();
        assert_eq!(last[0].options.get("group_index"), Some(&json!(1)));
        assert_eq!(leaf_ids(&g).len(), 2);
        assert_eq!(leaf_ids(&g)[1], last[0].task_id().unwrap());
    }

    #[test]
    fn chord_with_chain_body_in_a_chain_is_unrolled_and_carries_the_outer_chain() {
        let header = group_signature(
            &[t("demo.add", json!([1])), t("demo.add", json!([2]))],
            Map::new(),
        );
        let body = chain_signature(
            &[t("demo.xsum", json!([])), t("demo.add", json!([100]))],
            Map::new(),
        );
        let ch = chord_signature(header, &body, Map::new());
        let steps = normalize_chain(vec![
            t("demo.add", json!([1, 1])),
            ch,
            t("demo.mul", json!([2])),
        ])
        .unwrap();
        assert_eq!(
            steps.len(),
            4,
            "chord(h, chain(a, b)), c -> chord(h, a), b, c"
        );
        // Applied as a step with the rest of the chain pending: the body carries it.
        let rest = vec![steps[3].to_value(), steps[2].to_value()];
        let r = json!(2);
        let call = Call {
            parent_result: Some(&r),
            chain: Some(rest),
            ..Call::default()
        };
        let p = plan(&steps[1], &call).unwrap();
        let m = published(&p);
        assert!(
            m.iter().all(|m| m.embed.chain.is_null()),
            "header members get no chain"
        );
        let body = Sig::from_value(&m[0].embed.chord).unwrap();
        assert_eq!(body.task, "demo.xsum");
        assert_eq!(
            Sig::list_from_value(body.options.get("chain").unwrap()).unwrap()[1].task,
            "demo.add"
        );
    }
}
