//! Workflows, Celery's canvas: signatures, `chain`, `group`, `chord`, `link` / `link_error`.
//!
//! Everything is encoded as Celery encodes it, so Python workers run what we send and we run what
//! Python sends:
//! - a [`Signature`] is the dict `{"task", "args", "kwargs", "options", "subtask_type", "immutable"}`;
//!   `link` / `link_error` are kept in its options and become `embed.callbacks` / `embed.errbacks`;
//! - ids are frozen up front (`options.task_id`), so every handle is known before anything runs;
//! - a [`Chain`] sends only its first step, with the remaining steps in `embed.chain` in **reverse**
//!   order (the next step is the last element); its handle is the last step's result;
//! - a [`Group`] sends each member with the `group` / `group_index` headers;
//! - a [`Chord`] writes the chord size to the result backend first (Celery's `set_chord_size`), then
//!   sends the header members with `embed.chord` = the frozen body (whose `options.group_id` is the
//!   header's group id). The worker that stores the last header result sends the body.
//!
//! This file is the typed builder and the `Client` methods that send it. How one signature becomes
//! one task message ([`signature_message`], [`Call`]) and id freezing live in the leaf
//! [`crate::canvas_encode`] (re-exported here), nested workflows in [`crate::canvas_plan`].

use std::collections::HashMap;
use std::marker::PhantomData;

use serde_json::{Map, Value};

use celerity_broker::protocol::node::new_task_id;
use celerity_broker::protocol::{Signature as Sig, TaskMessage};

use crate::canvas_encode::freeze;
pub use crate::canvas_encode::{signature_message, Call};
use crate::canvas_plan::{self as plan, Action};
use crate::client::Client;
use crate::error::{ClientError, Result};
use crate::group_result::GroupResult;
use crate::result::AsyncResult;
use crate::task::{Task, TaskArgs};

/// A task call that can be sent later or nested in a workflow. `O` is what the task returns
/// (`Value` when untyped), so a typed chain's handle reads a typed result.
pub struct Signature<O = Value> {
    sig: Sig,
    _out: PhantomData<fn() -> O>,
}

impl<O> Clone for Signature<O> {
    fn clone(&self) -> Self {
        Signature {
            sig: self.sig.clone(),
            _out: PhantomData,
        }
    }
}

impl<O> std::fmt::Debug for Signature<O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.sig.fmt(f)
    }
}

impl Signature<Value> {
    /// An untyped signature: `Signature::new("demo.add", vec![json!(2)], Map::new())`.
    pub fn new(task: impl Into<String>, args: Vec<Value>, kwargs: Map<String, Value>) -> Self {
        Signature::wrap(Sig::new(task, args, kwargs))
    }

    /// Reads Celery's dict form (`{"task": …, "args": …, …}`).
    pub fn from_value(v: &Value) -> Result<Self> {
        Ok(Signature::wrap(Sig::from_value(v)?))
    }
}

/// A typed signature with all of the task's arguments.
pub fn sig<T: Task>(args: &T::Args) -> Result<Signature<T::Output>> {
    let (a, k) = args.to_call()?;
    Ok(Signature::wrap(Sig::new(T::NAME, a, k)))
}

/// A typed signature given only some leading arguments: the parent's result is put in front of them
/// when it runs in a chain or as a callback (`partial::<Mul>(vec![json!(10)])` after an add).
pub fn partial<T: Task>(args: Vec<Value>) -> Signature<T::Output> {
    Signature::wrap(Sig::new(T::NAME, args, Map::new()))
}

impl<O> Signature<O> {
    fn wrap(sig: Sig) -> Self {
        Signature {
            sig,
            _out: PhantomData,
        }
    }

    /// The task name.
    pub fn task(&self) -> &str {
        &self.sig.task
    }

    /// The frozen id, once frozen (or given with [`Signature::task_id`]).
    pub fn id(&self) -> Option<&str> {
        self.sig.task_id()
    }

    /// Celery's `si`: the parent's result is not put in front of the arguments.
    pub fn immutable(mut self) -> Self {
        self.sig.immutable = true;
        self
    }

