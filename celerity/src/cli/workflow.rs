//! `celerity call --workflow JSON`: sends a chain, group or chord described in JSON, prints the ids,
//! and with `--wait` the final result.
//!
//! The description is one of:
//! - a task: `{"task": "demo.add", "args": [1, 2], "kwargs": {}, "immutable": false, "options": {}}`
//! - `{"chain": [node, node, …]}`: prints each step's id; the last one is the chain's result
//! - `{"group": [node, …]}`: prints the group id, then each member's id
//! - `{"chord": {"header": [node, …], "body": node}}`: prints the group id, the members' ids, and
//!   the body's id (the chord's result)
//!
//! where a node is a task or, nested, another chain, group or chord (a group as a chain step, a
//! chain as a group member or chord body, …), applied as Celery applies nested canvases. A chain
//! ending in a group prints the group's ids, and `--wait` prints the list of its results.

use std::process::ExitCode;
use std::time::Duration;

use serde_json::{Map, Value};

use celerity_client::{chord, Chain, Client, ClientError, Group, Signature, WorkflowResult};

type Result<T, E = ClientError> = std::result::Result<T, E>;

/// A parsed `--workflow` description.
#[derive(Debug)]
enum Workflow {
    Task(Signature),
    Chain(Vec<Signature>),
    Group(Vec<Signature>),
    Chord(Vec<Signature>, Signature),
}

fn bad(why: impl Into<String>) -> ClientError {
    ClientError::InvalidArgument(format!("--workflow: {}", why.into()))
}

fn task(v: &Value) -> Result<Signature> {
    let Value::Object(o) = v else {
        return Err(bad(format!("expected a task object, got {v}")));
    };
    let name = o
        .get("task")
        .and_then(Value::as_str)
        .ok_or_else(|| bad(format!("a task needs a \"task\" name: {v}")))?;
    let args = match o.get("args") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(other) => return Err(bad(format!("\"args\" must be a list, got {other}"))),
    };
    let kwargs = match o.get("kwargs") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(other) => return Err(bad(format!("\"kwargs\" must be an object, got {other}"))),
    };
    let mut s = Signature::new(name, args, kwargs);
    if let Some(Value::Object(opts)) = o.get("options") {
        for (k, v) in opts {
            s = s.option(k, v.clone());
        }
    }
    if o.get("immutable").and_then(Value::as_bool) == Some(true) {
        s = s.immutable();
    }
    Ok(s)
}

/// A task, or a nested chain / group / chord.
fn node(v: &Value) -> Result<Signature> {
    if let Some(steps) = v.get("chain") {
        let steps = tasks(steps, "chain")?;
        return Ok(Chain::new(steps)
            .map_err(|_| bad("a chain needs at least one step"))?
            .into());
    }
    if let Some(members) = v.get("group") {
        return Ok(Group::new(tasks(members, "group")?).into());
    }
    if let Some(c) = v.get("chord") {
        let (header, body) = chord_parts(c)?;
        return Ok(chord(Group::new(header), body).into());
    }
    task(v)
}

fn chord_parts(c: &Value) -> Result<(Vec<Signature>, Signature)> {
    let header = tasks(c.get("header").unwrap_or(&Value::Null), "chord.header")?;
    let body = node(
        c.get("body")
            .ok_or_else(|| bad("a chord needs a \"body\""))?,
    )?;
    Ok((header, body))
}

fn tasks(v: &Value, what: &str) -> Result<Vec<Signature>> {
    v.as_array()
        .ok_or_else(|| bad(format!("\"{what}\" must be a list of tasks")))?
        .iter()
        .map(node)
        .collect()
}

impl Workflow {
    /// Parses the JSON text of `--workflow`.
    fn parse(text: &str) -> Result<Self> {
        let v: Value =
            serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        if let Some(steps) = v.get("chain") {
            let steps = tasks(steps, "chain")?;
            if steps.is_empty() {
                return Err(bad("a chain needs at least one step"));
            }
            return Ok(Workflow::Chain(steps));
        }
        if let Some(members) = v.get("group") {
            return Ok(Workflow::Group(tasks(members, "group")?));
        }
        if let Some(c) = v.get("chord") {
            let (header, body) = chord_parts(c)?;
            return Ok(Workflow::Chord(header, body));
        }
        Ok(Workflow::Task(task(&v)?))
    }
}

fn ends_in_group(steps: &[Signature]) -> bool {
    steps
        .last()
        .is_some_and(|s| s.to_value()["subtask_type"] == "group")
}

