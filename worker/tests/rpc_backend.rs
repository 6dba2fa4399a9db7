//! The `rpc://` result backend with our client and worker on the real RabbitMQ: values, failures,
//! retries and STARTED reach the client that sent the job (and only it), a chord is refused before
//! anything is sent, results for ids nobody waits on are bounded with a clear error, and a reply
//! whose correlation id disagrees with its body is filed under neither id.
//!
//! Each test uses its own task queue (deleted by a guard, also on failure); the reply queues are
//! auto-deleted by RabbitMQ when their client closes.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Map, Value};

use celerity_broker::backend::ReplyTo;
use celerity_broker::{
    connect_backend_for, connect_broker, BrokerError, ResultBackend, State, TaskMeta,
};
use celerity_client::canvas::{chord, Group, Signature};
use celerity_client::{Client, ClientError, SendOptions};
use celerity_testsupport::{demo_registry, unique, Cleanup, InProcessWorker, AMQP};
use celerity_worker::{TaskOptions, WorkerConfig};

const WAIT: Option<Duration> = Some(Duration::from_secs(30));

async fn rpc(url: &str) -> Arc<dyn ResultBackend> {
    connect_backend_for(url, Some(AMQP)).await.unwrap()
}

#[derive(Deserialize)]
struct Ms {
    ms: u64,
}

