//! Task name → handler and options. No I/O.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::task::{FnHandler, Handler, Run, RunHandler, TaskContext, TaskError, TaskOptions};

/// One registered task.
#[derive(Clone)]
pub struct Registered {
    pub handler: Arc<dyn Handler>,
    pub options: TaskOptions,
}

/// The tasks a worker can run.
#[derive(Clone, Default)]
pub struct Registry {
    tasks: HashMap<String, Registered>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a typed task.
    pub fn register<T: Run>(&mut self, task: T) -> &mut Self {
        let options = task.options();
        self.tasks.insert(
            T::NAME.to_owned(),
            Registered {
                handler: Arc::new(RunHandler(task)),
                options,
            },
        );
        self
    }

    /// Registers an async function as task `name`: `|ctx, (x, y): (i64, i64)| async move { Ok(x + y) }`.
    pub fn register_fn<F, A, O, Fut>(&mut self, name: &str, options: TaskOptions, f: F) -> &mut Self
    where
        F: Fn(TaskContext, A) -> Fut + Send + Sync + 'static,
        A: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        Fut: Future<Output = Result<O, TaskError>> + Send + 'static,
    {
        let handler = FnHandler {
            name: name.to_owned(),
            f,
            _args: std::marker::PhantomData,
        };
        self.tasks.insert(
            name.to_owned(),
            Registered {
                handler: Arc::new(handler),
                options,
            },
        );
        self
    }

    /// Registers a handler that takes the raw JSON call.
    pub fn register_handler(
        &mut self,
        name: &str,
        options: TaskOptions,
        handler: Arc<dyn Handler>,
    ) -> &mut Self {
        self.tasks
            .insert(name.to_owned(), Registered { handler, options });
        self
    }

    /// The task registered as `name`.
    pub fn get(&self, name: &str) -> Option<&Registered> {
        self.tasks.get(name)
    }

    /// Registered names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut n: Vec<&str> = self.tasks.keys().map(String::as_str).collect();
        n.sort_unstable();
        n
    }

    /// Changes a task's options in place (e.g. from a remote `rate_limit` command).
    pub fn options_mut(&mut self, name: &str) -> Option<&mut TaskOptions> {
        self.tasks.get_mut(name).map(|r| &mut r.options)
    }
}
