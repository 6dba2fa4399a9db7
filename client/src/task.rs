//! Typed task declarations, shared by producers and workers.
//!
//! A [`Task`] names a task and fixes its argument and output types, so `client.send::<Add>((2, 3))`
//! is checked at compile time and its result comes back as an `i64`. Arguments map onto Celery's
//! `[args, kwargs]`: a tuple or list becomes positional `args`, a struct (a JSON object) becomes
//! `kwargs` by field name, `()` sends nothing, and any other value is one positional argument.

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::{ClientError, Result};

/// A task's declaration: its registered name and its argument and output types.
pub trait Task: Send + Sync + 'static {
    /// The registered name, e.g. `"demo.add"` (what Celery calls the task name).
    const NAME: &'static str;
    /// The arguments (see the module doc for how they map to `args`/`kwargs`).
    type Args: Serialize + DeserializeOwned + Send + 'static;
    /// What the task returns.
    type Output: Serialize + DeserializeOwned + Send + 'static;
}

/// Splits typed arguments into Celery's positional and keyword arguments.
pub trait TaskArgs {
    /// `(args, kwargs)` as they go in the message body.
    fn to_call(&self) -> Result<(Vec<Value>, Map<String, Value>)>;
}

impl<T: Serialize + ?Sized> TaskArgs for T {
    fn to_call(&self) -> Result<(Vec<Value>, Map<String, Value>)> {
        let v = serde_json::to_value(self)
            .map_err(|e| ClientError::Serde(format!("cannot serialize task arguments: {e}")))?;
        Ok(match v {
            Value::Null => (Vec::new(), Map::new()),
            Value::Array(a) => (a, Map::new()),
            Value::Object(o) => (Vec::new(), o),
            other => (vec![other], Map::new()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(Serialize)]
    struct Named {
        x: i32,
        y: i32,
    }

    #[test]
    fn arguments_map_to_args_and_kwargs() {
        assert_eq!(
            (2, 3).to_call().unwrap(),
            (vec![json!(2), json!(3)], Map::new())
        );
        assert_eq!(().to_call().unwrap(), (vec![], Map::new()));
        assert_eq!(5.to_call().unwrap(), (vec![json!(5)], Map::new()));
        let (a, k) = Named { x: 1, y: 2 }.to_call().unwrap();
        assert!(a.is_empty());
        assert_eq!(Value::Object(k), json!({"x": 1, "y": 2}));
    }
}
