//! Worker semantics on the in-process transport: results, failures of every kind, retries, ETA,
//! expiry, time limits, shutdown, no prefetch starvation, and remote control that outlives a failed
//! subscription.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde_json::{json, Map, Value};

use celerity_broker::backend::memory::MemoryBackend;
use celerity_broker::memory::MemoryBroker;
use celerity_broker::message::{Message, Properties};
use celerity_broker::{Broker, ResultBackend, State, TaskMeta};
use celerity_client::{Client, Expires, SendOptions};
use celerity_worker::{demo, run, Registry, Shutdown, Summary, WorkerConfig, DEAD_LETTER_QUEUE};
use tokio::task::JoinHandle;

struct Harness {
    broker: MemoryBroker,
    backend: MemoryBackend,
    client: Client,
    shutdown: Shutdown,
    worker: JoinHandle<celerity_worker::error::Result<Summary>>,
}

const Q: &str = "jobs";

fn start(concurrency: usize) -> Harness {
    let name = uuid::Uuid::new_v4().to_string();
    let broker = MemoryBroker::named(&name);
    let backend = MemoryBackend::named(&name);
    let client = Client::new(Arc::new(broker.clone()), Some(Arc::new(backend.clone())));
    let mut registry = Registry::new();
    demo::register(&mut registry);
    let shutdown = Shutdown::default();
    let config = WorkerConfig {
        queues: vec![Q.into()],
        concurrency,
        grace: Duration::from_secs(5),
        ..WorkerConfig::default()
    };
    let worker = tokio::spawn(run(
        registry,
        Arc::new(broker.clone()),
        Some(Arc::new(backend.clone())),
        config,
        shutdown.clone(),
    ));
    Harness {
        broker,
        backend,
        client,
        shutdown,
        worker,
    }
}

impl Harness {
    async fn call(&self, task: &str, args: Value, options: SendOptions) -> String {
        let args = args.as_array().cloned().unwrap_or_default();
        self.client
            .send_task(task, args, Map::new(), &options.queue(Q))
            .await
            .unwrap()
            .id()
            .to_owned()
    }

    async fn wait(&self, id: &str) -> TaskMeta {
        self.backend
            .wait(id, Some(Duration::from_secs(20)))
            .await
            .unwrap()
    }

    async fn stop(self) -> Summary {
        self.shutdown.warm.cancel();
        self.worker.await.unwrap().unwrap()
    }
}

#[tokio::test]
async fn runs_jobs_and_stores_results() {
    let h = start(4);
    let add = h.call("demo.add", json!([2, 3]), SendOptions::new()).await;
    let echo_id = h
        .client
        .send_task(
            "demo.echo",
            vec![json!(1)],
            json!({"k": "ü"}).as_object().cloned().unwrap(),
            &SendOptions::new().queue(Q),
        )
        .await
        .unwrap();
    assert_eq!(h.wait(&add).await.result, json!(5));
    let echo = echo_id.get(Some(Duration::from_secs(10))).await.unwrap();
    assert_eq!(echo, json!({"args": [1], "kwargs": {"k": "ü"}}));
    let s = h.stop().await;
    assert_eq!(s.succeeded, 2);
}

#[tokio::test]
async fn bad_jobs_fail_cleanly_and_the_worker_goes_on() {
    let h = start(2);
    let unknown = h.call("no.such.task", json!([]), SendOptions::new()).await;
    let wrong = h
        .call("demo.add", json!(["a", {"b": 1}]), SendOptions::new())
        .await;
    let missing = h.call("demo.sleep_ms", json!([]), SendOptions::new()).await;
    let panic = h.call("demo.panic", json!([]), SendOptions::new()).await;
    let fail = h
        .call("demo.fail", json!(["boom"]), SendOptions::new())
        .await;
    // Not JSON: copied to the dead-letter queue, FAILURE stored under its id.
    let mut junk = Message {
        properties: Properties {
            correlation_id: Some("junk-1".into()),
            ..Properties::default()
        },
        ..Message::default()
    };
    junk.headers.insert("task".into(), json!("demo.add"));
    junk.headers.insert("id".into(), json!("junk-1"));
    junk.body = b"{not json".to_vec();
    h.broker.publish(Q, &junk).await.unwrap();
    let mut pickle = junk.clone();
    pickle.properties.content_type = "application/x-python-serialize".into();
    pickle.headers.insert("id".into(), json!("junk-2"));
    h.broker.publish(Q, &pickle).await.unwrap();

    let exc = |m: TaskMeta| {
        (
            m.status.clone(),
            m.exception().map(|e| (e.exc_type.clone(), e.message())),
        )
    };
    assert_eq!(
        exc(h.wait(&unknown).await),
        (
            State::Failure,
            Some(("NotRegistered".into(), "'no.such.task'".into()))
        )
    );
    let (st, e) = exc(h.wait(&wrong).await);
    assert_eq!(
        (st, e.as_ref().map(|e| e.0.as_str())),
        (State::Failure, Some("TypeError"))
    );
    assert_eq!(
        exc(h.wait(&missing).await).1.map(|e| e.0),
        Some("TypeError".to_owned())
    );
    let (_, e) = exc(h.wait(&panic).await);
    assert_eq!(
        e,
        Some(("Panic".into(), "demo.panic was asked to panic".into()))
    );
    let f = h.wait(&fail).await;
    assert_eq!(
        exc(f.clone()),
        (State::Failure, Some(("ValueError".into(), "boom".into())))
    );
    assert!(f.traceback.unwrap_or_default().starts_with("Traceback"));
    assert_eq!(
        exc(h.wait("junk-1").await).1.map(|e| e.0),
        Some("DecodeError".to_owned())
    );
    assert!(exc(h.wait("junk-2").await).1.unwrap().1.contains("pickle"));
    assert_eq!(h.broker.queue_len(DEAD_LETTER_QUEUE).await.unwrap(), 2);
    // Still serving.
    let ok = h.call("demo.mul", json!([6, 7]), SendOptions::new()).await;
    assert_eq!(h.wait(&ok).await.result, json!(42));
    assert_eq!(h.broker.queue_len(Q).await.unwrap(), 0);
    let s = h.stop().await;
    assert_eq!((s.failed, s.rejected), (5, 2));
}

