//! The producer: connects to a broker and an optional result backend, and sends jobs.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use celerity_broker::message::Message;
use celerity_broker::protocol::control::{ControlRequest, PIDBOX_EXCHANGE};
use celerity_broker::protocol::{event, TaskMessage};
use celerity_broker::url::{BrokerUrl, Scheme};
use celerity_broker::{connect_backend_for, connect_broker, Broker, BrokerError, ResultBackend};

use crate::error::{ClientError, Result};
use crate::options::SendOptions;
use crate::result::{outcome, AsyncResult};
use crate::task::{Task, TaskArgs};

/// This process's Lamport clock for control messages and events.
static CLOCK: celerity_broker::protocol::clock::LamportClock =
    celerity_broker::protocol::clock::LamportClock::new();

/// Ticks this process's clock.
pub(crate) fn next_clock() -> u64 {
    CLOCK.forward()
}

/// Most messages one broker round trip carries in [`Client::send_batch`].
const BATCH_CHUNK: usize = 1000;

/// A connected producer. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct Client {
    broker: Arc<dyn Broker>,
    backend: Option<Arc<dyn ResultBackend>>,
    /// Publish a `task-sent` event per job sent (Celery's `task_send_sent_event`).
    sent_events: bool,
}

impl Client {
    /// A client over existing connections.
    pub fn new(broker: Arc<dyn Broker>, backend: Option<Arc<dyn ResultBackend>>) -> Self {
        Client {
            broker,
            backend,
            sent_events: false,
        }
    }

    /// With `on`, every job sent is followed by a `task-sent` event on the `celeryev` exchange
    /// (Celery's `task_send_sent_event`), so Flower shows jobs from the moment they are queued. An
    /// event that cannot be published is logged, never an error of the send.
    pub fn with_sent_events(mut self, on: bool) -> Self {
        self.sent_events = on;
        self
    }

