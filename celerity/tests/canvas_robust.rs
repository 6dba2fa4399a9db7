//! Workflows with the real `celerity` binary: a worker SIGKILLed in the middle of a chain and a chord
//! (Redis, 2 s visibility timeout, so the jobs it held are redelivered to the next worker) — both
//! still finish, and the chord body runs exactly once; and `celerity call --workflow`.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Map, Value};

use celerity_broker::{connect_backend, connect_broker};
use celerity_client::{chain, chord, Client, Group, Signature};
use celerity_testsupport::{celerity_command, delete_redis_prefix, ChildGuard, REDIS};

fn unique() -> String {
    celerity_testsupport::unique("canvas-robust")
}

fn s(task: &str, args: Value) -> Signature {
    Signature::new(
        task,
        args.as_array().cloned().unwrap_or_default(),
        Map::new(),
    )
}

/// One `celerity worker --processes 0` (a single process), its log in a file; killed on drop.
struct Worker(ChildGuard);

impl Worker {
    fn start(broker: &str, queue: &str, log: &PathBuf) -> Worker {
        let mut cmd = celerity_command(env!("CARGO_BIN_EXE_celerity"));
        cmd.args(["--broker", broker, "worker", "-Q", queue, "-c", "4"])
            .args(["--processes", "0", "--grace", "1"])
            .env("CELERITY_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(File::create(log).expect("log file"));
        Worker(ChildGuard::spawn(&mut cmd, "celerity worker"))
    }

    /// SIGKILL and reap.
    fn kill(&mut self) {
        self.0.kill();
    }
}

/// Lines of the logs that mention `id` and `what`.
fn log_lines(logs: &[PathBuf], id: &str, what: &str) -> usize {
    logs.iter()
        .map(|p| {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains(id) && l.contains(what))
                .count()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_and_chord_survive_a_killed_worker_and_the_body_runs_once() {
    let queue = unique();
    let prefix = format!("{queue}:");
    let broker =
        format!("{REDIS}?global_keyprefix={prefix}&visibility_timeout=2&restore_interval=1");
    let backend_url = format!("{REDIS}?global_keyprefix={prefix}");
    let client = Client::new(
        connect_broker(&broker).await.unwrap(),
        Some(connect_backend(&backend_url).await.unwrap()),
    );
    let dir = std::env::temp_dir();
    let logs = [
        dir.join(format!("{queue}-1.log")),
        dir.join(format!("{queue}-2.log")),
    ];
    let mut first = Worker::start(&broker, &queue, &logs[0]);

    // Chord members take 1.5 s each, 4 at a time: the kill lands with members running and others
    // waiting. The chain's first step is running when the worker dies.
    let header = Group::new((0..8).map(|_| s("demo.sleep_ms", json!([1500]))).collect());
    let cr = client
        .apply_chord(&chord(header, s("demo.echo", json!(["body"]))).queue(&queue))
        .await
        .unwrap();
    let ch = client
        .apply_chain(
            &chain(s("demo.sleep_ms", json!([1500])))
                .then(s("demo.add", json!([1])))
                .then(s("demo.mul", json!([2])))
                .queue(&queue),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    first.kill();
    let done_before = cr.header.completed_count().await.unwrap();
    assert!(
        done_before < 8,
        "the kill must land mid-chord ({done_before} of 8 done)"
    );

    let _second = Worker::start(&broker, &queue, &logs[1]);
    let wait = Some(Duration::from_secs(60));
    let out = cr.body.get(wait).await.unwrap();
    assert_eq!(out["args"], json!([vec![1500; 8], "body"]));
    assert_eq!(ch.get(wait).await.unwrap(), json!(3002));
    // Give a duplicate (if any were sent) time to be picked up before counting.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let body_runs = log_lines(&logs, cr.body.id(), "succeeded");
    assert_eq!(body_runs, 1, "the chord body ran {body_runs} times");
    let redelivered: usize = logs
        .iter()
        .map(|p| {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .matches("redelivered=true")
                .count()
        })
        .sum();
    println!("killed with {done_before}/8 chord members done; {redelivered} redelivered job(s)");
    assert!(redelivered > 0, "the killed worker's jobs were redelivered");
    delete_redis_prefix(&prefix).await;
    for l in &logs {
        let _ = std::fs::remove_file(l);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn celerity_call_sends_workflows_from_json() {
    let queue = unique();
    let prefix = format!("{queue}:");
    let broker = format!("{REDIS}?global_keyprefix={prefix}");
    let log = std::env::temp_dir().join(format!("{queue}.log"));
    let _worker = Worker::start(&broker, &queue, &log);
    let call = |workflow: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_celerity"))
            .args(["--broker", &broker, "call", "-Q", &queue, "--wait"])
            .args(["--timeout", "60", "--workflow", workflow])
            .env_remove("CELERITY_BROKER_URL")
            .env_remove("CELERITY_RESULT_BACKEND")
            .stdin(Stdio::null())
            .output()
            .expect("run celerity call");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = call(
        r#"{"chain": [{"task": "demo.add", "args": [1, 2]}, {"task": "demo.mul", "args": [10]}]}"#,
    );
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("step 0: ") && lines[1].starts_with("step 1: "),
        "{out}"
    );
    assert_eq!(lines.last(), Some(&"30"), "{out}");

    let (ok, out, err) = call(
        r#"{"group": [{"task": "demo.add", "args": [1, 1]}, {"task": "demo.add", "args": [2, 2]}]}"#,
    );
    assert!(ok, "{err}");
    assert!(out.starts_with("group: "), "{out}");
    assert_eq!(out.lines().last(), Some("[2,4]"), "{out}");

    let (ok, out, err) = call(
        r#"{"chord": {"header": [{"task": "demo.add", "args": [1, 1]}, {"task": "demo.add", "args": [2, 2]}], "body": {"task": "demo.echo"}}}"#,
    );
    assert!(ok, "{err}");
    assert!(out.contains("body: "), "{out}");
    assert_eq!(
        out.lines().last(),
        Some(r#"{"args":[[2,4]],"kwargs":{}}"#),
        "{out}"
    );

    let (ok, _, err) = call(
        r#"{"chain": [{"task": "demo.fail", "args": ["nope"]}, {"task": "demo.mul", "args": [10]}]}"#,
    );
    assert!(!ok, "a failed chain exits non-zero");
    assert!(err.contains("ValueError: nope"), "{err}");

    // Nested: a group as a chain step (Celery makes it a chord with the next step as body).
    let (ok, out, err) = call(
        r#"{"chain": [{"task": "demo.add", "args": [1, 1]}, {"group": [{"task": "demo.add", "args": [1]}, {"task": "demo.add", "args": [2]}]}, {"task": "demo.xsum"}]}"#,
    );
    assert!(ok, "{err}");
    assert_eq!(out.lines().last(), Some("7"), "{out}");
    // A chain ending in a group: the group's results.
    let (ok, out, err) = call(
        r#"{"chain": [{"task": "demo.add", "args": [1, 1]}, {"group": [{"task": "demo.add", "args": [10]}, {"task": "demo.mul", "args": [10]}]}]}"#,
    );
    assert!(ok, "{err}");
    assert!(out.starts_with("group: "), "{out}");
    assert_eq!(out.lines().last(), Some("[12,20]"), "{out}");
    // A chord with a chain in its header and a chain as its body.
    let (ok, out, err) = call(
        r#"{"chord": {"header": [{"chain": [{"task": "demo.add", "args": [1, 1]}, {"task": "demo.add", "args": [10]}]}, {"task": "demo.add", "args": [3, 3]}], "body": {"chain": [{"task": "demo.xsum"}, {"task": "demo.mul", "args": [2]}]}}}"#,
    );
    assert!(ok, "{err}");
    assert_eq!(out.lines().last(), Some("36"), "(12 + 6) * 2: {out}");

    delete_redis_prefix(&prefix).await;
    let _ = std::fs::remove_file(&log);
}