#[tokio::test]
async fn flaky_job_is_retried_then_succeeds() {
    let h = start(2);
    let id = h
        .call("demo.flaky", json!(["k", 3]), SendOptions::new())
        .await;
    let m = h.wait(&id).await;
    assert_eq!(m.status, State::Success);
    assert_eq!(m.result, json!({"key": "k", "runs": 4}));
    let s = h.stop().await;
    assert_eq!((s.retried, s.succeeded), (3, 1));
}

#[tokio::test]
async fn eta_jobs_run_after_their_time_once_and_do_not_block_others() {
    let h = start(1);
    let sent = Utc::now();
    let later = h
        .call(
            "demo.add",
            json!([1, 1]),
            SendOptions::new().countdown(Duration::from_millis(700)),
        )
        .await;
    let now = h.call("demo.add", json!([2, 2]), SendOptions::new()).await;
    let quick = h.wait(&now).await;
    assert!(
        quick.date_done.unwrap() < sent + chrono::Duration::milliseconds(600),
        "a not-yet-due job blocked a due one"
    );
    let m = h.wait(&later).await;
    assert!(
        m.date_done.unwrap() >= sent + chrono::Duration::milliseconds(700),
        "ran early"
    );
    let s = h.stop().await;
    assert_eq!(s.succeeded, 2);
}

#[tokio::test]
async fn expired_jobs_are_revoked_not_run() {
    let h = start(1);
    let id = h
        .call(
            "demo.add",
            json!([1, 1]),
            SendOptions::new().expires(Expires::At(Utc::now() - chrono::Duration::seconds(1))),
        )
        .await;
    let m = h.wait(&id).await;
    assert_eq!(m.status, State::Revoked);
    assert_eq!(h.stop().await.revoked, 1);
}

#[tokio::test]
async fn soft_time_limit_fails_the_job() {
    let h = start(1);
    let id = h
        .call(
            "demo.sleep_ms",
            json!([5000]),
            SendOptions::new().time_limits(None, Some(0.2)),
        )
        .await;
    let m = h.wait(&id).await;
    assert_eq!(
        m.exception().map(|e| e.exc_type),
        Some("SoftTimeLimitExceeded".into())
    );
    h.stop().await;
}

#[tokio::test]
async fn a_long_job_does_not_hold_short_ones_behind_it() {
    let h = start(2);
    let long = h
        .call("demo.sleep_ms", json!([1500]), SendOptions::new())
        .await;
    let shorts: Vec<String> = futures_util::future::join_all(
        (0..5).map(|i| h.call("demo.add", json!([i, 1]), SendOptions::new())),
    )
    .await;
    for s in &shorts {
        assert_eq!(h.wait(s).await.status, State::Success);
    }
    assert_eq!(
        h.backend.get(&long).await.unwrap().status,
        State::Pending,
        "short jobs waited for the long one"
    );
    assert_eq!(h.wait(&long).await.status, State::Success);
    h.stop().await;
}

#[tokio::test]
async fn warm_shutdown_finishes_running_jobs() {
    let h = start(2);
    let id = h
        .call("demo.sleep_ms", json!([400]), SendOptions::new())
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let backend = h.backend.clone();
    let s = h.stop().await;
    assert_eq!(s.succeeded, 1);
    assert_eq!(backend.get(&id).await.unwrap().status, State::Success);
}