    /// Sets an execution option as Celery names it (`queue`, `priority`, `countdown`, `expires`,
    /// `time_limit`, `soft_time_limit`, `shadow`, `ignore_result`, …).
    pub fn option(mut self, key: &str, value: Value) -> Self {
        self.sig.options.insert(key.to_owned(), value);
        self
    }

    /// Sends it to this queue.
    pub fn queue(self, queue: &str) -> Self {
        self.option("queue", Value::String(queue.to_owned()))
    }

    /// Uses this id instead of a fresh one.
    pub fn task_id(self, id: &str) -> Self {
        self.option("task_id", Value::String(id.to_owned()))
    }

    /// Adds a callback: sent when this task succeeds, with its result put in front of the callback's
    /// arguments (unless the callback is immutable).
    pub fn link<P>(mut self, callback: Signature<P>) -> Self {
        push_option(&mut self.sig, "link", callback.sig.to_value());
        self
    }

    /// Adds an errback: sent when this task fails, with the failed task's id as its first argument
    /// (how Celery calls errbacks that are tasks).
    pub fn link_error<P>(mut self, errback: Signature<P>) -> Self {
        push_option(&mut self.sig, "link_error", errback.sig.to_value());
        self
    }

    /// Gives it (and its callbacks and errbacks) fixed ids, if not already given; returns the id.
    pub fn freeze(&mut self) -> String {
        if plan::is_composite(&self.sig) {
            if let Ok(id) = plan::freeze_deep(&mut self.sig) {
                return id;
            }
        }
        freeze(&mut self.sig)
    }

    /// Celery's dict form.
    pub fn to_value(&self) -> Value {
        self.sig.to_value()
    }

    /// The same signature with another output type.
    pub fn typed<P>(self) -> Signature<P> {
        Signature::wrap(self.sig)
    }

    /// Sends it to `queue` unless it names a queue already.
    pub fn queue_default(mut self, queue: &str) -> Self {
        self.queue_if_unset(Some(queue));
        self
    }

    fn queue_if_unset(&mut self, queue: Option<&str>) {
        if let Some(q) = queue {
            if !self.sig.options.contains_key("queue") {
                self.sig
                    .options
                    .insert("queue".into(), Value::String(q.to_owned()));
            }
        }
    }
}

fn push_option(sig: &mut Sig, key: &str, v: Value) {
    match sig.options.get_mut(key) {
        Some(Value::Array(list)) => list.push(v),
        Some(one @ Value::Object(_)) => {
            let first = one.take();
            *one = Value::Array(vec![first, v]);
        }
        _ => {
            sig.options.insert(key.to_owned(), Value::Array(vec![v]));
        }
    }
}

/// `chain(a, b, c)`: each step gets the previous step's result in front of its arguments.
pub struct Chain<O = Value> {
    steps: Vec<Sig>,
    _out: PhantomData<fn() -> O>,
}

/// A chain starting with `first`; add steps with [`Chain::then`].
pub fn chain<O>(first: Signature<O>) -> Chain<O> {
    Chain {
        steps: vec![first.sig],
        _out: PhantomData,
    }
}

impl Chain<Value> {
    /// An untyped chain of these steps (at least one).
    pub fn new(steps: Vec<Signature>) -> Result<Self> {
        if steps.is_empty() {
            return Err(ClientError::InvalidArgument("a chain needs a step".into()));
        }
        Ok(Chain {
            steps: steps.into_iter().map(|s| s.sig).collect(),
            _out: PhantomData,
        })
    }
}

impl<O> Chain<O> {
    /// Appends a step; the chain's result becomes that step's.
    pub fn then<P>(mut self, step: Signature<P>) -> Chain<P> {
        self.steps.push(step.sig);
        Chain {
            steps: self.steps,
            _out: PhantomData,
        }
    }

    /// An errback for every step (Celery's `chain.link_error`): whichever step fails calls it.
    pub fn link_error<P>(mut self, errback: Signature<P>) -> Self {
        let mut eb = errback.sig;
        freeze(&mut eb);
        for s in &mut self.steps {
            push_option(s, "link_error", eb.to_value());
        }
        self
    }

