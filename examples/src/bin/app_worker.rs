//! An application's own worker: declare tasks, register them, hand the registry to
//! `celerity::worker_main`. It takes the same flags as `celerity worker`:
//!
//! ```sh
//! cargo run -p celerity-examples --bin app_worker -- --broker redis://127.0.0.1:6379/0 -Q celery -c 32 -P 2
//! celerity --broker redis://127.0.0.1:6379/0 call app.add --args '[2, 3]' --wait          # → 5
//! celerity --broker redis://127.0.0.1:6379/0 call app.greet --kwargs '{"name": "Ada"}' --wait
//! ```
//!
//! Python Celery reaches the same tasks by name: `app.send_task("app.add", (2, 3)).get()`.

use std::process::ExitCode;

use celerity::prelude::*;
use serde::Deserialize;

/// A typed task: its name, argument and output types, and its code.
struct Add;

impl Task for Add {
    const NAME: &'static str = "app.add";
    type Args = (i64, i64);
    type Output = i64;
}

impl Run for Add {
    async fn run(&self, _ctx: TaskContext, (x, y): (i64, i64)) -> Result<i64, TaskError> {
        x.checked_add(y)
            .ok_or_else(|| TaskError::new("OverflowError", "sum does not fit in 64 bits"))
    }
}

/// Arguments by name: `greet(name="Ada")` from Python, or positionally `greet("Ada")`.
#[derive(Deserialize)]
struct Greet {
    name: String,
}

fn main() -> ExitCode {
    let mut registry = Registry::new();
    registry.register(Add);
    registry.register_fn("app.greet", TaskOptions::default(), |ctx: TaskContext, g: Greet| async move {
        Ok(format!("hello {} (job {})", g.name, ctx.id()))
    });
    celerity::worker_main(registry)
}