    /// Connects to `broker_url` and, if given, `backend_url`. With no backend URL, a `redis://` or
    /// `memory://` broker doubles as the result backend (the same server), an AMQP broker has none.
    /// A bare `rpc://` backend sends results over the broker's RabbitMQ.
    pub async fn connect(broker_url: &str, backend_url: Option<&str>) -> Result<Self> {
        let broker = connect_broker(broker_url).await?;
        let backend_url = match backend_url {
            Some(u) => Some(u.to_owned()),
            None => default_backend_url(broker_url),
        };
        let backend = match backend_url {
            Some(u) => Some(connect_backend_for(&u, Some(broker_url)).await?),
            None => None,
        };
        Ok(Client::new(broker, backend))
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

    /// Sends a job by task name and waits (at most `timeout`; `None` = forever) for its value: the
    /// `apply_async(...).get()` of Celery in one step. The result is listened for from before the
    /// send, and a result that arrives before the broker's publish confirm is returned at once (the
    /// job ran, so the broker had it); a refused publish is still an error. Errors as
    /// [`AsyncResult::get`].
    pub async fn call_task(
        &self,
        name: &str,
        args: Vec<Value>,
        kwargs: Map<String, Value>,
        options: &SendOptions,
        timeout: Option<Duration>,
    ) -> Result<Value> {
        let message = options.build(name, args, kwargs, Utc::now())?;
        self.call_message(&message, options.queue_name(), timeout)
            .await
    }

    /// [`Client::call_task`] for a typed job.
    pub async fn call<T: Task>(
        &self,
        args: &T::Args,
        options: &SendOptions,
        timeout: Option<Duration>,
    ) -> Result<T::Output> {
        let (a, k) = args.to_call()?;
        let message = options.build(T::NAME, a, k, Utc::now())?;
        self.call_message(&message, options.queue_name(), timeout)
            .await
    }

    async fn call_message<T: DeserializeOwned>(
        &self,
        message: &TaskMessage,
        queue: &str,
        timeout: Option<Duration>,
    ) -> Result<T> {
        let backend = self.backend.as_ref().ok_or(ClientError::NoBackend)?;
        let encoded = self.encode(std::slice::from_ref(message)).await?.remove(0);
        let publish = async {
            self.broker.publish(queue, &encoded).await?;
            self.sent_events(std::slice::from_ref(message), queue).await;
            Ok(())
        };
        match backend
            .wait_after(message.id(), timeout, Box::pin(publish))
            .await
        {
            Ok(meta) => outcome(meta),
            Err(BrokerError::Timeout(d)) => Err(ClientError::Timeout(d)),
            Err(e) => Err(e.into()),
        }
    }

    /// Encodes messages for sending. A backend that takes results as replies (`rpc://`) is told
    /// first (its reply queue exists and listens before any job naming it leaves), and the
    /// messages name its queue as `reply_to`, with `correlation_id` = the task id unless set.
    async fn encode(&self, messages: &[TaskMessage]) -> Result<Vec<Message>> {
        let reply_to = match &self.backend {
            Some(b) => {
                let ids: Vec<&str> = messages.iter().map(TaskMessage::id).collect();
                b.prepare_send(&ids).await?
            }
            None => None,
        };
        Ok(messages
            .iter()
            .map(|m| {
                let mut encoded = m.encode();
                if let Some(q) = &reply_to {
                    encoded.properties.reply_to = Some(q.clone());
                    encoded
                        .properties
                        .correlation_id
                        .get_or_insert_with(|| m.id().to_owned());
                }
                encoded
            })
            .collect())
    }

    /// Publishes an already built task message to `queue`.
    pub async fn send_message(&self, message: &TaskMessage, queue: &str) -> Result<()> {
        let encoded = self.encode(std::slice::from_ref(message)).await?;
        for m in &encoded {
            self.broker.publish(queue, m).await?;
        }
        self.sent_events(std::slice::from_ref(message), queue).await;
        Ok(())
    }

    /// Publishes many task messages to `queue` in as few round trips as the broker allows.
    /// Returns once the broker holds all of them.
    pub async fn send_batch(&self, messages: &[TaskMessage], queue: &str) -> Result<()> {
        for chunk in messages.chunks(BATCH_CHUNK) {
            let encoded = self.encode(chunk).await?;
            self.broker.publish_batch(queue, &encoded).await?;
            self.sent_events(chunk, queue).await;
        }
        Ok(())
    }

    /// Publishes `task-sent` for `messages` if enabled (see [`Client::with_sent_events`]).
    async fn sent_events(&self, messages: &[TaskMessage], queue: &str) {
        if !self.sent_events {
            return;
        }
        let node = celerity_broker::protocol::node::producer_nodename();
        for chunk in messages.chunks(100) {
            let events = chunk.iter().map(|m| sent_event(m, queue, node)).collect();
            let Some((key, message)) = event::to_message(node, events) else {
                continue;
            };
            if let Err(e) = self
                .broker
                .broadcast(event::EVENT_EXCHANGE, &key, &message)
                .await
            {
                tracing::warn!(error = %e, "could not publish task-sent events");
            }
        }
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
        let clock = next_clock();
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

/// The `task-sent` event of `m` sent to `queue` (the fields Celery's producer puts in it).
fn sent_event(m: &TaskMessage, queue: &str, node: &str) -> Map<String, Value> {
    let h = &m.headers;
    let opt = |v: &Option<String>| v.clone().map_or(Value::Null, Value::String);
    let time = |v: Option<chrono::DateTime<chrono::FixedOffset>>| {
        v.map_or(Value::Null, |t| Value::String(t.to_rfc3339()))
    };
    let mut f = Map::new();
    f.insert("uuid".into(), Value::String(h.id.clone()));
    f.insert("root_id".into(), opt(&h.root_id));
    f.insert("parent_id".into(), opt(&h.parent_id));
    f.insert("name".into(), Value::String(h.task.clone()));
    let args = m.args_repr();
    let kwargs = m.kwargs_repr();
    f.insert("args".into(), Value::String(args));
    f.insert("kwargs".into(), Value::String(kwargs));
    f.insert("retries".into(), Value::from(h.retries));
    f.insert("eta".into(), time(h.eta));
    f.insert("expires".into(), time(h.expires));
    f.insert("queue".into(), Value::String(queue.to_owned()));
    f.insert("exchange".into(), Value::String(String::new()));
    f.insert("routing_key".into(), Value::String(queue.to_owned()));
    event::event("task-sent", node, next_clock(), f)
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
        Scheme::Amqp | Scheme::Postgres => None,
    }
}