    /// A callback on the last step.
    pub fn link<P>(mut self, callback: Signature<P>) -> Self {
        if let Some(last) = self.steps.last_mut() {
            push_option(last, "link", callback.sig.to_value());
        }
        self
    }

    /// Sends every step without a queue of its own to `queue`.
    pub fn queue(mut self, queue: &str) -> Self {
        for s in &mut self.steps {
            s.options
                .entry("queue")
                .or_insert_with(|| Value::String(queue.to_owned()));
        }
        self
    }

    /// Fixes every step's id; returns them in order (the last one is the chain's result). A step
    /// that is a group stands for its group id, a chain or chord for its final result's id.
    pub fn freeze(&mut self) -> Vec<String> {
        self.steps
            .iter_mut()
            .map(|s| plan::freeze_deep(s).unwrap_or_else(|_| freeze(s)))
            .collect()
    }
}

/// `group([...])`: members run in parallel; their results are read together, in order.
#[derive(Debug, Clone)]
pub struct Group {
    members: Vec<Sig>,
    id: Option<String>,
}

impl Group {
    pub fn new<O>(members: Vec<Signature<O>>) -> Self {
        Group {
            members: members.into_iter().map(|s| s.sig).collect(),
            id: None,
        }
    }

    /// Uses this group id instead of a fresh one.
    pub fn id(mut self, id: &str) -> Self {
        self.id = Some(id.to_owned());
        self
    }

    /// Sends every member without a queue of its own to `queue`.
    pub fn queue(mut self, queue: &str) -> Self {
        for s in &mut self.members {
            s.options
                .entry("queue")
                .or_insert_with(|| Value::String(queue.to_owned()));
        }
        self
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Fixes the group id and the members' ids, `group_id` and `group_index`; returns the group id.
    fn freeze(&mut self) -> String {
        let gid = self.id.get_or_insert_with(new_task_id).clone();
        for (i, m) in self.members.iter_mut().enumerate() {
            freeze(m);
            m.options
                .insert("group_id".into(), Value::String(gid.clone()));
            m.options.insert("group_index".into(), Value::from(i));
        }
        gid
    }
}

/// A group nested in another workflow (a chain step, a chord body, a callback), encoded as Celery
/// encodes it (`celery.group`, members in `kwargs.tasks`). Its result is the list of the members'.
impl From<Group> for Signature<Value> {
    fn from(g: Group) -> Self {
        let mut options = Map::new();
        if let Some(id) = g.id {
            options.insert("task_id".into(), Value::String(id));
        }
        Signature::wrap(plan::group_signature(&g.members, options))
    }
}

/// A chain nested in another workflow (a group member, a chord body or header member, a step of
/// another chain), encoded as Celery encodes it (`celery.chain`, steps in `kwargs.tasks`).
impl<O> From<Chain<O>> for Signature<O> {
    fn from(c: Chain<O>) -> Self {
        Signature::wrap(plan::chain_signature(&c.steps, Map::new()))
    }
}

/// A chord nested in another workflow (a chain step, a group member), encoded as Celery encodes it
/// (`celery.chord`, `kwargs.header` a group, `kwargs.body`).
impl<O> From<Chord<O>> for Signature<O> {
    fn from(c: Chord<O>) -> Self {
        let mut options = Map::new();
        if let Some(id) = &c.header.id {
            options.insert("task_id".into(), Value::String(id.clone()));
        }
        let header = plan::group_signature(&c.header.members, options);
        Signature::wrap(plan::chord_signature(header, &c.body.sig, Map::new()))
    }
}

/// What a workflow sent with [`Client::apply_workflow`] resolves to.
pub enum WorkflowResult {
    /// A task, a chain (its last step) or a chord (its body).
    Task(AsyncResult<Value>),
    /// A group, or a chain ending in a group: the members' results in order.
    Group(GroupResult),
}

/// `chord(header, body)`: the body runs once, after every header member finished, with the list of
/// their results in header order.
pub struct Chord<O = Value> {
    header: Group,
    body: Signature<O>,
}

/// A chord of `header` and `body`.
pub fn chord<O>(header: Group, body: Signature<O>) -> Chord<O> {
    Chord { header, body }
}

impl<O> Chord<O> {
    /// Sends the header members and the body (where they have no queue of their own) to `queue`.
    pub fn queue(mut self, queue: &str) -> Self {
        self.header = self.header.queue(queue);
        self.body.queue_if_unset(Some(queue));
        self
    }
}

/// The handles of a sent chord.
pub struct ChordResult<O> {
    /// The header members.
    pub header: GroupResult,
    /// The body: resolves to the chord's result (or a `ChordError` naming the failed member).
    pub body: AsyncResult<O>,
}

impl Client {
    /// Sends one signature (with its callbacks and errbacks).
    pub async fn apply<O>(&self, signature: &Signature<O>) -> Result<AsyncResult<O>> {
        let mut s = signature.sig.clone();
        self.refuse_chords(&s)?;
        freeze(&mut s);
        let (m, queue) = signature_message(&s, &Call::default())?;
        self.send_message(&m, &queue).await?;
        Ok(self.result(m.id()))
    }

