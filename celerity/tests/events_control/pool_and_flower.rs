//! `celerity worker -P 2` shows up as two nodes; Flower lists our node online and our job as
//! SUCCESS with its result.

use super::*;

/// `celerity worker -P 2`: each child process is its own node (`<name>-0@…`, `<name>-1@…`) with its
/// own pid, and both answer.
pub(crate) async fn pool_children_are_nodes(env: Env) {
    let template = format!("pool-{}@test", env.uid);
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_celerity"))
        .arg("--broker")
        .arg(env.url())
        .args([
            "worker", "-P", "2", "-c", "1", "-n", &template, "-Q", &env.queue,
        ])
        .env_remove("CELERITY_BROKER_URL")
        .env_remove("CELERITY_RESULT_BACKEND")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let names = [
        format!("pool-{}-0@test", env.uid),
        format!("pool-{}-1@test", env.uid),
    ];
    let destination = names.join(",");
    let until = tokio::time::Instant::now() + PATIENCE;
    let stats = loop {
        let (_, out) = celerity(
            &env,
            &["inspect", "stats", "-d", &destination, "-t", "2", "--json"],
        )
        .await;
        if let Ok(Value::Object(replies)) = serde_json::from_str::<Value>(&out) {
            if replies.len() == 2 {
                break replies;
            }
        }
        assert!(
            tokio::time::Instant::now() < until,
            "not both children answered: {out}"
        );
    };
    let pids: Vec<&Value> = names.iter().map(|n| &stats[n]["pid"]).collect();
    assert!(pids[0].is_u64() && pids[0] != pids[1], "{stats:?}");
    assert!(
        !pids.contains(&&json!(child.id())),
        "children, not the supervisor, answer"
    );
    if env.transport == Transport::Redis {
        // The result names the node that ran the job (Celery's extended `worker` field).
        let (ok, id) = celerity(
            &env,
            &["call", "demo.add", "--args", "[2, 3]", "-Q", &env.queue],
        )
        .await;
        assert!(ok, "{id}");
        let (ok, out) = celerity(
            &env,
            &["result", id.trim(), "--wait", "--timeout", "20", "--json"],
        )
        .await;
        assert!(ok, "{out}");
        let meta: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        assert_eq!(meta["result"], json!(5), "{meta}");
        assert!(names.iter().any(|n| meta["worker"] == json!(n)), "{meta}");
    }
    // SAFETY: kill(2) with a pid we spawned and have not reaped.
    unsafe { libc::kill(child.id().unwrap_or(0) as libc::pid_t, libc::SIGTERM) };
    let status = tokio::time::timeout(PATIENCE, child.wait())
        .await
        .expect("the pool stopped")
        .unwrap();
    assert!(status.success(), "{status}");
}

/// The python of the Flower venv (`scripts/flower-venv.sh`), or `None` with `CELERITY_NO_PYTHON`.
/// Panics if the venv cannot be made: the test must not pass without Flower.
fn flower_python() -> Option<std::path::PathBuf> {
    celery_python()?;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/flower-venv.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "{} failed", script.display());
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    Some(std::path::PathBuf::from(
        stdout.lines().last().unwrap().trim(),
    ))
}

/// `GET path` on 127.0.0.1:`port`; the body if the status is 200.
async fn http_get(port: u16, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
    s.write_all(request.as_bytes()).await.ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200")
        .then(|| body.to_owned())
        .or_else(|| head.starts_with("HTTP/1.0 200").then(|| body.to_owned()))
}

/// Flower (the real one) against the broker our worker runs on: its API lists our node (with what
/// it learned over remote control) as online, and our job with its final state from our events.
pub(crate) async fn flower_lists_our_worker(env: Env) {
    let Some(flower) = flower_python() else {
        return;
    };
    let worker = OurWorker::start(&env, 2).await;
    let app = PyApp::new(&env);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = app.celery(&flower, &env);
    let mut flower_proc = cmd
        .args(["flower", &format!("--port={port}"), "--address=127.0.0.1"])
        .env("FLOWER_UNAUTHENTICATED_API", "true")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(app.0.join("flower.log")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let node = env.node();
    let until = tokio::time::Instant::now() + PATIENCE;
    let workers: Value = loop {
        if let Some(body) = http_get(port, "/api/workers?refresh=1").await {
            let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            if v[&node]["registered"].is_array() {
                break v;
            }
        }
        assert!(
            tokio::time::Instant::now() < until,
            "Flower never listed {node}: {}",
            std::fs::read_to_string(app.0.join("flower.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let ours = &workers[&node];
    assert!(
        ours["registered"]
            .as_array()
            .unwrap()
            .contains(&json!("demo.add")),
        "{ours}"
    );
    assert_eq!(ours["stats"]["pool"]["max-concurrency"], json!(2), "{ours}");
    assert_eq!(ours["active_queues"][0]["name"], json!(env.queue), "{ours}");

    // A job, seen by Flower through our task events.
    let client = Client::new(env.broker().await, None);
    let job = client
        .send_task(
            "demo.add",
            vec![json!(20), json!(22)],
            Map::new(),
            &SendOptions::new().queue(env.queue.clone()),
        )
        .await
        .unwrap();
    let path = format!("/api/task/info/{}", job.id());
    let info: Value = loop {
        if let Some(body) = http_get(port, &path).await {
            let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            if v["state"] == "SUCCESS" {
                break v;
            }
        }
        assert!(
            tokio::time::Instant::now() < until,
            "Flower never saw the job succeed"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(info["result"], "42");
    assert_eq!(info["worker"], json!(node));
    let status = http_get(port, "/api/workers?status=1")
        .await
        .unwrap_or_default();
    let status: Value = serde_json::from_str(&status).unwrap_or(Value::Null);
    assert_eq!(status[&node], json!(true), "{status}");
    let _ = flower_proc.start_kill();
    let _ = flower_proc.wait().await;
    worker.stop().await;
}
