//! Results in PostgreSQL (Celery's database backend, `db+postgresql://`), broker on Redis: Python
//! Celery's `AsyncResult.get()` reads the values, exceptions and retried outcomes our worker stored,
//! and our client reads what a Python worker stored. Each test's tables live in a schema of its own,
//! dropped afterwards.

use super::*;

fn pg_env() -> Env {
    let mut env = Env::new(Kind::Redis);
    env.pg = Some(celerity_testsupport::PgSchema::new("interop"));
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_reads_what_our_worker_stored_in_postgres() {
    let Some(python) = celery_python() else {
        return;
    };
    let env = pg_env();
    // Our worker first: it creates the tables Python then uses.
    let ours = demo_worker(&env, 4).await;
    let calls = json!([
        {"via": "send_task", "name": "demo.add", "args": [2, 3]},
        {"via": "delay", "name": "demo.echo", "args": ["två ☃", [1, {"a": null}]], "kwargs": {"k": 2.5}},
        {"via": "send_task", "name": "demo.fail", "args": ["kaputt ☠"]},
        {"via": "send_task", "name": "demo.flaky", "args": ["pg-flaky", 2]},
    ]);
    let got = env.python_calls(&python, &calls).await;
    let value = |i: usize| {
        assert_eq!(got[i]["state"], json!("SUCCESS"), "call {i}: {}", got[i]);
        got[i]["value"].clone()
    };
    assert_eq!(value(0), json!(5));
    assert_eq!(
        value(1),
        json!({"args": ["två ☃", [1, {"a": null}]], "kwargs": {"k": 2.5}})
    );
    assert_eq!(
        (
            &got[2]["state"],
            &got[2]["exc_class"],
            &got[2]["exc_module"],
            &got[2]["exc_message"]
        ),
        (
            &json!("FAILURE"),
            &json!("ValueError"),
            &json!("builtins"),
            &json!("kaputt ☠")
        ),
        "{}",
        got[2]
    );
    // Retried twice on our worker, each RETRY state stored over the last, then SUCCESS.
    assert_eq!(value(3), json!({"key": "pg-flaky", "runs": 3}));
    let summary = ours.stop().await;
    assert_eq!(
        (summary.succeeded, summary.failed, summary.retried),
        (3, 1, 2),
        "{summary:?}"
    );
    // One row per task, in Celery's table.
    let schema = env.pg.as_ref().unwrap();
    let rows = schema.psql(&format!(
        "SELECT count(*), count(DISTINCT task_id) FROM \"{}\".celery_taskmeta",
        schema.name
    ));
    assert_eq!(rows, "4|4");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_reads_what_a_python_worker_stored_in_postgres() {
    let Some(python) = celery_python() else {
        return;
    };
    let env = pg_env();
    // The Python worker first: Celery (SQLAlchemy) creates the tables our client then uses.
    let py = PyWorker::start(&env, &python).await;
    let client = env.client().await;
    let q = SendOptions::new().queue(&env.queue);
    let no_kwargs = Map::new();
    let add = client
        .send_task(
            "demo.add",
            vec![json!(20), json!(22)],
            no_kwargs.clone(),
            &q,
        )
        .await
        .unwrap();
    let fail = client
        .send_task("demo.fail", vec![json!("nope ☂ ü")], no_kwargs.clone(), &q)
        .await
        .unwrap();
    let flaky = client
        .send_task(
            "demo.flaky",
            vec![json!("py-pg-flaky"), json!(1)],
            no_kwargs,
            &q,
        )
        .await
        .unwrap();
    let t = Some(PATIENCE);
    assert_eq!(add.get(t).await.unwrap(), json!(42));
    match fail.get(t).await {
        Err(ClientError::TaskFailed { exception, .. }) => {
            assert_eq!(exception.exc_type, "ValueError");
            assert_eq!(exception.exc_module, "builtins");
            assert_eq!(exception.message(), "nope ☂ ü");
        }
        other => panic!("expected TaskFailed, got {other:?}"),
    }
    assert_eq!(
        flaky.get(t).await.unwrap(),
        json!({"key": "py-pg-flaky", "runs": 2})
    );
    assert!(add.meta().await.unwrap().date_done.is_some());
    drop(py);
    client.close().await.unwrap();
}