    /// Sends any workflow, plain or nested (groups of chains, chains with group or chord steps,
    /// chords with chain bodies or chain members, …), encoded as Celery 5.7 encodes it.
    pub async fn apply_workflow(&self, signature: &Signature) -> Result<WorkflowResult> {
        let mut s = signature.sig.clone();
        let id = plan::freeze_deep(&mut s)?;
        self.run_plan(&s).await?;
        Ok(self.workflow_handle(&s, id))
    }

    fn workflow_handle(&self, s: &Sig, id: String) -> WorkflowResult {
        let last = plan::final_part(s);
        if last.subtask_type.as_deref() == Some("group") {
            let ids = plan::group_members(&last)
                .iter()
                .filter_map(plan::result_id)
                .collect();
            return WorkflowResult::Group(self.group_result(&id, ids));
        }
        WorkflowResult::Task(self.result(&id))
    }

    /// Applies a frozen (possibly nested) signature: chord sizes first, messages batched per queue.
    async fn run_plan(&self, s: &Sig) -> Result<()> {
        self.refuse_chords(s)?;
        let planned = plan::plan(s, &Call::default())?;
        if planned
            .actions
            .iter()
            .any(|a| matches!(a, Action::ChordSize { .. }))
        {
            self.refuse_chords_always()?;
        }
        let mut batch = Vec::new();
        for action in planned.actions {
            match action {
                Action::ChordSize { group_id, size } => {
                    self.send_grouped(std::mem::take(&mut batch)).await?;
                    let backend = self.backend().ok_or(ClientError::NoBackend)?;
                    backend.set_chord_size(&group_id, size).await?;
                }
                Action::Publish { message, queue } => batch.push((*message, queue)),
            }
        }
        self.send_grouped(batch).await
    }

    /// Sends a chain: its first step, carrying the rest. The handle is the last step's result.
    /// Steps may be groups, chains or chords (see [`Client::apply_workflow`]); a chain whose last
    /// step is a group has a group as its result: send it with [`Client::apply_workflow`].
    pub async fn apply_chain<O>(&self, chain: &Chain<O>) -> Result<AsyncResult<O>> {
        for step in &chain.steps {
            self.refuse_chords(step)?;
        }
        if chain.steps.iter().any(plan::is_composite) {
            let mut s = plan::chain_signature(&chain.steps, Map::new());
            let id = plan::freeze_deep(&mut s)?;
            if let WorkflowResult::Group(_) = self.workflow_handle(&s, id.clone()) {
                return Err(ClientError::InvalidArgument(
                    "this chain ends in a group, so its result is a group: send it with apply_workflow".into(),
                ));
            }
            self.run_plan(&s).await?;
            return Ok(self.result(&id));
        }
        let mut steps = chain.steps.clone();
        let ids: Vec<String> = steps.iter_mut().map(freeze).collect();
        let rest: Vec<Value> = steps[1..].iter().rev().map(Sig::to_value).collect();
        let call = Call {
            chain: Some(rest),
            ..Call::default()
        };
        let (m, queue) = signature_message(&steps[0], &call)?;
        self.send_message(&m, &queue).await?;
        let last = ids.last().cloned().unwrap_or_default();
        Ok(self.result(&last))
    }

