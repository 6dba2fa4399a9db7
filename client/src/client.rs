//! The producer: connects to a broker and an optional result backend, and sends jobs.

use std::marker::PhantomData;
use std::sync::Arc;

use chrono::Utc;
use serde_json::{Map, Value};

use celerity_broker::protocol::control::{ControlRequest, PIDBOX_EXCHANGE};
use celerity_broker::protocol::TaskMessage;
use celerity_broker::url::{BrokerUrl, Scheme};
use celerity_broker::{connect_backend, connect_broker, Broker, ResultBackend};

use crate::error::Result;
use crate::options::SendOptions;
use crate::result::AsyncResult;
use crate::task::{Task, TaskArgs};

/// This process's Lamport clock for control messages.
static CLOCK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Most messages one broker round trip carries in [`Client::send_batch`].
const BATCH_CHUNK: usize = 1000;

/// A connected producer. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct Client {
    broker: Arc<dyn Broker>,
    backend: Option<Arc<dyn ResultBackend>>,
}

impl Client {
    /// A client over existing connections.
    pub fn new(broker: Arc<dyn Broker>, backend: Option<Arc<dyn ResultBackend>>) -> Self {
        Client { broker, backend }
    }

    /// Connects to `broker_url` and, if given, `backend_url`. With no backend URL, a `redis://` or
    /// `memory://` broker doubles as the result backend (the same server), an AMQP broker has none.
    pub async fn connect(broker_url: &str, backend_url: Option<&str>) -> Result<Self> {
        let broker = connect_broker(broker_url).await?;
        let backend_url = match backend_url {
            Some(u) => Some(u.to_owned()),
            None => default_backend_url(broker_url),
        };
        let backend = match backend_url {
            Some(u) => Some(connect_backend(&u).await?),
            None => None,
        };
        Ok(Client { broker, backend })
    }

    /// The broker this client sends to.
    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.broker
    }

    /// The result backend, if one is configured.
    pub fn backend(&self) -> Option<&Arc<dyn ResultBackend>> {
        self.backend.as_ref()
    }

    /// Sends a job by task name. Returns once the broker holds the message.
    pub async fn send_task(
        &self,
        name: &str,
        args: Vec<Value>,
        kwargs: Map<String, Value>,
        options: &SendOptions,
    ) -> Result<AsyncResult<Value>> {
        let message = options.build(name, args, kwargs, Utc::now())?;
        self.send_message(&message, options.queue_name()).await?;
        Ok(self.result(message.id()))
    }

    /// Sends a typed job: `client.send::<Add>(&(2, 3), &SendOptions::new())`.
    pub async fn send<T: Task>(
        &self,
        args: &T::Args,
        options: &SendOptions,
    ) -> Result<AsyncResult<T::Output>> {
        let (a, k) = args.to_call()?;
        let message = options.build(T::NAME, a, k, Utc::now())?;
        self.send_message(&message, options.queue_name()).await?;
        Ok(self.result(message.id()))
    }

    /// Publishes an already built task message to `queue`.
    pub async fn send_message(&self, message: &TaskMessage, queue: &str) -> Result<()> {
        self.broker.publish(queue, &message.encode()).await?;
        Ok(())
    }

    /// Publishes many task messages to `queue` in as few round trips as the broker allows.
    /// Returns once the broker holds all of them.
    pub async fn send_batch(&self, messages: &[TaskMessage], queue: &str) -> Result<()> {
        for chunk in messages.chunks(BATCH_CHUNK) {
            let encoded: Vec<_> = chunk.iter().map(TaskMessage::encode).collect();
            self.broker.publish_batch(queue, &encoded).await?;
        }
        Ok(())
    }

    /// Revokes jobs on every worker (Celery's `app.control.revoke`): a job not started yet is skipped
    /// and stored as REVOKED; with `terminate`, a running one is stopped too. Workers keep the ids in
    /// memory; a worker started after this does not know them.
    pub async fn revoke(&self, task_ids: &[String], terminate: bool) -> Result<()> {
        let mut args = Map::new();
        args.insert(
            "task_id".into(),
            match task_ids {
                [one] => Value::String(one.clone()),
                many => Value::Array(many.iter().cloned().map(Value::String).collect()),
            },
        );
        args.insert("terminate".into(), Value::Bool(terminate));
        args.insert("signal".into(), Value::String("SIGTERM".into()));
        let request = ControlRequest::cast("revoke", args);
        let clock = CLOCK.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        self.broker
            .broadcast(PIDBOX_EXCHANGE, "", &request.to_message(clock))
            .await?;
        Ok(())
    }

    /// A handle on the result of the job with id `task_id`.
    pub fn result<T>(&self, task_id: &str) -> AsyncResult<T> {
        AsyncResult {
            id: task_id.to_owned(),
            backend: self.backend.clone(),
            _output: PhantomData,
        }
    }

    /// Closes the broker and backend connections.
    pub async fn close(&self) -> Result<()> {
        self.broker.close().await?;
        if let Some(b) = &self.backend {
            b.close().await?;
        }
        Ok(())
    }
}

/// The result backend a broker URL implies when none is given: the same Redis (keeping its
/// `global_keyprefix`) or the same `memory://`; none for AMQP.
pub fn default_backend_url(broker_url: &str) -> Option<String> {
    match BrokerUrl::parse(broker_url).ok()?.scheme {
        Scheme::Memory => Some(broker_url.to_owned()),
        Scheme::Redis => {
            // Broker-only options (visibility_timeout, …) mean nothing to the backend; keep the prefix.
            let url = BrokerUrl::parse(broker_url).ok()?;
            let mut base = url.base.clone();
            if let Ok(Some(prefix)) = url.option::<String>("global_keyprefix") {
                base.query_pairs_mut()
                    .append_pair("global_keyprefix", &prefix);
            }
            Some(base.to_string())
        }
        Scheme::Amqp => None,
    }
}