#[tokio::test]
async fn cold_shutdown_gives_unfinished_jobs_back() {
    let h = start(2);
    let id = h
        .call("demo.sleep_ms", json!([10_000]), SendOptions::new())
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    h.shutdown.warm.cancel();
    h.shutdown.cold.cancel();
    let s = h.worker.await.unwrap().unwrap();
    assert_eq!(s.succeeded, 0);
    assert_eq!(h.backend.get(&id).await.unwrap().status, State::Pending);
    assert_eq!(
        h.broker.queue_len(Q).await.unwrap(),
        1,
        "the interrupted job is back in its queue"
    );
}

#[tokio::test]
async fn revoked_jobs_are_skipped_and_terminate_stops_running_ones() {
    let h = start(1);
    // The worker is up (and its remote control subscribed) once it has run a job.
    let warm_up = h.call("demo.add", json!([1, 1]), SendOptions::new()).await;
    h.wait(&warm_up).await;
    tokio::time::sleep(Duration::from_millis(50)).await;

    // One slot: the long job holds it, so the second one is still waiting when it is revoked.
    let long = h
        .call("demo.sleep_ms", json!([10_000]), SendOptions::new())
        .await;
    let queued = h.call("demo.add", json!([2, 2]), SendOptions::new()).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    h.client
        .revoke(std::slice::from_ref(&queued), false)
        .await
        .unwrap();
    h.client
        .revoke(std::slice::from_ref(&long), true)
        .await
        .unwrap();

    let m = h.wait(&long).await;
    assert_eq!(m.status, State::Revoked);
    assert_eq!(
        m.exception().map(|e| e.message()),
        Some("terminated".into())
    );
    let m = h.wait(&queued).await;
    assert_eq!(m.status, State::Revoked);
    let s = h.stop().await;
    assert_eq!((s.succeeded, s.revoked), (1, 2));
}

#[tokio::test]
async fn remote_shutdown_stops_the_worker_warm() {
    let h = start(2);
    let warm_up = h.call("demo.add", json!([1, 1]), SendOptions::new()).await;
    h.wait(&warm_up).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let running = h
        .call("demo.sleep_ms", json!([300]), SendOptions::new())
        .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let shutdown = celerity_broker::protocol::control::ControlRequest::cast("shutdown", Map::new());
    h.broker
        .broadcast("celery.pidbox", "", &shutdown.to_message(1))
        .await
        .unwrap();
    let s = tokio::time::timeout(Duration::from_secs(10), h.worker)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        s.succeeded, 2,
        "the running job finished before the worker stopped"
    );
    assert_eq!(
        h.backend.get(&running).await.unwrap().status,
        State::Success
    );
}

