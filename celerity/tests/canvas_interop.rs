//! Workflows across Python Celery 5.7 and Celerity, on Redis and on RabbitMQ (results on Redis):
//! - chains, groups and chords built by Python run to completion on our worker, and Python's
//!   `AsyncResult` / `GroupResult` read the results (and we restore the group Python saved);
//! - the same built by our client run on a Python worker (`celery -A canvas_app worker`), and our
//!   handles read the results (and Python restores the group we saved).
//!
//! Python is celerity/tests/python/canvas_app.py + canvas_driver.py under the pinned venv
//! (`celery_python()`); with `CELERITY_NO_PYTHON=1` these tests only print a note.

use serde_json::{json, Value};

use celerity_client::{chain, chord, ClientError, Group};
use celerity_testsupport::celery_python;

mod canvas_support;
use canvas_support::{s, Setup, WAIT};

fn setup(amqp: bool) -> Setup {
    Setup::new(amqp, "canvas-interop", "canvas_driver.py")
}

async fn python_builds_our_worker_runs(amqp: bool) {
    let Some(python) = celery_python() else {
        return;
    };
    let setup = setup(amqp);
    let client = setup.client().await;
    let (worker, shutdown) = setup.our_worker(&client);

    let out = setup.driver(&python, &["build"]).await;
    assert_eq!(out["chain"], json!(35), "{out}");
    assert_eq!(out["chain_parent"], json!(30), "{out}");
    assert_eq!(out["group"], json!([0, 2, 4, 6, 8]), "{out}");
    assert_eq!(
        out["chord"],
        json!({"args": [[1, 2, 3, 4, 5, 6, 7, 8], "tail"], "kwargs": {}}),
        "{out}"
    );
    let bad = out["bad_chord"].as_str().unwrap_or_default();
    assert!(
        bad.starts_with("ChordError") && bad.contains("Dependency") && bad.contains("member broke"),
        "{out}"
    );
    assert_eq!(
        out["bad_chord_parent"],
        json!("ValueError: member broke"),
        "{out}"
    );
    assert_eq!(out["linked"], json!(5), "{out}");
    assert_eq!(out["failing_chain"], json!("ValueError: boom"), "{out}");

    // The group Python saved, restored and read by us.
    let gid = out["group_id"].as_str().unwrap();
    let g = client
        .restore_group(gid)
        .await
        .unwrap()
        .expect("saved group");
    assert_eq!(json!(g.ids()), out["group_ids"]);
    assert_eq!(json!(g.get(WAIT).await.unwrap()), json!([0, 2, 4, 6, 8]));

    shutdown.warm.cancel();
    worker.await.unwrap().unwrap();
    setup.cleanup().await;
}

async fn we_build_python_worker_runs(amqp: bool) {
    let Some(python) = celery_python() else {
        return;
    };
    let setup = setup(amqp);
    let client = setup.client().await;
    let _worker = setup.python_worker(&python);
    let q = setup.queue.as_str();

    let c = chain(s("demo.add", json!([1, 2])))
        .then(s("demo.mul", json!([10])))
        .then(s("demo.add", json!([5])))
        .queue(q);
    let chain_result = client.apply_chain(&c).await.unwrap();
    assert_eq!(chain_result.get(WAIT).await.unwrap(), json!(35));

    let g = Group::new((0..5).map(|i| s("demo.add", json!([i, i]))).collect()).queue(q);
    let gr = client.apply_group(&g).await.unwrap();
    assert_eq!(json!(gr.get(WAIT).await.unwrap()), json!([0, 2, 4, 6, 8]));
    gr.save().await.unwrap();

    let header = Group::new((0..8).map(|i| s("demo.add", json!([i, 1]))).collect());
    let cr = client
        .apply_chord(&chord(header, s("demo.echo", json!(["tail"]))).queue(q))
        .await
        .unwrap();
    assert_eq!(
        cr.body.get(WAIT).await.unwrap(),
        json!({"args": [[1, 2, 3, 4, 5, 6, 7, 8], "tail"], "kwargs": {}})
    );

    let header = Group::new(vec![
        s("demo.add", json!([1, 1])),
        s("demo.fail", json!(["member broke"])),
    ]);
    let bad = client
        .apply_chord(&chord(header, s("demo.echo", json!([]))).queue(q))
        .await
        .unwrap();
    match bad.body.get(WAIT).await {
        Err(ClientError::TaskFailed { exception, .. }) => {
            assert_eq!(exception.exc_type, "ChordError");
            assert!(
                exception.message().contains(&bad.header.ids()[1]),
                "{exception}"
            );
        }
        other => panic!("expected a ChordError, got {other:?}"),
    }

    let cb = uuid::Uuid::new_v4().to_string();
    let linked = client
        .apply(
            &s("demo.add", json!([2, 3]))
                .queue(q)
                .link(s("demo.mul", json!([10])).task_id(&cb)),
        )
        .await
        .unwrap();
    assert_eq!(linked.get(WAIT).await.unwrap(), json!(5));
    assert_eq!(
        client.result::<Value>(&cb).get(WAIT).await.unwrap(),
        json!(50)
    );

    // Python reads our handles' results and restores the group we saved.
    let read = setup.driver(&python, &["read", chain_result.id()]).await;
    let restored = setup.driver(&python, &["restore", gr.id()]).await;
    assert_eq!(read[chain_result.id()]["result"], json!(35), "{read}");
    assert_eq!(restored["ids"], json!(gr.ids()));
    assert_eq!(restored["results"], json!([0, 2, 4, 6, 8]));

    drop(_worker);
    setup.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_workflows_run_on_our_worker_redis() {
    python_builds_our_worker_runs(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_workflows_run_on_our_worker_rabbitmq() {
    python_builds_our_worker_runs(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_workflows_run_on_a_python_worker_redis() {
    we_build_python_worker_runs(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_workflows_run_on_a_python_worker_rabbitmq() {
    we_build_python_worker_runs(true).await;
}