    /// Sends every member of a group (in as few round trips as the broker allows per queue).
    pub async fn apply_group(&self, group: &Group) -> Result<GroupResult> {
        if group.members.iter().any(plan::is_composite) {
            let mut options = Map::new();
            if let Some(id) = &group.id {
                options.insert("task_id".into(), Value::String(id.clone()));
            }
            let mut s = plan::group_signature(&group.members, options);
            let gid = plan::freeze_deep(&mut s)?;
            self.run_plan(&s).await?;
            return match self.workflow_handle(&s, gid.clone()) {
                WorkflowResult::Group(g) => Ok(g),
                WorkflowResult::Task(_) => Ok(self.group_result(&gid, Vec::new())),
            };
        }
        let mut g = group.clone();
        let gid = g.freeze();
        let messages = g
            .members
            .iter()
            .map(|s| signature_message(s, &Call::default()))
            .collect::<Result<Vec<_>>>()?;
        let ids = messages.iter().map(|(m, _)| m.id().to_owned()).collect();
        self.send_grouped(messages).await?;
        Ok(self.group_result(&gid, ids))
    }

    /// Sends a chord: records its size in the result backend, then sends the header. The body is
    /// sent by the worker that stores the last header result.
    pub async fn apply_chord<O>(&self, chord: &Chord<O>) -> Result<ChordResult<O>> {
        let backend = self.backend().ok_or(ClientError::NoBackend)?;
        self.refuse_chords_always()?;
        if plan::is_composite(&chord.body.sig)
            || chord.header.members.iter().any(plan::is_composite)
        {
            let Signature { sig: mut s, .. } = Signature::<Value>::from(Chord {
                header: chord.header.clone(),
                body: chord.body.clone().typed::<Value>(),
            });
            let body_id = plan::freeze_deep(&mut s)?;
            let header = s.kwargs.get("header").map(Sig::from_value).transpose()?;
            let (gid, ids) = match header {
                Some(h) => (
                    h.task_id().unwrap_or_default().to_owned(),
                    Sig::list_from_value(h.kwargs.get("tasks").unwrap_or(&Value::Null))?
                        .iter()
                        .filter_map(plan::result_id)
                        .collect(),
                ),
                None => (String::new(), Vec::new()),
            };
            self.run_plan(&s).await?;
            return Ok(ChordResult {
                header: self.group_result(&gid, ids),
                body: self.result(&body_id),
            });
        }
        let mut header = chord.header.clone();
        let gid = header.freeze();
        let mut body = chord.body.sig.clone();
        let body_id = freeze(&mut body);
        body.options
            .insert("group_id".into(), Value::String(gid.clone()));
        if header.is_empty() {
            let empty = Value::Array(Vec::new());
            let call = Call {
                parent_result: Some(&empty),
                ..Call::default()
            };
            let (m, queue) = signature_message(&body, &call)?;
            self.send_message(&m, &queue).await?;
        } else {
            let body_value = body.to_value();
            for m in &mut header.members {
                m.options.insert("chord".into(), body_value.clone());
            }
            backend.set_chord_size(&gid, header.len()).await?;
            let messages = header
                .members
                .iter()
                .map(|s| signature_message(s, &Call::default()))
                .collect::<Result<Vec<_>>>()?;
            self.send_grouped(messages).await?;
        }
        let ids = header
            .members
            .iter()
            .filter_map(|s| s.task_id().map(str::to_owned))
            .collect();
        Ok(ChordResult {
            header: self.group_result(&gid, ids),
            body: self.result(&body_id),
        })
    }

    /// Refuses a workflow holding a chord, before anything is sent, when the result backend cannot
    /// join one (`rpc://`).
    fn refuse_chords(&self, s: &Sig) -> Result<()> {
        if plan::has_chord(&s.to_value()) {
            self.refuse_chords_always()?;
        }
        Ok(())
    }