#[tokio::test]
async fn our_client_reads_what_our_worker_sends_on_rpc() {
    let queue = unique("rpc-jobs");
    let _guard = Cleanup::new().amqp_queue(queue.clone());
    let broker = connect_broker(AMQP).await.unwrap();
    let client_backend = rpc("rpc://").await;
    let client = Client::new(broker.clone(), Some(client_backend.clone()));
    let mut registry = demo_registry();
    let tracked = TaskOptions {
        track_started: true,
        ..TaskOptions::default()
    };
    registry.register_fn("rpc.tracked_sleep", tracked, |_, Ms { ms }| async move {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok::<_, celerity_worker::TaskError>(json!("slept"))
    });
    let worker = InProcessWorker::spawn(
        registry,
        broker.clone(),
        Some(rpc("rpc://?result_persistent=true").await),
        WorkerConfig {
            queues: vec![queue.clone()],
            concurrency: 8,
            ..WorkerConfig::default()
        },
    );
    let options = SendOptions::new().queue(&queue);

    // A batch whose results arrive before anyone waits: none is lost, each under its own id.
    let batch: Vec<_> = (0..300)
        .map(|i| {
            options
                .build(
                    "demo.add",
                    vec![json!(i), json!(1)],
                    Map::new(),
                    chrono::Utc::now(),
                )
                .unwrap()
        })
        .collect();
    client.send_batch(&batch, &queue).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (i, m) in batch.iter().enumerate().rev() {
        let meta = client_backend.wait(m.id(), WAIT).await.unwrap();
        assert_eq!((meta.status, meta.result), (State::Success, json!(i + 1)));
        assert_eq!(meta.task_id, m.id());
    }

    // call(): value; a failure carries the exception document; retries end in the value.
    let v = client
        .call_task(
            "demo.add",
            vec![json!(2), json!(3)],
            Map::new(),
            &options,
            WAIT,
        )
        .await
        .unwrap();
    assert_eq!(v, json!(5));
    let e = client
        .call_task(
            "demo.fail",
            vec![],
            json!({"message": "boom"}).as_object().unwrap().clone(),
            &options,
            WAIT,
        )
        .await
        .unwrap_err();
    match e {
        ClientError::TaskFailed {
            exception,
            traceback,
            ..
        } => {
            assert_eq!(
                (exception.exc_type.as_str(), exception.message()),
                ("ValueError", "boom".to_owned())
            );
            assert!(traceback.is_some());
        }
        other => panic!("expected the task's failure, got {other}"),
    }
    let flaky = client
        .call_task(
            "demo.flaky",
            vec![json!("k"), json!(2)],
            Map::new(),
            &options,
            WAIT,
        )
        .await
        .unwrap();
    assert_eq!(flaky, json!({"key": "k", "runs": 3}));

    // STARTED is sent for a task that tracks it, then SUCCESS.
    let slow = client
        .send_task(
            "rpc.tracked_sleep",
            vec![],
            json!({"ms": 1500}).as_object().unwrap().clone(),
            &options,
        )
        .await
        .unwrap();
    let mut saw_started = false;
    for _ in 0..100 {
        let m = client_backend.get(slow.id()).await.unwrap();
        if m.status == State::Started {
            saw_started = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(saw_started, "no STARTED state arrived");
    assert_eq!(slow.get(WAIT).await.unwrap(), json!("slept"));
    // Read twice, same answer; another client (another reply queue) sees PENDING.
    assert_eq!(slow.get(WAIT).await.unwrap(), json!("slept"));
    let other = rpc("rpc://").await;
    assert_eq!(other.get(slow.id()).await.unwrap().status, State::Pending);
    other.close().await.unwrap();

    worker.stop().await;
    client.close().await.unwrap();
}

#[tokio::test]
async fn a_chord_is_refused_before_anything_is_sent() {
    let queue = unique("rpc-chord");
    let _guard = Cleanup::new().amqp_queue(queue.clone());
    let broker = connect_broker(AMQP).await.unwrap();
    broker.declare_queue(&queue).await.unwrap();
    let client = Client::new(broker.clone(), Some(rpc("rpc://").await));
    let add =
        |a: i64| Signature::new("demo.add", vec![json!(a), json!(1)], Map::new()).queue(&queue);
    let c = chord(
        Group::new(vec![add(1), add(2)]),
        Signature::new("demo.xsum", vec![], Map::new()).queue(&queue),
    );
    let Err(e) = client.apply_chord(&c).await else {
        panic!("a chord was sent on rpc://")
    };
    assert!(
        matches!(e, ClientError::ChordsUnsupported { backend: "rpc" }),
        "{e}"
    );
    let text = e.to_string();
    assert!(
        text.contains("redis://") && text.contains("postgresql"),
        "{text}"
    );
    // A group chained to a task is a chord too.
    let chained = celerity_client::canvas::Chain::new(vec![
        Signature::from(Group::new(vec![add(1), add(2)])),
        Signature::new("demo.xsum", vec![], Map::new()).queue(&queue),
    ])
    .unwrap();
    let e = client.apply_chain(&chained).await.unwrap_err();
    assert!(matches!(e, ClientError::ChordsUnsupported { .. }), "{e}");
    assert_eq!(
        broker.queue_len(&queue).await.unwrap(),
        0,
        "nothing may be sent"
    );
    client.close().await.unwrap();
}

/// A result sent to `queue` as a worker would, for task `task_id`, answering `correlation_id`.
fn reply(queue: &str, task_id: &str, correlation_id: &str, v: Value) -> TaskMeta {
    let mut m = TaskMeta::success(task_id, v);
    m.reply = Some(ReplyTo {
        queue: queue.to_owned(),
        correlation_id: correlation_id.to_owned(),
    });
    m
}

#[tokio::test]
async fn foreign_results_past_the_limit_and_wrong_correlation_ids_are_clear_errors() {
    let client = rpc("rpc://?backlog_limit=1000").await;
    let sender = rpc("rpc://").await;
    let queue = client.prepare_send(&["mine"]).await.unwrap().unwrap();

    // A reply whose correlation id names another task than its body: filed under neither.
    sender
        .store(&reply(&queue, "mine", "someone-else", json!(1)))
        .await
        .unwrap();
    // 1,001 results for ids this client never sent: the oldest is dropped, and says so.
    let foreign: Vec<TaskMeta> = (0..1001)
        .map(|i| {
            let id = format!("foreign-{i}");
            reply(&queue, &id, &id, json!(i))
        })
        .collect();
    sender.store_many(&foreign).await.unwrap();
    // Then ours: it is kept whatever the backlog.
    sender
        .store(&reply(&queue, "mine", "mine", json!("ok")))
        .await
        .unwrap();

    let mine = client.wait("mine", WAIT).await.unwrap();
    assert_eq!(mine.result, json!("ok"));
    assert_eq!(
        client.get("someone-else").await.unwrap().status,
        State::Pending
    );
    // Everything before "mine" has arrived (one queue, one order).
    let e = client.get("foreign-0").await.unwrap_err();
    assert!(
        matches!(e, BrokerError::BacklogLimitExceeded { limit: 1000, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("foreign-0") && e.to_string().contains("backlog_limit"));
    let e = client
        .wait("foreign-0", Some(Duration::from_millis(100)))
        .await
        .unwrap_err();
    assert!(matches!(e, BrokerError::BacklogLimitExceeded { .. }), "{e}");
    assert_eq!(
        client.get("foreign-1000").await.unwrap().result,
        json!(1000)
    );
    assert_eq!(
        client.wait("foreign-1", WAIT).await.unwrap().result,
        json!(1)
    );

    // A result with no reply_to (a job sent without one) is dropped, not an error.
    sender
        .store(&TaskMeta::success("no-reply", json!(1)))
        .await
        .unwrap();
    // A reply queue that does not exist (its client is gone): dropped with a warning, not retried.
    sender
        .store(&reply(&unique("rpc-gone"), "x", "x", json!(1)))
        .await
        .unwrap();
    client.close().await.unwrap();
    sender.close().await.unwrap();
}
