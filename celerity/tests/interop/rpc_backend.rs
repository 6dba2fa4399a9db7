//! The `rpc://` result backend beside Python Celery on RabbitMQ, both ways:
//!
//! - a Python producer with `backend="rpc://"` gets the value, the exception and the retries (the
//!   RETRY states arrive as messages, seen by `get(on_message=…)`) of jobs our worker ran;
//! - our client on `rpc://` reads the values and failures a Python worker sent to its reply queue.

use super::*;

use celerity_broker::connect_backend_for;

const RPC: &str = "rpc://";

/// An Env on RabbitMQ whose Python side uses `rpc://` for results.
fn rpc_env() -> Env {
    let mut env = Env::new(Kind::Amqp);
    env.py_backend = Some(RPC);
    env
}

#[tokio::test]
async fn python_producer_on_rpc_reads_what_our_worker_sent() {
    let Some(python) = celery_python() else {
        return;
    };
    let env = rpc_env();
    let broker = connect_broker(&env.broker_url()).await.unwrap();
    let backend = connect_backend_for(RPC, Some(&env.broker_url()))
        .await
        .unwrap();
    let config = WorkerConfig {
        queues: vec![env.queue.clone()],
        concurrency: 4,
        hostname: format!("rs-{}@test", env.uid),
        ..WorkerConfig::default()
    };
    let mut registry = Registry::new();
    demo::register(&mut registry);
    let ours = OurWorker(InProcessWorker::spawn(
        registry,
        broker,
        Some(backend),
        config,
    ));

    let calls = json!([
        {"name": "demo.add", "args": [2, 3]},
        {"name": "demo.echo", "args": ["Zoë ☕"], "kwargs": {"n": [1, {"a": null}]}},
        {"name": "demo.fail", "args": ["kaputt ☠"]},
        {"name": "demo.flaky", "args": ["py-rpc", 2]},
        {"name": "demo.add", "args": ["a", 1]},
    ]);
    let out = env
        .python(&python)
        .arg(python_dir().join("rpc_driver.py"))
        .arg(calls.to_string())
        .output()
        .await
        .expect("run rpc_driver.py");
    assert!(out.status.success(), "rpc_driver.py: {}", text(&out.stderr));
    let got: Vec<Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(got.len(), 5, "{}", text(&out.stdout));
    assert_eq!(
        (&got[0]["ok"], &got[0]["value"], &got[0]["state"]),
        (&json!(true), &json!(5), &json!("SUCCESS")),
        "{}",
        got[0]
    );
    assert_eq!(
        got[1]["value"],
        json!({"args": ["Zoë ☕"], "kwargs": {"n": [1, {"a": null}]}}),
        "{}",
        got[1]
    );
    assert_eq!(
        (&got[2]["ok"], &got[2]["exc_class"], &got[2]["state"]),
        (&json!(false), &json!("ValueError"), &json!("FAILURE")),
        "{}",
        got[2]
    );
    assert!(
        got[2]["exc_message"].as_str().unwrap().contains("kaputt ☠"),
        "{}",
        got[2]
    );
    // The retries: two RETRY states, then the value of the third run.
    assert_eq!(
        got[3]["value"],
        json!({"key": "py-rpc", "runs": 3}),
        "{}",
        got[3]
    );
    let retries = got[3]["seen"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| *s == "RETRY")
        .count();
    assert_eq!(retries, 2, "{}", got[3]);
    assert_eq!(got[4]["exc_class"], json!("TypeError"), "{}", got[4]);
    ours.stop().await;
}

#[tokio::test]
async fn our_client_on_rpc_reads_what_a_python_worker_sent() {
    let Some(python) = celery_python() else {
        return;
    };
    let env = rpc_env();
    let py = PyWorker::start(&env, &python).await;
    let client = Client::connect(&env.broker_url(), Some(RPC)).await.unwrap();
    let q = SendOptions::new().queue(&env.queue);
    let add = client
        .send_task("demo.add", vec![json!(2), json!(3)], Map::new(), &q)
        .await
        .unwrap();
    let fail = client
        .send_task("demo.fail", vec![json!("nope ☂")], Map::new(), &q)
        .await
        .unwrap();
    let flaky = client
        .send_task(
            "demo.flaky",
            vec![json!("rs-rpc"), json!(2)],
            Map::new(),
            &q,
        )
        .await
        .unwrap();
    // Results that arrive before anyone waits are kept; read them last-sent first.
    assert_eq!(
        flaky.get(Some(PATIENCE)).await.unwrap(),
        json!({"key": "rs-rpc", "runs": 3})
    );
    match fail.get(Some(PATIENCE)).await {
        Err(ClientError::TaskFailed { exception, .. }) => {
            assert_eq!(exception.exc_type, "ValueError");
            assert!(exception.message().contains("nope ☂"), "{exception}");
        }
        other => panic!("expected the Python failure, got {other:?}"),
    }
    assert_eq!(add.get(Some(PATIENCE)).await.unwrap(), json!(5));
    let called = client
        .call_task(
            "demo.mul",
            vec![json!(6), json!(7)],
            Map::new(),
            &q,
            Some(PATIENCE),
        )
        .await
        .unwrap();
    assert_eq!(called, json!(42));
    drop(py);
    client.close().await.unwrap();
}