    /// Fails if the result backend cannot join a chord.
    fn refuse_chords_always(&self) -> Result<()> {
        match self.backend() {
            Some(b) if !b.joins_chords() => Err(ClientError::ChordsUnsupported {
                backend: b.backend(),
            }),
            _ => Ok(()),
        }
    }

    /// Publishes messages, one batch per queue, keeping their order within a queue.
    async fn send_grouped(&self, messages: Vec<(TaskMessage, String)>) -> Result<()> {
        let mut order: Vec<String> = Vec::new();
        let mut by_queue: HashMap<String, Vec<TaskMessage>> = HashMap::new();
        for (m, q) in messages {
            if !by_queue.contains_key(&q) {
                order.push(q.clone());
            }
            by_queue.entry(q).or_default().push(m);
        }
        for q in order {
            if let Some(batch) = by_queue.get(&q) {
                self.send_batch(batch, &q).await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn chain_steps_go_in_reverse_with_frozen_ids() {
        let mut c = Chain::new(vec![
            Signature::new("demo.add", vec![json!(1), json!(2)], Map::new()),
            Signature::new("demo.mul", vec![json!(10)], Map::new()),
            Signature::new("demo.add", vec![json!(5)], Map::new()).immutable(),
        ])
        .unwrap()
        .queue("q");
        let ids = c.freeze();
        let rest: Vec<Value> = c.steps[1..].iter().rev().map(Sig::to_value).collect();
        let call = Call {
            chain: Some(rest),
            ..Call::default()
        };
        let (m, q) = signature_message(&c.steps[0], &call).unwrap();
        assert_eq!(q, "q");
        assert_eq!(m.id(), ids[0]);
        let chain = Sig::list_from_value(&m.embed.chain).unwrap();
        assert_eq!(chain[0].task_id(), Some(ids[2].as_str()));
        assert!(chain[0].immutable);
        assert_eq!(chain[1].task_id(), Some(ids[1].as_str()));
    }

    #[test]
    fn parent_result_is_prepended_unless_immutable() {
        let s = Sig::new("demo.mul", vec![json!(10)], Map::new());
        let r = json!(3);
        let call = Call {
            parent_result: Some(&r),
            parent_id: Some("p"),
            root_id: Some("root"),
            default_queue: Some("dq"),
            ..Call::default()
        };
        let (m, q) = signature_message(&s, &call).unwrap();
        assert_eq!(
            (m.args.clone(), q.as_str()),
            (vec![json!(3), json!(10)], "dq")
        );
        assert_eq!(m.headers.parent_id.as_deref(), Some("p"));
        assert_eq!(m.headers.root_id.as_deref(), Some("root"));
        let mut s = s;
        s.immutable = true;
        let (m, _) = signature_message(&s, &call).unwrap();
        assert_eq!(m.args, vec![json!(10)]);
    }

    #[test]
    fn group_members_carry_group_and_index() {
        let mut g = Group::new(vec![
            Signature::new("demo.add", vec![json!(1), json!(2)], Map::new()),
            Signature::new("demo.add", vec![json!(3), json!(4)], Map::new()),
        ]);
        let gid = g.freeze();
        let (m, _) = signature_message(&g.members[1], &Call::default()).unwrap();
        assert_eq!(m.headers.group.as_deref(), Some(gid.as_str()));
        assert_eq!(m.headers.group_index, Some(1));
    }

    #[test]
    fn links_become_callbacks_and_errbacks() {
        let mut s = Signature::new("demo.add", vec![json!(1), json!(2)], Map::new())
            .link(Signature::new("demo.mul", vec![json!(3)], Map::new()))
            .link_error(Signature::new("demo.echo", vec![], Map::new()));
        s.freeze();
        let (m, _) = signature_message(&s.sig, &Call::default()).unwrap();
        let cbs = Sig::list_from_value(&m.embed.callbacks).unwrap();
        let ebs = Sig::list_from_value(&m.embed.errbacks).unwrap();
        assert_eq!(
            (cbs[0].task.as_str(), ebs[0].task.as_str()),
            ("demo.mul", "demo.echo")
        );
        assert!(
            ebs[0].task_id().is_some(),
            "linked signatures are frozen too"
        );
    }
}