/// Defect 16.8: a redelivered chain step whose result is already stored replays the rest of the
/// chain; a backend read that fails for the next step's id used to count as "already sent", so the
/// chain stopped silently. Now the job is given back and the step is sent once the read works.
#[tokio::test]
async fn a_failed_read_during_workflow_replay_does_not_stop_the_chain() {
    let name = uuid::Uuid::new_v4().to_string();
    let broker = MemoryBroker::named(&name);
    let real: Arc<dyn ResultBackend> = Arc::new(MemoryBackend::named(&name));
    let client = Client::new(Arc::new(broker.clone()), Some(real.clone()));
    let sig = |args: Value| {
        celerity_client::Signature::new(
            "demo.add",
            args.as_array().cloned().unwrap_or_default(),
            Map::new(),
        )
    };
    let chain =
        celerity_client::Chain::<Value>::new(vec![sig(json!([1, 1])), sig(json!([10]))]).unwrap();
    let last = client.apply_chain(&chain.queue(Q)).await.unwrap();
    // The first step ran and stored its result, then its worker died before the ack: take the
    // message, store its SUCCESS, give it back (so it comes again as redelivered).
    let mut c = broker.consume(&[Q.to_owned()], 1).await.unwrap();
    let first = c.next().await.unwrap().unwrap();
    let first_id = first.message.task_id().unwrap().to_owned();
    real.store(&TaskMeta::success(&first_id, json!(2)))
        .await
        .unwrap();
    first.reject(true).await.unwrap();
    c.close().await.unwrap();

    let outage = celerity_testsupport::OutageBackend::new(real.clone());
    outage.set_unreadable(last.id(), true);
    let mut registry = Registry::new();
    demo::register(&mut registry);
    let shutdown = Shutdown::default();
    let worker = tokio::spawn(run(
        registry,
        Arc::new(broker.clone()),
        Some(outage.clone() as Arc<dyn ResultBackend>),
        WorkerConfig {
            queues: vec![Q.into()],
            concurrency: 2,
            grace: Duration::from_secs(5),
            ..WorkerConfig::default()
        },
        shutdown.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        outage.refused() > 0,
        "the replay read the next step's state"
    );
    assert_eq!(real.get(last.id()).await.unwrap().status, State::Pending);
    outage.set_unreadable(last.id(), false);
    let m = real
        .wait(last.id(), Some(Duration::from_secs(20)))
        .await
        .expect("the chain went on once the read worked");
    assert_eq!((m.status, m.result), (State::Success, json!(12)));
    shutdown.warm.cancel();
    let s = worker.await.unwrap().unwrap();
    assert_eq!(s.succeeded, 1, "only the second step ran here");
}

/// A memory broker whose first remote-control subscription fails at its first `next()` (as a
/// subscription refused for good on reconnect does); later ones work.
struct FlakySubscriptions {
    inner: MemoryBroker,
    failed: std::sync::atomic::AtomicBool,
}

struct Failing;

#[async_trait::async_trait]
impl celerity_broker::transport::Subscription for Failing {
    async fn next(&mut self) -> celerity_broker::Result<Option<Message>> {
        Err(celerity_broker::BrokerError::ConnectionLost(
            "refused on reconnect".into(),
        ))
    }
}

#[async_trait::async_trait]
impl Broker for FlakySubscriptions {
    fn transport(&self) -> &'static str {
        self.inner.transport()
    }
    async fn declare_queue(&self, queue: &str) -> celerity_broker::Result<()> {
        self.inner.declare_queue(queue).await
    }
    async fn publish(&self, queue: &str, message: &Message) -> celerity_broker::Result<()> {
        self.inner.publish(queue, message).await
    }
    async fn publish_batch(
        &self,
        queue: &str,
        messages: &[Message],
    ) -> celerity_broker::Result<()> {
        self.inner.publish_batch(queue, messages).await
    }
    async fn dead_letter(&self, queue: &str, message: &Message) -> celerity_broker::Result<()> {
        self.inner.dead_letter(queue, message).await
    }
    async fn consume(
        &self,
        queues: &[String],
        prefetch: usize,
    ) -> celerity_broker::Result<Box<dyn celerity_broker::Consumer>> {
        self.inner.consume(queues, prefetch).await
    }
    async fn purge(&self, queue: &str) -> celerity_broker::Result<u64> {
        self.inner.purge(queue).await
    }
    async fn queue_len(&self, queue: &str) -> celerity_broker::Result<u64> {
        self.inner.queue_len(queue).await
    }
    async fn close(&self) -> celerity_broker::Result<()> {
        self.inner.close().await
    }
    async fn broadcast(
        &self,
        exchange: &str,
        routing_key: &str,
        message: &Message,
    ) -> celerity_broker::Result<()> {
        self.inner.broadcast(exchange, routing_key, message).await
    }
    async fn subscribe(
        &self,
        exchange: &str,
        binding_key: &str,
        name: &str,
    ) -> celerity_broker::Result<Box<dyn celerity_broker::transport::Subscription>> {
        use std::sync::atomic::Ordering;
        if exchange == "celery.pidbox" && !self.failed.swap(true, Ordering::SeqCst) {
            return Ok(Box::new(Failing));
        }
        self.inner.subscribe(exchange, binding_key, name).await
    }
}

#[tokio::test]
async fn the_control_listener_subscribes_again_after_its_subscription_fails() {
    let name = uuid::Uuid::new_v4().to_string();
    let memory = MemoryBroker::named(&name);
    let flaky = Arc::new(FlakySubscriptions {
        inner: memory.clone(),
        failed: std::sync::atomic::AtomicBool::new(false),
    });
    let mut registry = Registry::new();
    demo::register(&mut registry);
    let shutdown = Shutdown::default();
    let node = format!("{name}@flaky");
    let config = WorkerConfig {
        queues: vec![Q.into()],
        hostname: node.clone(),
        ..WorkerConfig::default()
    };
    let worker = tokio::spawn(run(registry, flaky, None, config, shutdown.clone()));
    let client = Client::new(Arc::new(memory), None);
    let target = celerity_client::control::Target {
        destination: vec![node.clone()],
        timeout: Duration::from_secs(1),
    };
    let mut answered = false;
    for _ in 0..10 {
        let replies = client
            .control_call("ping", Map::new(), &target)
            .await
            .unwrap();
        if replies.iter().any(|r| r.node == node) {
            answered = true;
            break;
        }
    }
    assert!(
        answered,
        "deaf to remote control after its subscription failed once"
    );
    shutdown.warm.cancel();
    worker.await.unwrap().unwrap();
}
