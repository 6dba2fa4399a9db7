//! Task states and the result meta document, in Celery's JSON form.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::error::{BrokerError, Result};
use crate::protocol::time::format_iso;
use crate::pyjson;

/// A task state, as Celery names them. Unknown names are kept as [`State::Custom`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum State {
    Pending,
    Received,
    Started,
    Retry,
    Success,
    Failure,
    Revoked,
    Rejected,
    Custom(String),
}

impl State {
    /// The wire name (`"SUCCESS"`, …).
    pub fn as_str(&self) -> &str {
        match self {
            State::Pending => "PENDING",
            State::Received => "RECEIVED",
            State::Started => "STARTED",
            State::Retry => "RETRY",
            State::Success => "SUCCESS",
            State::Failure => "FAILURE",
            State::Revoked => "REVOKED",
            State::Rejected => "REJECTED",
            State::Custom(s) => s,
        }
    }

    /// Parses a wire name; anything unknown becomes [`State::Custom`].
    pub fn parse(s: &str) -> State {
        match s {
            "PENDING" => State::Pending,
            "RECEIVED" => State::Received,
            "STARTED" => State::Started,
            "RETRY" => State::Retry,
            "SUCCESS" => State::Success,
            "FAILURE" => State::Failure,
            "REVOKED" => State::Revoked,
            "REJECTED" => State::Rejected,
            other => State::Custom(other.to_owned()),
        }
    }

    /// SUCCESS, FAILURE or REVOKED: the task will not change state again.
    pub fn is_ready(&self) -> bool {
        matches!(self, State::Success | State::Failure | State::Revoked)
    }

    /// RETRY, FAILURE or REVOKED: the result is an exception.
    pub fn is_exception(&self) -> bool {
        matches!(self, State::Retry | State::Failure | State::Revoked)
    }

    /// Celery's precedence (higher wins when two states race).
    pub fn precedence(&self) -> u8 {
        match self {
            State::Success => 8,
            State::Failure => 7,
            State::Custom(_) => 6,
            State::Revoked => 5,
            State::Started => 4,
            State::Received => 3,
            State::Rejected => 2,
            State::Retry => 1,
            State::Pending => 0,
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A serialized exception, as Celery's JSON result encoding stores it.
#[derive(Debug, Clone, PartialEq)]
pub struct ExceptionInfo {
    /// Class name (`__qualname__`), e.g. `ZeroDivisionError`.
    pub exc_type: String,
    /// The exception's `args`.
    pub exc_message: Vec<Value>,
    /// Module of the class, e.g. `builtins`.
    pub exc_module: String,
}

impl ExceptionInfo {
    /// An exception with a single message argument.
    pub fn new(
        exc_type: impl Into<String>,
        message: impl Into<String>,
        module: impl Into<String>,
    ) -> Self {
        ExceptionInfo {
            exc_type: exc_type.into(),
            exc_message: vec![Value::String(message.into())],
            exc_module: module.into(),
        }
    }

    /// Python's `repr()` of the exception, as Celery shows it in events and chord errors:
    /// `ValueError('boom')`, `ValueError("it's bad")`, `KeyError('a', 2)`.
    pub fn repr(&self) -> String {
        let args: Vec<String> = self
            .exc_message
            .iter()
            .map(crate::protocol::repr::value_repr)
            .collect();
        format!("{}({})", self.exc_type, args.join(", "))
    }

    /// The JSON object Celery stores as the `result` of a failed task.
    pub fn to_value(&self) -> Value {
        let mut m = Map::new();
        m.insert("exc_type".into(), Value::String(self.exc_type.clone()));
        m.insert("exc_message".into(), Value::Array(self.exc_message.clone()));
        m.insert("exc_module".into(), Value::String(self.exc_module.clone()));
        Value::Object(m)
    }

    /// Reads an exception from a result value; `None` if it is not one.
    pub fn from_value(v: &Value) -> Option<Self> {
        let o = v.as_object()?;
        let exc_type = o.get("exc_type")?.as_str()?.to_owned();
        let exc_message = match o.get("exc_message") {
            Some(Value::Array(a)) => a.clone(),
            Some(Value::Null) | None => Vec::new(),
            Some(other) => vec![other.clone()],
        };
        let exc_module = o
            .get("exc_module")
            .and_then(Value::as_str)
            .unwrap_or("builtins")
            .to_owned();
        Some(ExceptionInfo {
            exc_type,
            exc_message,
            exc_module,
        })
    }

    /// The message as one line: the args joined, strings without quotes.
    pub fn message(&self) -> String {
        self.exc_message
            .iter()
            .map(|v| match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl std::fmt::Display for ExceptionInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.exc_type, self.message())
    }
}

/// One stored state of a task: Celery's result meta document.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskMeta {
    pub task_id: String,
    pub status: State,
    /// The return value; for exception states the serialized exception ([`ExceptionInfo`]).
    pub result: Value,
    pub traceback: Option<String>,
    /// Result tuples of tasks this task sent: a list, or `null` when Celery stored the state outside
    /// a request (e.g. a revoke from the control command).
    pub children: Value,
    /// Set for ready states.
    pub date_done: Option<DateTime<Utc>>,
    /// Other keys, kept in order: `group_id`, `parent_id`, and the extended fields
    /// (`name`, `args`, `kwargs`, `worker`, `retries`, `queue`).
    pub extra: Map<String, Value>,
    /// Where the job's sender listens for replies (its `reply_to` and `correlation_id`): used by
    /// a backend that sends results as messages (`rpc://`), never part of the stored document.
    pub reply: Option<ReplyTo>,
}

/// The reply address of a job: the queue its sender consumes (`reply_to`) and the id to answer
/// with (`correlation_id`, the task id unless the sender chose another).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplyTo {
    pub queue: String,
    pub correlation_id: String,
}

impl TaskMeta {
    /// The meta of a task nothing is known about.
    pub fn pending(task_id: impl Into<String>) -> Self {
        TaskMeta {
            task_id: task_id.into(),
            status: State::Pending,
            result: Value::Null,
            traceback: None,
            children: Value::Array(Vec::new()),
            date_done: None,
            extra: Map::new(),
            reply: None,
        }
    }

