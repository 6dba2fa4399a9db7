//! The `celerity` binary's producer verbs against real Redis and RabbitMQ, and its error paths.

use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use celerity_broker::backend::ExceptionInfo;
use celerity_broker::protocol::TaskMessage;
use celerity_broker::{connect_backend, connect_broker, TaskMeta};
use celerity_testsupport::{celerity_command, delete_amqp_queue, delete_redis_prefix, text};
use celerity_testsupport::{AMQP, REDIS};
use serde_json::json;

fn celerity(args: &[&str]) -> Output {
    celerity_command(env!("CARGO_BIN_EXE_celerity"))
        .args(args)
        .output()
        .expect("run celerity")
}

fn unique() -> String {
    celerity_testsupport::unique("clitest")
}

/// Every failure is one line on stderr, exit code 2, no panic or backtrace.
fn assert_one_line_error(out: &Output, needle: &str) {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(err.starts_with("celerity: error: "), "{err}");
    assert!(err.contains(needle), "expected `{needle}` in `{err}`");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{err}"
    );
}

#[test]
fn bad_urls_and_unreachable_brokers_are_one_clear_line() {
    assert_one_line_error(
        &celerity(&["--broker", "nope://x", "queues"]),
        "unsupported URL scheme `nope`",
    );
    assert_one_line_error(
        &celerity(&["--broker", "not a url", "queues"]),
        "invalid URL",
    );
    assert_one_line_error(
        &celerity(&["--broker", "redis://127.0.0.1:6379/0?bogus=1", "queues"]),
        "unknown option `bogus`",
    );
    assert_one_line_error(
        &celerity(&["queues"]),
        "memory:// exists only inside one process",
    );
    let started = Instant::now();
    assert_one_line_error(
        &celerity(&["--broker", "redis://127.0.0.1:1/0", "queues"]),
        "127.0.0.1:1",
    );
    assert_one_line_error(
        &celerity(&["--broker", "amqp://guest:guest@127.0.0.1:1/%2f", "queues"]),
        "127.0.0.1:1",
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "unreachable brokers must fail fast"
    );
    let out = celerity(&[
        "--broker",
        "amqp://guest:secret-pw@127.0.0.1:1/%2f",
        "queues",
    ]);
    assert!(
        !text(&out.stderr).contains("secret-pw"),
        "password leaked: {}",
        text(&out.stderr)
    );
}

#[test]
fn bad_call_arguments_are_refused_before_sending() {
    let q = unique();
    let url = format!("{REDIS}?global_keyprefix={q}:");
    for (args, needle) in [
        (vec!["--args", "[1,"], "--args is not valid JSON"),
        (vec!["--args", "{}"], "--args must be a JSON list"),
        (vec!["--kwargs", "[]"], "--kwargs must be a JSON object"),
        (
            vec!["--eta", "soon"],
            "--eta: `soon` is not an ISO-8601 time",
        ),
        (
            vec!["--countdown=-1"],
            "--countdown must be a number of seconds",
        ),
        (vec!["--count", "0"], "--count must be at least 1"),
        (vec!["--count", "2", "--wait"], "cannot be combined"),
        // Absurd times and limits (issue 16: `--countdown 1e15` panicked).
        (
            vec!["--countdown", "1e15"],
            "--countdown must be a number of seconds",
        ),
        (
            vec!["--countdown", "1e300"],
            "--countdown must be a number of seconds",
        ),
        (
            vec!["--countdown", "NaN"],
            "--countdown must be a number of seconds",
        ),
        (
            vec!["--expires", "1e15"],
            "--expires must be a number of seconds",
        ),
        (
            vec!["--time-limit", "1e19"],
            "--time-limit must be a number of seconds",
        ),
        (
            vec!["--soft-time-limit", "inf"],
            "--soft-time-limit must be a number",
        ),
        (vec!["--eta", "9999-12-31T00:00:00"], "eta 9999-12-31"),
        (
            vec!["--expires", "9999-12-31T00:00:00"],
            "expires 9999-12-31",
        ),
        (
            vec!["--countdown", "1e15", "--count", "3"],
            "--countdown must be",
        ),
    ] {
        let mut all = vec![
            "--broker",
            url.as_str(),
            "call",
            "demo.add",
            "-Q",
            q.as_str(),
        ];
        all.extend(args);
        assert_one_line_error(&celerity(&all), needle);
    }
    // clap's own refusal (several lines), still exit code 2 and no panic.
    for priority in ["256", "1e9", "-1"] {
        let flag = format!("--priority={priority}");
        let out = celerity(&[
            "--broker",
            url.as_str(),
            "call",
            "demo.add",
            "-Q",
            q.as_str(),
            &flag,
        ]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "--priority {priority}: {err}");
        assert!(
            err.contains("--priority") && !err.contains("panicked"),
            "{err}"
        );
    }
}

