//! An application's own worker: declare tasks, register them, hand the registry to
//! `celerity::worker_main`. It takes the same flags as `celerity worker`:
//!
//! ```sh
//! cargo run -p celerity-examples --bin app_worker -- --broker redis://127.0.0.1:6379/0 -Q celery -c 32 -P 2
//! celerity --broker redis://127.0.0.1:6379/0 call app.add --args '[2, 3]' --wait          # → 5
//! celerity --broker redis://127.0.0.1:6379/0 call app.greet --kwargs '{"name": "Ada"}' --wait
//! ```
//!
//! Python Celery reaches the same tasks by name, with arguments by position, by name or both:
//! `app.send_task("app.add", (2, 3))`, `app.send_task("app.add", kwargs={"x": 2, "y": 3})`,
//! `app.send_task("app.add", (2,), {"y": 3})`. An unknown keyword fails the job with a `TypeError`.

use std::process::ExitCode;

use celerity::prelude::*;
use serde::{Deserialize, Serialize};

/// A typed task: its name, argument and output types, and its code.
struct Add;

/// `add(x, y)`: named parameters, so Python's `add.delay(2, 3)`, `add.delay(x=2, y=3)` and
/// `add.delay(2, y=3)` all bind; `deny_unknown_fields` makes `add.delay(2, 3, z=1)` a `TypeError`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AddArgs {
    x: i64,
    y: i64,
}

impl Task for Add {
    const NAME: &'static str = "app.add";
    type Args = AddArgs;
    type Output = i64;
}

impl Run for Add {
    async fn run(&self, _ctx: TaskContext, AddArgs { x, y }: AddArgs) -> Result<i64, TaskError> {
        x.checked_add(y)
            .ok_or_else(|| TaskError::new("OverflowError", "sum does not fit in 64 bits"))
    }
}

/// Arguments by name: `greet(name="Ada")` from Python, or positionally `greet("Ada")`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
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
