//! Nested workflows across Python Celery 5.7 and Celerity, on Redis and on RabbitMQ (results on
//! Redis):
//! - nested canvases built by Python (a group as a chain step, a group ending a chain, a chord with
//!   a chain body, a group of chains, a chain in a chord header, a chord as a chain step, a failing
//!   member of a chord made from `group | step`) run to the end on our worker, and Python reads the
//!   final results;
//! - the same shapes built by our client run on a Python worker (so our encoding is Celery's), and
//!   our handles and Python's `AsyncResult` read the results.
//!
//! Python is celerity/tests/python/canvas_app.py + canvas_nested_driver.py under the pinned venv
//! (`celery_python()`); with `CELERITY_NO_PYTHON=1` these tests only print a note.

use serde_json::json;

use celerity_client::{chain, chord, Chain, Group, Signature, WorkflowResult};
use celerity_testsupport::celery_python;

mod canvas_support;
use canvas_support::{s, Setup, WAIT};

fn setup(amqp: bool) -> Setup {
    Setup::new(amqp, "nested-interop", "canvas_nested_driver.py")
}

fn chain_of(steps: Vec<Signature>) -> Signature {
    Chain::new(steps).unwrap().into()
}

async fn python_builds_our_worker_runs(amqp: bool) {
    let Some(python) = celery_python() else {
        return;
    };
    let setup = setup(amqp);
    let client = setup.client().await;
    let (worker, shutdown) = setup.our_worker(&client);

    let out = setup.driver(&python, &["build"]).await;
    assert_eq!(out["group_step"], json!(7), "2 -> [3, 4] -> 7: {out}");
    assert_eq!(out["group_last"], json!([12, 20]), "{out}");
    assert_eq!(out["chain_body"], json!(212), "(2 + 4 + 100) * 2: {out}");
    assert_eq!(out["group_of_chains"], json!([12, 40, 10]), "{out}");
    assert_eq!(out["chain_in_header"], json!(18), "12 + 6: {out}");
    assert_eq!(out["chord_step"], json!(70), "(3 + 4) * 10: {out}");
    let bad = out["bad_last"].as_str().unwrap_or_default();
    assert!(
        bad.starts_with("ChordError") && bad.contains("member broke"),
        "{out}"
    );

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

    // chain(add(1, 1), group(add(1), add(2)), xsum()).
    let c = Chain::new(vec![
        s("demo.add", json!([1, 1])),
        Group::new(vec![s("demo.add", json!([1])), s("demo.add", json!([2]))]).into(),
        s("demo.xsum", json!([])),
    ])
    .unwrap()
    .queue(q);
    let group_step = client.apply_chain(&c).await.unwrap();
    assert_eq!(group_step.get(WAIT).await.unwrap(), json!(7));

    // chain(add(1, 1), group(add(10), mul(10))): a group result.
    let c: Signature = Chain::new(vec![
        s("demo.add", json!([1, 1])),
        Group::new(vec![s("demo.add", json!([10])), s("demo.mul", json!([10]))]).into(),
    ])
    .unwrap()
    .queue(q)
    .into();
    match client.apply_workflow(&c).await.unwrap() {
        WorkflowResult::Group(g) => {
            assert_eq!(g.get(WAIT).await.unwrap(), vec![json!(12), json!(20)])
        }
        WorkflowResult::Task(t) => panic!("expected a group, got task {}", t.id()),
    }

    // chord(header, chain(xsum(), add(100), mul(2))).
    let body = chain_of(vec![
        s("demo.xsum", json!([])),
        s("demo.add", json!([100])),
        s("demo.mul", json!([2])),
    ]);
    let header = Group::new(vec![
        s("demo.add", json!([1, 1])),
        s("demo.add", json!([2, 2])),
    ]);
    let cr = client
        .apply_chord(&chord(header, body).queue(q))
        .await
        .unwrap();
    assert_eq!(cr.body.get(WAIT).await.unwrap(), json!(212));

    // group(chain(add(1, 1), add(10)), chain(add(2, 2), mul(10)), add(5, 5)).
    let g = Group::new(vec![
        chain_of(vec![
            s("demo.add", json!([1, 1])),
            s("demo.add", json!([10])),
        ]),
        chain_of(vec![
            s("demo.add", json!([2, 2])),
            s("demo.mul", json!([10])),
        ]),
        s("demo.add", json!([5, 5])),
    ])
    .queue(q);
    let gr = client.apply_group(&g).await.unwrap();
    assert_eq!(
        gr.get(WAIT).await.unwrap(),
        vec![json!(12), json!(40), json!(10)]
    );

    // chord([chain(add(1, 1), add(10)), add(3, 3)], xsum()).
    let header = Group::new(vec![
        chain_of(vec![
            s("demo.add", json!([1, 1])),
            s("demo.add", json!([10])),
        ]),
        s("demo.add", json!([3, 3])),
    ]);
    let cr = client
        .apply_chord(&chord(header, s("demo.xsum", json!([]))).queue(q))
        .await
        .unwrap();
    assert_eq!(cr.body.get(WAIT).await.unwrap(), json!(18));

    // chain(add(1, 1), chord([add(1), add(2)], xsum()), mul(10)).
    let ch: Signature = chord(
        Group::new(vec![s("demo.add", json!([1])), s("demo.add", json!([2]))]),
        s("demo.xsum", json!([])),
    )
    .into();
    let c = chain(s("demo.add", json!([1, 1])))
        .then(ch)
        .then(s("demo.mul", json!([10])))
        .queue(q);
    let chord_step = client.apply_chain(&c).await.unwrap();
    assert_eq!(chord_step.get(WAIT).await.unwrap(), json!(70));

    // Python reads our handles too.
    let read = setup.driver(&python, &["read", chord_step.id()]).await;
    assert_eq!(read["result"], json!(70), "{read}");
    let read = setup.driver(&python, &["read", group_step.id()]).await;
    assert_eq!(read["result"], json!(7), "{read}");

    drop(_worker);
    setup.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_nested_workflows_run_on_our_worker_redis() {
    python_builds_our_worker_runs(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_nested_workflows_run_on_our_worker_rabbitmq() {
    python_builds_our_worker_runs(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_nested_workflows_run_on_a_python_worker_redis() {
    we_build_python_worker_runs(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_nested_workflows_run_on_a_python_worker_rabbitmq() {
    we_build_python_worker_runs(true).await;
}