    /// A successful result, `date_done` now.
    pub fn success(task_id: impl Into<String>, result: Value) -> Self {
        TaskMeta {
            status: State::Success,
            result,
            date_done: Some(Utc::now()),
            ..TaskMeta::pending(task_id)
        }
    }

    /// A failure, `date_done` now.
    pub fn failure(
        task_id: impl Into<String>,
        exc: &ExceptionInfo,
        traceback: Option<String>,
    ) -> Self {
        TaskMeta {
            status: State::Failure,
            result: exc.to_value(),
            traceback,
            date_done: Some(Utc::now()),
            ..TaskMeta::pending(task_id)
        }
    }

    /// A state with a result; `date_done` is set only if the state is ready.
    pub fn with_state(task_id: impl Into<String>, status: State, result: Value) -> Self {
        let date_done = status.is_ready().then(Utc::now);
        TaskMeta {
            status,
            result,
            date_done,
            ..TaskMeta::pending(task_id)
        }
    }

    /// The exception, for exception states.
    pub fn exception(&self) -> Option<ExceptionInfo> {
        if self.status.is_exception() {
            ExceptionInfo::from_value(&self.result)
        } else {
            None
        }
    }

    /// Celery's JSON document, byte-compatible with what Celery's Redis backend writes.
    pub fn to_json(&self) -> Vec<u8> {
        let mut m = Map::new();
        m.insert(
            "status".into(),
            Value::String(self.status.as_str().to_owned()),
        );
        m.insert("result".into(), self.result.clone());
        m.insert(
            "traceback".into(),
            self.traceback
                .clone()
                .map(Value::String)
                .unwrap_or(Value::Null),
        );
        m.insert("children".into(), self.children.clone());
        m.insert(
            "date_done".into(),
            self.date_done
                .map(|d| Value::String(format_iso(&d.fixed_offset())))
                .unwrap_or(Value::Null),
        );
        for (k, v) in &self.extra {
            m.insert(k.clone(), v.clone());
        }
        m.insert("task_id".into(), Value::String(self.task_id.clone()));
        pyjson::to_vec(&Value::Object(m))
    }

