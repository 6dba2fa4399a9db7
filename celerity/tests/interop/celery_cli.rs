//! Celery's own CLI (`celery call` / `celery result`) against our worker, ours against Python's.

use super::*;

async fn cli_both_ways(kind: Kind) {
    let Some(python) = celery_python() else {
        return;
    };
    let env = Env::new(kind);

    // `celery call` / `celery result` → our worker.
    let ours = demo_worker(&env, 2).await;
    let out = env
        .celery_cli(&python, &["call", "demo.add", "--args", "[20, 22]"])
        .await;
    assert!(out.status.success(), "celery call: {}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_owned();
    assert!(
        uuid::Uuid::parse_str(&id).is_ok(),
        "celery call printed {id:?}"
    );
    let out = env.celery_cli(&python, &["result", &id]).await;
    assert!(out.status.success(), "celery result: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "42");
    let out = env
        .celery_cli(
            &python,
            &[
                "call",
                "demo.echo",
                "--args",
                r#"["ü"]"#,
                "--kwargs",
                r#"{"k": [1, null]}"#,
            ],
        )
        .await;
    assert!(out.status.success(), "celery call: {}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_owned();
    let out = env.celery_cli(&python, &["result", &id]).await;
    assert!(out.status.success(), "celery result: {}", text(&out.stderr));
    // `celery result` prints the value's Python repr.
    assert_eq!(
        text(&out.stdout).trim(),
        "{'args': ['ü'], 'kwargs': {'k': [1, None]}}"
    );
    ours.stop().await;

    // `celerity call --wait` / `celerity result` → a Python worker.
    let _py = PyWorker::start(&env, &python).await;
    let out = env
        .celerity(&[
            "call",
            "demo.add",
            "--args",
            "[2, 3]",
            "-Q",
            &env.queue,
            "--wait",
            "--timeout",
            "60",
        ])
        .await;
    assert!(out.status.success(), "celerity call: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "5");
    let out = env
        .celerity(&["call", "demo.mul", "--args", "[6, 7]", "-Q", &env.queue])
        .await;
    assert!(out.status.success(), "celerity call: {}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_owned();
    let out = env
        .celerity(&["result", &id, "--wait", "--timeout", "60"])
        .await;
    assert!(
        out.status.success(),
        "celerity result: {}",
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout).trim(), "42");
    let out = env.celerity(&["result", &id, "--json"]).await;
    assert!(
        out.status.success(),
        "celerity result --json: {}",
        text(&out.stderr)
    );
    let doc: Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert_eq!(
        (&doc["status"], &doc["result"]),
        (&json!("SUCCESS"), &json!(42))
    );
    let out = env
        .celerity(&[
            "call",
            "demo.fail",
            "--args",
            r#"["cli ✗"]"#,
            "-Q",
            &env.queue,
            "--wait",
            "--timeout",
            "60",
        ])
        .await;
    assert!(!out.status.success(), "a failed job is a failing exit");
    assert!(
        text(&out.stderr).contains("ValueError: cli ✗"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_both_ways_redis() {
    cli_both_ways(Kind::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_both_ways_rabbitmq() {
    cli_both_ways(Kind::Amqp).await;
}
