//! The built-in demo task set, so `celerity worker` and `celerity demo` work with no code written.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::registry::Registry;
use crate::task::{Handler, TaskContext, TaskError, TaskOptions};

/// `add(x, y)` and `mul(x, y)`: two operands, by position or by name.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Operands {
    x: Value,
    y: Value,
}

/// `xsum(numbers)`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Numbers {
    numbers: Vec<Value>,
}

/// `sleep_ms(ms)` and `spin_ms(ms)`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Millis {
    ms: u64,
}

/// `fail(message)`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Message {
    message: String,
}

/// `flaky(key, failures)`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Flaky {
    key: String,
    failures: u32,
}

/// Registers `demo.add`, `demo.mul`, `demo.xsum`, `demo.echo`, `demo.noop`, `demo.sleep_ms`,
/// `demo.fail`, `demo.flaky`, `demo.spin_ms` and `demo.panic`. Their parameters have the names of
/// the Celery-side signatures (`add(x, y)`, `mul(x, y)`, `xsum(numbers)`, `sleep_ms(ms)`,
/// `fail(message)`, `flaky(key, failures)`, `spin_ms(ms)`), so positional, keyword and mixed calls
/// all bind; an unknown keyword fails the job with a `TypeError`, as in Python.
pub fn register(r: &mut Registry) -> &mut Registry {
    let plain = TaskOptions::default;
    r.register_fn("demo.add", plain(), |_, o: Operands| async move {
        arith(o.x, o.y, |a, b| a + b, |a, b| a.checked_add(b))
    });
    r.register_fn("demo.mul", plain(), |_, o: Operands| async move {
        arith(o.x, o.y, |a, b| a * b, |a, b| a.checked_mul(b))
    });
    r.register_fn("demo.xsum", plain(), |_, n: Numbers| async move {
        n.numbers.into_iter().try_fold(json!(0), |acc, x| {
            arith(acc, x, |a, b| a + b, |a, b| a.checked_add(b))
        })
    });
    r.register_handler("demo.noop", plain(), std::sync::Arc::new(Noop));
    r.register_handler("demo.echo", plain(), std::sync::Arc::new(Echo));
    r.register_fn("demo.sleep_ms", plain(), |ctx, Millis { ms }| async move {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(ms)) => Ok(ms),
            _ = ctx.cancellation().cancelled() => Err(TaskError::new("Cancelled", "sleep interrupted")),
        }
    });
    r.register_fn("demo.fail", plain(), |_, m: Message| async move {
        Err::<Value, _>(TaskError::new("ValueError", m.message))
    });
    let flaky = TaskOptions {
        autoretry_for: vec!["FlakyError".into()],
        max_retries: Some(10),
        default_retry_delay: Duration::from_millis(100),
        ..TaskOptions::default()
    };
    r.register_fn(
        "demo.flaky",
        flaky,
        |ctx, Flaky { key, failures }| async move {
            // Fails on the first `failures` runs of this job (counted by its retries), then succeeds.
            if ctx.retries() < failures {
                Err(TaskError::new(
                    "FlakyError",
                    format!("{key}: failing run {} of {failures}", ctx.retries() + 1),
                ))
            } else {
                Ok(json!({"key": key, "runs": ctx.retries() + 1}))
            }
        },
    );
    r.register_fn("demo.spin_ms", plain(), |_, Millis { ms }| async move {
        // A busy loop that never yields: only a hard time limit (killing the process) stops it early.
        let until = std::time::Instant::now() + Duration::from_millis(ms);
        let mut n: u64 = 0;
        while std::time::Instant::now() < until {
            n = n.wrapping_add(1);
        }
        Ok(n)
    });
    r.register_fn("demo.panic", plain(), |_, ()| async move {
        if std::hint::black_box(true) {
            panic!("demo.panic was asked to panic");
        }
        Ok(Value::Null)
    });
    r
}

