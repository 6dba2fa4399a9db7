//! The built-in demo task set, so `celerity worker` and `celerity demo` work with no code written.

use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::registry::Registry;
use crate::task::{Handler, TaskContext, TaskError, TaskOptions};

/// Registers `demo.add`, `demo.mul`, `demo.xsum`, `demo.echo`, `demo.noop`, `demo.sleep_ms`,
/// `demo.fail`, `demo.flaky`, `demo.spin_ms` and `demo.panic`.
pub fn register(r: &mut Registry) -> &mut Registry {
    let plain = TaskOptions::default;
    r.register_fn("demo.add", plain(), |_, (x, y): (Value, Value)| async move { arith(x, y, |a, b| a + b, |a, b| a.checked_add(b)) });
    r.register_fn("demo.mul", plain(), |_, (x, y): (Value, Value)| async move { arith(x, y, |a, b| a * b, |a, b| a.checked_mul(b)) });
    r.register_fn("demo.xsum", plain(), |_, (xs,): (Vec<Value>,)| async move {
        xs.into_iter().try_fold(json!(0), |acc, x| {
            arith(acc, x, |a, b| a + b, |a, b| a.checked_add(b))
        })
    });
    r.register_fn("demo.noop", plain(), |_, _: Value| async move {
        Ok(Value::Null)
    });
    r.register_handler("demo.echo", plain(), std::sync::Arc::new(Echo));
    r.register_fn("demo.sleep_ms", plain(), |ctx, (ms,): (u64,)| async move {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(ms)) => Ok(ms),
            _ = ctx.cancellation().cancelled() => Err(TaskError::new("Cancelled", "sleep interrupted")),
        }
    });
    r.register_fn("demo.fail", plain(), |_, (message,): (String,)| async move { Err::<Value, _>(TaskError::new("ValueError", message)) });
    let flaky = TaskOptions {
        autoretry_for: vec!["FlakyError".into()],
        max_retries: Some(10),
        default_retry_delay: Duration::from_millis(100),
        ..TaskOptions::default()
    };
    r.register_fn(
        "demo.flaky",
        flaky,
        |ctx, (key, failures): (String, u32)| async move {
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
    r.register_fn("demo.spin_ms", plain(), |_, (ms,): (u64,)| async move {
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
