//! Signatures: the dict form of a task call that Celery nests in `embed` (callbacks, errbacks, chain,
//! chord) — `{"task", "args", "kwargs", "options", "subtask_type", "immutable"}`.

use serde_json::{Map, Value};

use super::fields::kind;
use crate::error::{BrokerError, Result};

/// One task call, possibly a composite (`subtask_type` = chain, group, chord, …).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Signature {
    pub task: String,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    /// Execution options: `task_id`, `queue`, `priority`, `countdown`, `link`, `group_id`, …
    pub options: Map<String, Value>,
    /// `None` for a plain task.
    pub subtask_type: Option<String>,
    /// When true the parent's result is not put in front of `args`.
    pub immutable: bool,
    /// Keys we do not model (e.g. `chord_size` from Celery ≤ 5.0), written back unchanged.
    pub extra: Map<String, Value>,
}

impl Signature {
    /// A plain signature of `task` with arguments.
    pub fn new(task: impl Into<String>, args: Vec<Value>, kwargs: Map<String, Value>) -> Self {
        Signature {
            task: task.into(),
            args,
            kwargs,
            ..Default::default()
        }
    }

    /// Reads a signature from its JSON dict form.
    pub fn from_value(v: &Value) -> Result<Self> {
        let Value::Object(o) = v else {
            return Err(BrokerError::malformed(format_args!(
                "signature: expected an object, got {}",
                kind(v)
            )));
        };
        let mut sig = Signature::default();
        for (k, v) in o {
            match (k.as_str(), v) {
                ("task", Value::String(s)) => sig.task = s.clone(),
                ("args", Value::Array(a)) => sig.args = a.clone(),
                ("args", Value::Null) | ("kwargs", Value::Null) | ("options", Value::Null) => {}
                ("kwargs", Value::Object(m)) => sig.kwargs = m.clone(),
                ("options", Value::Object(m)) => sig.options = m.clone(),
                ("subtask_type", Value::String(s)) => sig.subtask_type = Some(s.clone()),
                ("subtask_type", Value::Null) => sig.subtask_type = None,
                ("immutable", Value::Bool(b)) => sig.immutable = *b,
                ("immutable", Value::Null) => {}
                ("task" | "args" | "kwargs" | "options" | "subtask_type" | "immutable", other) => {
                    return Err(BrokerError::malformed(format_args!(
                        "signature `{k}` has the wrong type ({})",
                        kind(other)
                    )))
                }
                _ => {
                    sig.extra.insert(k.clone(), v.clone());
                }
            }
        }
        if sig.task.is_empty() {
            return Err(BrokerError::malformed("signature has no `task` name"));
        }
        Ok(sig)
    }

    /// Reads a list of signatures (`embed.callbacks`, `embed.chain`, …); null is an empty list.
    pub fn list_from_value(v: &Value) -> Result<Vec<Self>> {
        match v {
            Value::Null => Ok(Vec::new()),
            Value::Array(a) => a.iter().map(Signature::from_value).collect(),
            other => Err(BrokerError::malformed(format_args!(
                "expected a list of signatures, got {}",
                kind(other)
            ))),
        }
    }

    /// The JSON dict form, keys in Celery's order.
    pub fn to_value(&self) -> Value {
        let mut m = Map::new();
        m.insert("task".into(), Value::String(self.task.clone()));
        m.insert("args".into(), Value::Array(self.args.clone()));
        m.insert("kwargs".into(), Value::Object(self.kwargs.clone()));
        m.insert("options".into(), Value::Object(self.options.clone()));
        m.insert(
            "subtask_type".into(),
            self.subtask_type.clone().map_or(Value::Null, Value::String),
        );
        m.insert("immutable".into(), Value::Bool(self.immutable));
        for (k, v) in &self.extra {
            m.insert(k.clone(), v.clone());
        }
        Value::Object(m)
    }

    /// The frozen task id (`options.task_id`), if any.
    pub fn task_id(&self) -> Option<&str> {
        self.options.get("task_id").and_then(Value::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trips_celery_dicts() {
        let v = json!({"task": "proj.tasks.mul", "args": [8], "kwargs": {}, "options": {"task_id": "c3", "reply_to": "8f"},
                       "subtask_type": null, "immutable": false, "chord_size": 2});
        let s = Signature::from_value(&v).unwrap();
        assert_eq!(s.task, "proj.tasks.mul");
        assert_eq!(s.task_id(), Some("c3"));
        assert_eq!(s.extra.get("chord_size"), Some(&json!(2)));
        assert_eq!(s.to_value(), v);
    }

    #[test]
    fn rejects_bad_shapes() {
        assert!(Signature::from_value(&json!([1])).is_err());
        assert!(Signature::from_value(&json!({"args": []})).is_err());
        assert!(Signature::from_value(&json!({"task": "t", "args": "x"})).is_err());
        assert!(Signature::list_from_value(&json!({"task": "t"})).is_err());
        assert_eq!(Signature::list_from_value(&json!(null)).unwrap(), vec![]);
    }
}