/// Integer arithmetic when both are integers (checked), float otherwise; anything else is a TypeError.
fn arith(
    x: Value,
    y: Value,
    f: fn(f64, f64) -> f64,
    i: fn(i64, i64) -> Option<i64>,
) -> Result<Value, TaskError> {
    match (x.as_i64(), y.as_i64()) {
        (Some(a), Some(b)) => i(a, b)
            .map(Value::from)
            .ok_or_else(|| TaskError::new("OverflowError", "integer overflow")),
        _ => match (x.as_f64(), y.as_f64()) {
            (Some(a), Some(b)) => Ok(json!(f(a, b))),
            _ => Err(TaskError::new(
                "TypeError",
                format!("unsupported operand types: {x} and {y}"),
            )),
        },
    }
}

/// `demo.noop(*args, **kwargs)` returns `None`, whatever it is given.
struct Noop;

#[async_trait::async_trait]
impl Handler for Noop {
    async fn call(
        &self,
        _: TaskContext,
        _: Vec<Value>,
        _: Map<String, Value>,
    ) -> Result<Value, TaskError> {
        Ok(Value::Null)
    }
}

/// `demo.echo(*args, **kwargs)` returns `{"args": …, "kwargs": …}`: it takes the raw call.
struct Echo;

#[async_trait::async_trait]
impl Handler for Echo {
    async fn call(
        &self,
        _: TaskContext,
        args: Vec<Value>,
        kwargs: Map<String, Value>,
    ) -> Result<Value, TaskError> {
        Ok(json!({"args": args, "kwargs": kwargs}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use celerity_broker::protocol::TaskHeaders;

    /// Runs demo task `name` with `args` and `kwargs` (a JSON list and object).
    async fn call(name: &str, args: Value, kwargs: Value) -> Result<Value, TaskError> {
        let mut r = Registry::new();
        register(&mut r);
        let task = r.get(name).expect("registered");
        let ctx = TaskContext::detached(TaskHeaders::new(name, "t-1"));
        let args = args.as_array().cloned().unwrap_or_default();
        let kwargs = kwargs.as_object().cloned().unwrap_or_default();
        task.handler.call(ctx, args, kwargs).await
    }

    #[tokio::test]
    async fn demo_tasks_bind_positional_keyword_and_mixed_arguments() {
        let none = json!({});
        assert_eq!(
            call("demo.add", json!([2, 3]), none.clone()).await.unwrap(),
            json!(5)
        );
        assert_eq!(
            call("demo.add", json!([]), json!({"x": 4, "y": 5}))
                .await
                .unwrap(),
            json!(9)
        );
        assert_eq!(
            call("demo.mul", json!([6]), json!({"y": 7})).await.unwrap(),
            json!(42)
        );
        assert_eq!(
            call("demo.xsum", json!([]), json!({"numbers": [1, 2, 3]}))
                .await
                .unwrap(),
            json!(6)
        );
        assert_eq!(
            call("demo.sleep_ms", json!([]), json!({"ms": 1}))
                .await
                .unwrap(),
            json!(1)
        );
        assert_eq!(
            call("demo.spin_ms", json!([0]), none.clone())
                .await
                .unwrap(),
            json!(0)
        );
        assert_eq!(
            call("demo.noop", json!([1]), json!({"a": 2}))
                .await
                .unwrap(),
            Value::Null
        );
        let e = call("demo.fail", json!([]), json!({"message": "boom"}))
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "ValueError: boom");
        let flaky = call("demo.flaky", json!(["k"]), json!({"failures": 0}))
            .await
            .unwrap();
        assert_eq!(flaky, json!({"key": "k", "runs": 1}));
    }

    #[tokio::test]
    async fn unknown_missing_or_doubled_keywords_are_a_type_error() {
        for (args, kwargs, needle) in [
            (
                json!([]),
                json!({"x": 1, "y": 2, "z": 3}),
                "unknown field `z`",
            ),
            (json!([1, 2]), json!({"z": 3}), "unknown field `z`"),
            (json!([1, 2, 3]), json!({"z": 3}), "takes 2 arguments"),
            (
                json!([1]),
                json!({"x": 2}),
                "multiple values for argument `x`",
            ),
            (json!([]), json!({"x": 1}), "missing field `y`"),
            (json!([1, 2, 3]), json!({}), "fewer elements"),
        ] {
            let e = call("demo.add", args, kwargs).await.unwrap_err();
            assert_eq!(e.exc_type(), "TypeError", "{e}");
            assert!(e.to_string().contains(needle), "{needle}: {e}");
        }
    }
}
