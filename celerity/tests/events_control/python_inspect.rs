//! Python's `celery inspect ping` (the real CLI) and `app.control.inspect().registered()/active()`
//! get answers from our worker.

use super::*;

/// `app.control.inspect(...)` registered and active while a job runs, as JSON.
const PY_INSPECT: &str = r#"
import sys, json
from celery import Celery
url, prefix, node = sys.argv[1:4]
app = Celery(broker=url)
if prefix:
    app.conf.broker_transport_options = {'global_keyprefix': prefix}
i = app.control.inspect(destination=[node], timeout=10)
out = {'registered': i.registered(), 'active': i.active(), 'stats': i.stats()}
# Addressed by a glob pattern instead of a destination (one that matches us, one that does not).
out['glob'] = app.control.inspect(pattern=node.replace('@test', '@te?t'), matcher='glob', timeout=3).ping()
out['noglob'] = app.control.inspect(pattern=node + '-nope*', matcher='glob', timeout=1).ping()
print(json.dumps(out))
"#;

pub(crate) async fn python_inspects_our_worker(env: Env) {
    let Some(python) = celery_python() else {
        return;
    };
    let worker = OurWorker::start(&env, 2).await;
    let app = PyApp::new(&env);
    // The real CLI: `celery -A app inspect ping -d <our node>`.
    let out = app
        .celery(&python, &env)
        .args(["inspect", "ping", "-d", &env.node(), "-t", "10"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "celery inspect ping: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&env.node()) && stdout.contains("pong"),
        "{stdout}"
    );
    assert!(stdout.contains("1 node online"), "{stdout}");

    // A job running while Python asks for `active`.
    let client = Client::new(env.broker().await, None);
    let running = client
        .send_task(
            "demo.sleep_ms",
            vec![json!(4000)],
            Map::new(),
            &SendOptions::new().queue(env.queue.clone()),
        )
        .await
        .unwrap();
    let until = tokio::time::Instant::now() + PATIENCE;
    loop {
        let active = client
            .control_call(
                "active",
                Map::new(),
                &Target {
                    destination: vec![env.node()],
                    timeout: Duration::from_secs(5),
                },
            )
            .await
            .unwrap();
        if active
            .first()
            .and_then(|r| r.value.as_array())
            .is_some_and(|a| !a.is_empty())
        {
            break;
        }
        assert!(tokio::time::Instant::now() < until, "the job never started");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (url, prefix) = env.python_broker();
    let out = tokio::process::Command::new(&python)
        .args(["-c", PY_INSPECT, &url, &prefix, &env.node()])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "python: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    let node = env.node();
    let registered = got["registered"][&node].as_array().expect("registered");
    assert!(registered.contains(&json!("demo.add")), "{got}");
    let active = got["active"][&node].as_array().expect("active");
    assert_eq!(active.len(), 1, "{got}");
    assert_eq!(active[0]["id"], json!(running.id()));
    assert_eq!(active[0]["name"], "demo.sleep_ms");
    assert_eq!(active[0]["hostname"], json!(node));
    assert_eq!(got["stats"][&node]["pool"]["max-concurrency"], json!(2));
    assert_eq!(got["glob"], json!({&node: {"ok": "pong"}}), "{got}");
    assert_eq!(got["noglob"], Value::Null, "{got}");
    worker.stop().await;
}