    /// Parses a stored document. `task_id` is used when the document does not name one.
    pub fn from_json(task_id: &str, bytes: &[u8]) -> Result<Self> {
        let v: Value = serde_json::from_slice(bytes).map_err(|e| {
            BrokerError::malformed(format_args!("result meta of {task_id} is not JSON: {e}"))
        })?;
        let Value::Object(mut o) = v else {
            return Err(BrokerError::malformed(format_args!(
                "result meta of {task_id} is not a JSON object"
            )));
        };
        // `shift_remove` keeps the order of the keys left in `extra`.
        let status = match o.shift_remove("status") {
            Some(Value::String(s)) => State::parse(&s),
            _ => {
                return Err(BrokerError::malformed(format_args!(
                    "result meta of {task_id} has no `status` string"
                )))
            }
        };
        let result = o.shift_remove("result").unwrap_or(Value::Null);
        let traceback = match o.shift_remove("traceback") {
            Some(Value::String(s)) => Some(s),
            _ => None,
        };
        let children = match o.shift_remove("children") {
            Some(v @ (Value::Array(_) | Value::Null)) => v,
            _ => Value::Array(Vec::new()),
        };
        let date_done = match o.shift_remove("date_done") {
            Some(Value::String(s)) => crate::protocol::time::parse_iso(&s)
                .ok()
                .map(|d| d.with_timezone(&Utc)),
            _ => None,
        };
        let id = match o.shift_remove("task_id") {
            Some(Value::String(s)) => s,
            _ => task_id.to_owned(),
        };
        Ok(TaskMeta {
            task_id: id,
            status,
            result,
            traceback,
            children,
            date_done,
            extra: o,
            reply: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exceptions_repr_like_python() {
        let e = ExceptionInfo::new("ValueError", "boom", "builtins");
        assert_eq!(e.repr(), "ValueError('boom')");
        let e = ExceptionInfo::new("ValueError", "it's bad", "builtins");
        assert_eq!(e.repr(), r#"ValueError("it's bad")"#);
        let mut e = e;
        e.exc_message = vec![serde_json::json!("a"), serde_json::json!(2)];
        assert_eq!(e.repr(), "ValueError('a', 2)");
    }

    #[test]
    fn states_round_trip_and_readiness() {
        for s in [
            "PENDING", "RECEIVED", "STARTED", "RETRY", "SUCCESS", "FAILURE", "REVOKED", "REJECTED",
            "PROGRESS",
        ] {
            assert_eq!(State::parse(s).as_str(), s);
        }
        assert!(
            State::Success.is_ready() && State::Failure.is_ready() && State::Revoked.is_ready()
        );
        assert!(!State::Started.is_ready() && !State::Retry.is_ready());
        assert!(State::Success.precedence() > State::Failure.precedence());
    }

    #[test]
    fn meta_json_matches_celery_layout() {
        let mut m = TaskMeta::success("abc", serde_json::json!(5));
        m.date_done = Some(
            DateTime::parse_from_rfc3339("2024-05-01T12:00:05.412345+00:00")
                .unwrap()
                .with_timezone(&Utc),
        );
        let s = String::from_utf8(m.to_json()).unwrap();
        assert_eq!(
            s,
            r#"{"status": "SUCCESS", "result": 5, "traceback": null, "children": [], "date_done": "2024-05-01T12:00:05.412345+00:00", "task_id": "abc"}"#
        );
        let back = TaskMeta::from_json("abc", s.as_bytes()).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn failure_carries_exception() {
        let exc = ExceptionInfo::new("ValueError", "bad", "builtins");
        let m = TaskMeta::failure("x", &exc, Some("Traceback".into()));
        assert_eq!(m.exception().unwrap(), exc);
        assert!(TaskMeta::from_json("x", b"[1]").is_err());
        assert!(TaskMeta::from_json("x", b"{\"result\": 1}").is_err());
        assert!(TaskMeta::from_json("x", b"not json").is_err());
    }
}