async fn call_and_read_back(broker_url: &str, q: &str) {
    let out = celerity(&[
        "--broker",
        broker_url,
        "call",
        "demo.add",
        "--args",
        "[2, 3]",
        "--kwargs",
        r#"{"z": "héllo"}"#,
        "-Q",
        q,
        "--countdown",
        "30",
        "--expires",
        "120",
        "--priority",
        "3",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_owned();
    assert_eq!(id.len(), 36, "expected a task id, got {id:?}");

    let broker = connect_broker(broker_url).await.unwrap();
    assert_eq!(broker.queue_len(q).await.unwrap(), 1);
    let mut consumer = broker.consume(&[q.to_owned()], 1).await.unwrap();
    let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let t = TaskMessage::decode(&d.message).unwrap();
    assert_eq!((t.task(), t.id()), ("demo.add", id.as_str()));
    assert_eq!(t.args, vec![json!(2), json!(3)]);
    assert_eq!(t.kwargs["z"], json!("héllo"));
    assert!(t.headers.eta.is_some() && t.headers.expires.is_some());
    assert_eq!(d.message.properties.priority, 3);
    d.ack().await.unwrap();
    consumer.close().await.unwrap();

    let out = celerity(&[
        "--broker",
        broker_url,
        "call",
        "demo.noop",
        "-Q",
        q,
        "--count",
        "2500",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("sent 2500 messages"),
        "{}",
        text(&out.stderr)
    );
    let out = celerity(&["--broker", broker_url, "queues", q]);
    assert_eq!(text(&out.stdout).trim(), format!("{q}\t2500"));
    let out = celerity(&["--broker", broker_url, "purge", q]);
    assert_eq!(
        text(&out.stdout).trim(),
        format!("purged 2500 message(s) from {q}")
    );
    assert_eq!(broker.queue_len(q).await.unwrap(), 0);
}

#[tokio::test]
async fn call_queues_purge_on_redis() {
    let q = unique();
    let url = format!("{REDIS}?global_keyprefix={q}:");
    call_and_read_back(&url, &q).await;
    delete_redis_prefix(&q).await;
}

#[tokio::test]
async fn call_queues_purge_on_rabbitmq() {
    let q = unique();
    call_and_read_back(AMQP, &q).await;
    delete_amqp_queue(&q).await;
}

#[tokio::test]
async fn wait_and_result_print_values_and_failures() {
    let q = unique();
    let url = format!("{REDIS}?global_keyprefix={q}:");
    let backend = connect_backend(&url).await.unwrap();

    // `call --wait` prints the value once a "worker" stores it.
    let bin = env!("CARGO_BIN_EXE_celerity");
    let child = std::process::Command::new(bin)
        .args([
            "--broker",
            &url,
            "call",
            "demo.add",
            "--args",
            "[2, 3]",
            "-Q",
            &q,
            "--wait",
            "--timeout",
            "20",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let broker = connect_broker(&url).await.unwrap();
    let mut consumer = broker.consume(std::slice::from_ref(&q), 1).await.unwrap();
    let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let t = TaskMessage::decode(&d.message).unwrap();
    backend
        .store(&TaskMeta::success(t.id(), json!(5)))
        .await
        .unwrap();
    d.ack().await.unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "5");

    // `result` on a failure: error line + traceback on stderr, exit 1.
    let exc = ExceptionInfo::new("ValueError", "bad value", "builtins");
    backend
        .store(&TaskMeta::failure(
            "f-1",
            &exc,
            Some("Traceback (most recent call last):\nValueError: bad value".into()),
        ))
        .await
        .unwrap();
    let out = celerity(&["--broker", &url, "result", "f-1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("task f-1 failed: ValueError: bad value"),
        "{}",
        text(&out.stderr)
    );
    // Reading a result needs only the backend, as with `celery result`: no --broker.
    let out = celerity(&["--backend", &url, "result", "f-1"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("task f-1 failed: ValueError: bad value"),
        "{}",
        text(&out.stderr)
    );
    assert_one_line_error(
        &celerity(&["result", "f-1"]),
        "memory:// exists only inside one process",
    );
    let out = celerity(&["--broker", &url, "result", "f-1", "--json"]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["status"], json!("FAILURE"));
    assert_eq!(doc["result"]["exc_type"], json!("ValueError"));

    // Unknown id: PENDING; waiting for it times out with one line.
    let out = celerity(&["--broker", &url, "result", "nobody"]);
    assert_eq!(text(&out.stdout).trim(), "PENDING");
    assert_one_line_error(
        &celerity(&[
            "--broker",
            &url,
            "result",
            "nobody",
            "--wait",
            "--timeout",
            "0.3",
        ]),
        "timed out",
    );
    consumer.close().await.unwrap();
    delete_redis_prefix(&q).await;
}