/// Sends the workflow to `queue` (for every task that names no queue), prints its ids, and with
/// `wait` its result (a group's: the list of results).
pub(crate) async fn run(
    client: &Client,
    text: &str,
    queue: &str,
    wait: bool,
    timeout: Option<Duration>,
) -> Result<ExitCode> {
    let (handle, group) = match Workflow::parse(text)? {
        Workflow::Task(s) => {
            let r = client.apply(&s.queue_default(queue)).await?;
            println!("{}", r.id());
            (Some(r), None)
        }
        Workflow::Chain(steps) if ends_in_group(&steps) => {
            let c: Signature = Chain::new(steps)?.queue(queue).into();
            match client.apply_workflow(&c).await? {
                WorkflowResult::Group(g) => {
                    println!("group: {}", g.id());
                    for (i, id) in g.ids().iter().enumerate() {
                        println!("member {i}: {id}");
                    }
                    (None, Some(g))
                }
                WorkflowResult::Task(r) => {
                    println!("{}", r.id());
                    (Some(r), None)
                }
            }
        }
        Workflow::Chain(steps) => {
            let mut c = Chain::new(steps)?.queue(queue);
            let ids = c.freeze();
            let r = client.apply_chain(&c).await?;
            for (i, id) in ids.iter().enumerate() {
                println!("step {i}: {id}");
            }
            (Some(r), None)
        }
        Workflow::Group(members) => {
            let g = client
                .apply_group(&Group::new(members).queue(queue))
                .await?;
            println!("group: {}", g.id());
            for (i, id) in g.ids().iter().enumerate() {
                println!("member {i}: {id}");
            }
            (None, Some(g))
        }
        Workflow::Chord(header, body) => {
            let c = client
                .apply_chord(&chord(Group::new(header), body).queue(queue))
                .await?;
            println!("group: {}", c.header.id());
            for (i, id) in c.header.ids().iter().enumerate() {
                println!("member {i}: {id}");
            }
            println!("body: {}", c.body.id());
            (Some(c.body), None)
        }
    };
    if !wait {
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(g) = group {
        return match g.get(timeout).await {
            Ok(values) => {
                println!("{}", Value::Array(values));
                Ok(ExitCode::SUCCESS)
            }
            Err(e @ ClientError::GroupFailed { .. }) => {
                eprintln!("{e}");
                Ok(ExitCode::FAILURE)
            }
            Err(e) => Err(e),
        };
    }
    match handle {
        Some(h) => {
            let meta = h.wait_meta(timeout).await?;
            super::producer::print_outcome(meta, false)
        }
        None => Ok(ExitCode::SUCCESS),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_shape_and_names_mistakes() {
        let w = Workflow::parse(
            r#"{"chain": [{"task": "demo.add", "args": [1, 2]}, {"task": "demo.mul", "args": [10], "immutable": true}]}"#,
        )
        .unwrap();
        assert!(matches!(w, Workflow::Chain(ref s) if s.len() == 2));
        let w = Workflow::parse(
            r#"{"chord": {"header": [{"task": "demo.add", "args": [1, 1]}], "body": {"task": "demo.echo"}}}"#,
        )
        .unwrap();
        assert!(
            matches!(w, Workflow::Chord(ref h, ref b) if h.len() == 1 && b.task() == "demo.echo")
        );
        assert!(matches!(
            Workflow::parse(r#"{"group": []}"#).unwrap(),
            Workflow::Group(_)
        ));
        let w = Workflow::parse(
            r#"{"chain": [{"task": "demo.add", "args": [1, 1]}, {"group": [{"task": "demo.add", "args": [1]}, {"chain": [{"task": "demo.add", "args": [2]}, {"task": "demo.mul", "args": [3]}]}]}, {"chord": {"header": [{"task": "demo.add", "args": [1]}], "body": {"chain": [{"task": "demo.xsum"}]}}}]}"#,
        )
        .unwrap();
        let Workflow::Chain(steps) = w else {
            panic!("expected a chain")
        };
        let kinds: Vec<Value> = steps
            .iter()
            .map(|s| s.to_value()["subtask_type"].clone())
            .collect();
        assert_eq!(kinds, vec![Value::Null, "group".into(), "chord".into()]);
        let group = steps[1].to_value();
        assert_eq!(group["kwargs"]["tasks"][1]["subtask_type"], "chain");
        assert_eq!(
            steps[2].to_value()["kwargs"]["body"]["subtask_type"],
            "chain"
        );
        for (text, expect) in [
            ("[1]", "expected a task object"),
            (r#"{"chain": []}"#, "at least one step"),
            (r#"{"chain": [{"args": []}]}"#, "\"task\" name"),
            (r#"{"task": "t", "args": 5}"#, "\"args\" must be a list"),
            (r#"{"chord": {"header": []}}"#, "needs a \"body\""),
            ("{", "not valid JSON"),
        ] {
            let e = Workflow::parse(text).unwrap_err().to_string();
            assert!(e.contains(expect), "{text}: {e}");
        }
    }
}
