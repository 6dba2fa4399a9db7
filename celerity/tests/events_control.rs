//! Celery events and remote control against the real thing, on Redis and on RabbitMQ:
//!
//! - our worker with task events on → a Python `app.events.Receiver` feeding `app.events.State`
//!   (what Flower and `celery events` run) lists our node as alive and our jobs with their events
//!   (sent/received/started/succeeded, failed, retried, revoked) and final states;
//! - Python's `celery inspect ping` (the real CLI) and `app.control.inspect().registered()/active()`
//!   get answers from our worker;
//! - `celerity inspect ping/registered/revoked` (the real binary) is answered by a Python Celery
//!   worker (which learned our revoked ids at startup through mingle's `hello`), and by ours; `celerity control rate-limit` / `pool-grow` change our worker, as `inspect stats` and
//!   `inspect registered` then show.
//!
//! - `celerity worker -P 2` shows up as two nodes, one per child process;
//! - Flower 2.2 (its own venv, `scripts/flower-venv.sh`) lists our node online with its registered
//!   tasks, pool and queues, and our job as SUCCESS with its result.
//!
//! Every test has its own node name and queue (and on Redis its own `global_keyprefix`, deleted at
//! the end). `CELERITY_NO_PYTHON=1` skips the Python halves; otherwise a missing Celery venv fails.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use celerity_broker::protocol::event::EVENT_EXCHANGE;
use celerity_broker::testkit::celery_python;
use celerity_broker::{connect_broker, Broker};
use celerity_client::control::Target;
use celerity_client::{Client, Expires, SendOptions};
use celerity_worker::events::EventsConfig;
use celerity_worker::{run, Registry, Shutdown, WorkerConfig};
use serde_json::{json, Map, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

/// A bound so a broken test fails instead of hanging (not a speed assertion).
const PATIENCE: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Transport {
    Redis,
    Amqp,
}

/// One test's names; cleans up on drop.
struct Env {
    transport: Transport,
    uid: String,
    queue: String,
}

impl Env {
    fn new(transport: Transport) -> Self {
        let uid = uuid::Uuid::new_v4().simple().to_string();
        Env {
            transport,
            queue: format!("evctl-{uid}"),
            uid,
        }
    }

    fn prefix(&self) -> String {
        format!("evctl:{}:", self.uid)
    }

    fn url(&self) -> String {
        match self.transport {
            Transport::Redis => format!(
                "redis://127.0.0.1:6379/0?global_keyprefix={}",
                self.prefix()
            ),
            Transport::Amqp => "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
        }
    }

    /// Broker URL and key prefix as Python takes them.
    fn python_broker(&self) -> (String, String) {
        match self.transport {
            Transport::Redis => ("redis://127.0.0.1:6379/0".into(), self.prefix()),
            Transport::Amqp => ("amqp://guest:guest@127.0.0.1:5672//".into(), String::new()),
        }
    }

    /// Our worker's node name.
    fn node(&self) -> String {
        format!("rs-{}@test", self.uid)
    }

    async fn broker(&self) -> Arc<dyn Broker> {
        connect_broker(&self.url()).await.unwrap()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let (transport, prefix, queues) = (
            self.transport,
            self.prefix(),
            [self.queue.clone(), format!("{}-py", self.queue)],
        );
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                match transport {
                    Transport::Redis => {
                        celerity_broker::testkit::delete_redis_prefix(&prefix).await
                    }
                    Transport::Amqp => {
                        for q in &queues {
                            celerity_broker::testkit::delete_amqp_queue(q).await;
                        }
                    }
                }
            })
        });
        let _ = cleanup.join();
    }
}

/// Our worker in this process (demo tasks, task events on), stopped warm on [`OurWorker::stop`].
struct OurWorker {
    shutdown: Shutdown,
    handle: tokio::task::JoinHandle<celerity_worker::error::Result<celerity_worker::Summary>>,
}

impl OurWorker {
    async fn start(env: &Env, concurrency: usize) -> OurWorker {
        Self::start_with(env, |c| c.concurrency = concurrency).await
    }

    /// Starts with the test defaults changed by `adjust`.
    async fn start_with(env: &Env, adjust: impl FnOnce(&mut WorkerConfig)) -> OurWorker {
        let mut registry = Registry::new();
        celerity_worker::demo::register(&mut registry);
        let mut config = WorkerConfig {
            queues: vec![env.queue.clone()],
            concurrency: 2,
            hostname: env.node(),
            // Long enough for a job held by a rate limit to get its turn during a warm stop.
            grace: Duration::from_secs(30),
            events: EventsConfig {
                task_events: true,
                heartbeat: true,
            },
            ..WorkerConfig::default()
        };
        adjust(&mut config);
        let shutdown = Shutdown::default();
        let handle = tokio::spawn(run(
            registry,
            env.broker().await,
            None,
            config,
            shutdown.clone(),
        ));
        let worker = OurWorker { shutdown, handle };
        worker.wait_until_answering(env).await;
        worker
    }

    /// Pings until the worker's remote control answers (it subscribes as it starts).
    async fn wait_until_answering(&self, env: &Env) {
        let client = Client::new(env.broker().await, None);
        let target = Target {
            destination: vec![env.node()],
            timeout: Duration::from_millis(500),
        };
        let until = tokio::time::Instant::now() + PATIENCE;
        loop {
            let replies = client
                .control_call("ping", Map::new(), &target)
                .await
                .unwrap();
            if !replies.is_empty() {
                assert_eq!(replies[0].node, env.node());
                assert_eq!(replies[0].value, json!({"ok": "pong"}));
                return;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "our worker never answered ping"
            );
        }
    }

    async fn stop(self) -> celerity_worker::Summary {
        self.shutdown.warm.cancel();
        self.handle.await.unwrap().unwrap()
    }
}

/// Runs the real `celerity` binary; returns (exit ok, stdout).
async fn celerity(env: &Env, args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_celerity"))
        .arg("--broker")
        .arg(env.url())
        .args(args)
        .env_remove("CELERITY_BROKER_URL")
        .env_remove("CELERITY_RESULT_BACKEND")
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Runs `celerity inspect|control … --json -d <node>` and returns that node's reply.
async fn celerity_json(env: &Env, node: &str, args: &[&str]) -> Value {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--json", "-d", node, "-t", "10"]);
    let (ok, out) = celerity(env, &all).await;
    assert!(ok, "celerity {args:?} failed: {out}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    v[node].clone()
}

// ---------------------------------------------------------------------------------------------
// Events.

/// Listens like Flower: `app.events.State` fed by a `Receiver` bound to every event. Prints `ready`
/// once an event of our node arrived (so it is surely subscribed), then stops when every expected
/// job reached its state (or at the deadline) and prints what State knows as one JSON line.
const RECEIVER: &str = r#"
import sys, json, threading
from collections import defaultdict
from celery import Celery
url, prefix, node, deadline = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
expect = dict(a.split('=') for a in sys.argv[5:])
app = Celery(broker=url)
if prefix:
    app.conf.broker_transport_options = {'global_keyprefix': prefix}
state = app.events.State()
types = defaultdict(list)
seen = {'ready': False}
def on_event(e):
    state.event(e)
    if 'uuid' in e and e['uuid'] in expect:
        types[e['uuid']].append(e['type'])
    if e.get('hostname') == node and not seen['ready']:
        seen['ready'] = True
        print('ready', flush=True)
    if all(u in state.tasks and state.tasks[u].state == s for u, s in expect.items()):
        recv.should_stop = True
with app.connection() as conn:
    recv = app.events.Receiver(conn, handlers={'*': on_event})
    timer = threading.Timer(deadline, lambda: setattr(recv, 'should_stop', True))
    timer.start()
    recv.capture(limit=None, timeout=None, wakeup=True)
    timer.cancel()
w = state.workers.get(node)
print(json.dumps({
    'worker': None if w is None else {
        'alive': w.alive, 'sw_ident': w.sw_ident, 'sw_sys': w.sw_sys, 'freq': w.freq, 'pid': w.pid},
    'tasks': {u: {'state': t.state, 'name': t.name, 'result': t.result, 'exception': t.exception,
                  'args': t.args, 'types': types[u],
                  'worker': t.worker.hostname if t.worker else None}
              for u, t in state.tasks.items() if u in expect},
}), flush=True)
"#;

async fn events_reach_a_python_receiver(env: Env) {
    let Some(python) = celery_python() else {
        return;
    };
    let worker = OurWorker::start(&env, 4).await;
    let ids: Vec<String> = (0..4).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    let expect = [
        format!("{}=SUCCESS", ids[0]),
        format!("{}=FAILURE", ids[1]),
        format!("{}=SUCCESS", ids[2]),
        format!("{}=REVOKED", ids[3]),
    ];
    let (url, prefix) = env.python_broker();
    let mut args = vec![
        "-c".to_owned(),
        RECEIVER.to_owned(),
        url,
        prefix,
        env.node(),
        "25".to_owned(),
    ];
    args.extend(expect.iter().cloned());
    let mut receiver = tokio::process::Command::new(&python)
        .args(&args)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(receiver.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(PATIENCE, lines.next_line())
        .await
        .expect("the receiver saw our worker's heartbeat")
        .unwrap();
    assert_eq!(ready.as_deref(), Some("ready"));

    let client = Client::new(env.broker().await, None).with_sent_events(true);
    let on = |id: &str| SendOptions::new().queue(env.queue.clone()).task_id(id);
    client
        .send_task(
            "demo.add",
            vec![json!(2), json!(3)],
            Map::new(),
            &on(&ids[0]),
        )
        .await
        .unwrap();
    client
        .send_task("demo.fail", vec![json!("boom")], Map::new(), &on(&ids[1]))
        .await
        .unwrap();
    client
        .send_task(
            "demo.flaky",
            vec![json!("k"), json!(1)],
            Map::new(),
            &on(&ids[2]),
        )
        .await
        .unwrap();
    let past = chrono::Utc::now() - chrono::Duration::seconds(60);
    client
        .send_task(
            "demo.add",
            vec![json!(1), json!(1)],
            Map::new(),
            &on(&ids[3]).expires(Expires::At(past)),
        )
        .await
        .unwrap();

    let line = tokio::time::timeout(PATIENCE, lines.next_line())
        .await
        .expect("the receiver finished")
        .unwrap()
        .expect("the receiver printed what it saw");
    let status = receiver.wait().await.unwrap();
    assert!(status.success(), "the receiver failed");
    let seen: Value = serde_json::from_str(&line).unwrap();
    worker.stop().await;

    let w = &seen["worker"];
    assert_eq!(w["alive"], json!(true), "{seen}");
    assert_eq!(w["sw_ident"], json!("celerity"));
    assert_eq!(w["sw_sys"], json!("Linux"));
    assert_eq!(w["freq"], json!(2.0));
    assert_eq!(w["pid"], json!(std::process::id()));
    let task = |i: usize| &seen["tasks"][&ids[i]];
    let types = |i: usize| -> Vec<String> {
        task(i)["types"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().to_owned())
            .collect()
    };
    let has_all = |i: usize, want: &[&str]| {
        let got = types(i);
        for w in want {
            assert!(got.iter().any(|g| g == w), "job {i}: no {w} in {got:?}");
        }
    };
    assert_eq!(task(0)["state"], "SUCCESS", "{seen}");
    assert_eq!(task(0)["name"], "demo.add");
    assert_eq!(task(0)["result"], "5");
    assert_eq!(task(0)["args"], "(2, 3)");
    assert_eq!(task(0)["worker"], json!(env.node()));
    has_all(
        0,
        &[
            "task-sent",
            "task-received",
            "task-started",
            "task-succeeded",
        ],
    );
    assert_eq!(task(1)["state"], "FAILURE");
    assert_eq!(task(1)["exception"], "ValueError('boom')");
    has_all(1, &["task-received", "task-started", "task-failed"]);
    assert_eq!(task(2)["state"], "SUCCESS");
    has_all(2, &["task-retried", "task-succeeded"]);
    assert_eq!(task(3)["state"], "REVOKED");
    has_all(3, &["task-received", "task-revoked"]);
}

// ---------------------------------------------------------------------------------------------
// Python asks us.

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

/// A module the `celery` CLI can load with `-A`.
const PY_APP: &str = r#"
import os
from celery import Celery
app = Celery('evctl_app', broker=os.environ['EVCTL_BROKER'])
if os.environ.get('EVCTL_PREFIX'):
    app.conf.broker_transport_options = {'global_keyprefix': os.environ['EVCTL_PREFIX']}

@app.task(name='py.add')
def add(x, y):
    return x + y
"#;

/// A directory holding the app module (removed on drop).
struct PyApp(std::path::PathBuf);

impl PyApp {
    fn new(env: &Env) -> Self {
        let dir = std::env::temp_dir().join(format!("evctl-{}", env.uid));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("evctl_app.py"), PY_APP).unwrap();
        PyApp(dir)
    }

    /// `celery` of the venv, in the app's directory, pointed at this test's broker.
    fn celery(&self, python: &std::path::Path, env: &Env) -> tokio::process::Command {
        let (url, prefix) = env.python_broker();
        let mut c = tokio::process::Command::new(python.with_file_name("celery"));
        c.current_dir(&self.0)
            .env("EVCTL_BROKER", url)
            .env("EVCTL_PREFIX", prefix)
            .args(["-A", "evctl_app"]);
        c
    }
}

impl Drop for PyApp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn python_inspects_our_worker(env: Env) {
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

// ---------------------------------------------------------------------------------------------
// We ask Python, and ourselves.

async fn celerity_inspects_a_python_worker(env: Env) {
    let Some(python) = celery_python() else {
        return;
    };
    // Ours runs first and knows a revoked id; the Python worker learns it at startup (mingle).
    let ours = OurWorker::start(&env, 1).await;
    let revoked_id = uuid::Uuid::new_v4().to_string();
    let reply = celerity_json(&env, &env.node(), &["control", "revoke", &revoked_id]).await;
    assert!(reply["ok"].is_string(), "{reply}");
    let app = PyApp::new(&env);
    let node = format!("py-{}@test", env.uid);
    let log = app.0.join("worker.log");
    let mut child = app
        .celery(&python, &env)
        .args([
            "worker",
            "-n",
            &node,
            "-Q",
            &format!("{}-py", env.queue),
            "-P",
            "solo",
            "--without-gossip",
            "-l",
            "info",
        ])
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(app.0.join("worker.err")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let until = tokio::time::Instant::now() + PATIENCE;
    let pong = loop {
        let (ok, out) = celerity(&env, &["inspect", "ping", "-d", &node, "-t", "2"]).await;
        if ok {
            break out;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "the Python worker never answered: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    };
    assert!(
        pong.contains(&format!("-> {node}: OK")) && pong.contains("pong"),
        "{pong}"
    );
    let registered = celerity_json(&env, &node, &["inspect", "registered"]).await;
    assert!(
        registered.as_array().unwrap().contains(&json!("py.add")),
        "{registered}"
    );
    let revoked = celerity_json(&env, &node, &["inspect", "revoked"]).await;
    assert!(
        revoked.as_array().unwrap().contains(&json!(revoked_id)),
        "mingle did not pass our revoked id: {revoked}"
    );
    ours.stop().await;
    let _ = child.start_kill();
    let _ = child.wait().await;
}

async fn celerity_controls_our_worker(env: Env) {
    let worker = OurWorker::start(&env, 3).await;
    let node = env.node();
    let (ok, out) = celerity(&env, &["inspect", "ping", "-d", &node, "-t", "10"]).await;
    assert!(ok && out.contains(&format!("-> {node}: OK")), "{out}");
    let registered = celerity_json(&env, &node, &["inspect", "registered"]).await;
    assert!(registered.as_array().unwrap().contains(&json!("demo.add")));

    let reply = celerity_json(&env, &node, &["control", "rate-limit", "demo.add", "7/m"]).await;
    assert_eq!(reply, json!({"ok": "new rate limit set successfully"}));
    let stats = celerity_json(&env, &node, &["inspect", "stats"]).await;
    assert_eq!(stats["rate_limits"]["demo.add"], "7/m", "{stats}");
    let registered = celerity_json(&env, &node, &["inspect", "registered"]).await;
    assert!(
        registered
            .as_array()
            .unwrap()
            .contains(&json!("demo.add [rate_limit=7/m]")),
        "{registered}"
    );
    let reply = celerity_json(&env, &node, &["control", "rate-limit", "nope.task", "1/s"]).await;
    assert_eq!(reply, json!({"error": "unknown task"}));

    // The limit applies to jobs not started yet: 7/m lets the first 7 start at once (a full
    // bucket), the 8th waits about 8.6 s — it is still reserved when we look.
    let client = Client::new(env.broker().await, None);
    for i in 0..8 {
        client
            .send_task(
                "demo.add",
                vec![json!(i), json!(i)],
                Map::new(),
                &SendOptions::new().queue(env.queue.clone()),
            )
            .await
            .unwrap();
    }
    let until = tokio::time::Instant::now() + PATIENCE;
    loop {
        let stats = celerity_json(&env, &node, &["inspect", "stats"]).await;
        if stats["total"]["demo.add"] == json!(7) {
            break;
        }
        assert!(tokio::time::Instant::now() < until, "{stats}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reserved = celerity_json(&env, &node, &["inspect", "reserved"]).await;
    let reserved = reserved.as_array().unwrap();
    assert_eq!(reserved.len(), 1, "{reserved:?}");
    let stats = celerity_json(&env, &node, &["inspect", "stats"]).await;
    assert_eq!(stats["total"]["demo.add"], json!(7), "{stats}");
    // The held job is revoked: it is skipped when its turn comes.
    let held = reserved[0]["id"].as_str().unwrap().to_owned();
    let reply = celerity_json(&env, &node, &["control", "revoke", &held]).await;
    assert_eq!(
        reply,
        json!({"ok": format!("tasks {{{held}}} flagged as revoked")})
    );
    let revoked = celerity_json(&env, &node, &["inspect", "revoked"]).await;
    assert_eq!(revoked, json!([held]));

    let reply = celerity_json(&env, &node, &["control", "pool-grow", "2"]).await;
    assert_eq!(reply, json!({"ok": "pool will grow"}));
    let stats = celerity_json(&env, &node, &["inspect", "stats"]).await;
    assert_eq!(stats["pool"]["max-concurrency"], json!(5));
    let reply = celerity_json(&env, &node, &["control", "pool-shrink", "4"]).await;
    assert_eq!(reply, json!({"ok": "pool will shrink"}));
    let stats = celerity_json(&env, &node, &["inspect", "stats"]).await;
    assert_eq!(stats["pool"]["max-concurrency"], json!(1));

    // Remote shutdown is a warm stop of this node only, and it says goodbye (worker-offline).
    let broker = env.broker().await;
    let mut events = broker
        .subscribe(
            EVENT_EXCHANGE,
            "#",
            &format!("celeryev.{}", uuid::Uuid::new_v4()),
        )
        .await
        .unwrap();
    let reply = celerity_json(&env, &node, &["control", "shutdown"]).await;
    assert_eq!(reply, json!({"ok": "Got shutdown from remote"}));
    let summary = tokio::time::timeout(PATIENCE, worker.handle)
        .await
        .expect("the worker stopped after remote shutdown")
        .unwrap()
        .unwrap();
    assert_eq!((summary.succeeded, summary.revoked), (7, 1), "{summary:?}");
    let offline = tokio::time::timeout(PATIENCE, async {
        loop {
            let m = events
                .next()
                .await
                .unwrap()
                .expect("events subscription ended");
            let mine = celerity_broker::protocol::event::from_message(&m)
                .into_iter()
                .find(|e| e["hostname"] == json!(node) && e["type"] == "worker-offline");
            if let Some(e) = mine {
                return e;
            }
        }
    })
    .await
    .expect("no worker-offline from our node");
    assert_eq!(offline["sw_ident"], "celerity");
    assert_eq!(offline["active"], json!(0));
    assert_eq!(offline["processed"], json!(8), "{offline:?}");
    broker.close().await.unwrap();
}

/// A job waiting for its ETA is listed by `inspect scheduled` (Celery's shape: eta, priority,
/// request), and by `query_task`.
async fn scheduled_jobs_are_listed(env: Env) {
    let worker = OurWorker::start_with(&env, |c| {
        // Held in the worker, not parked on the broker; given back quickly at the stop.
        c.park_after = Duration::from_secs(3600);
        c.grace = Duration::from_millis(200);
    })
    .await;
    let client = Client::new(env.broker().await, None);
    let job = client
        .send_task(
            "demo.add",
            vec![json!(1), json!(2)],
            Map::new(),
            &SendOptions::new()
                .queue(env.queue.clone())
                .countdown(Duration::from_secs(600)),
        )
        .await
        .unwrap();
    let node = env.node();
    let until = tokio::time::Instant::now() + PATIENCE;
    let scheduled = loop {
        let v = celerity_json(&env, &node, &["inspect", "scheduled"]).await;
        if v.as_array().is_some_and(|a| !a.is_empty()) {
            break v;
        }
        assert!(tokio::time::Instant::now() < until, "never scheduled: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let entry = &scheduled[0];
    assert_eq!(entry["request"]["id"], json!(job.id()), "{scheduled}");
    assert_eq!(entry["request"]["name"], "demo.add");
    assert_eq!(entry["request"]["args"], json!([1, 2]));
    assert!(
        entry["eta"].as_str().is_some_and(|e| e.len() >= 19),
        "{entry}"
    );
    let reserved = celerity_json(&env, &node, &["inspect", "reserved"]).await;
    assert_eq!(reserved, json!([]));
    let found = client
        .control_call(
            "query_task",
            serde_json::from_value(json!({"ids": [job.id()]})).unwrap(),
            &Target {
                destination: vec![node.clone()],
                timeout: Duration::from_secs(10),
            },
        )
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(
        found[0].value[job.id()][0],
        "scheduled",
        "{:?}",
        found[0].value
    );
    // Cold stop after the short grace: the held job goes back to the queue, nothing ran.
    let summary = worker.stop().await;
    assert_eq!(summary.succeeded, 0);
}

/// `celerity worker -P 2`: each child process is its own node (`<name>-0@…`, `<name>-1@…`) with its
/// own pid, and both answer.
async fn pool_children_are_nodes(env: Env) {
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
async fn flower_lists_our_worker(env: Env) {
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

mod redis {
    use super::*;

    fn env() -> Env {
        Env::new(Transport::Redis)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn scheduled_jobs_are_listed() {
        super::scheduled_jobs_are_listed(env()).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn flower_lists_our_worker() {
        super::flower_lists_our_worker(env()).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn pool_children_are_nodes() {
        super::pool_children_are_nodes(env()).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn events_reach_a_python_receiver() {
        super::events_reach_a_python_receiver(env()).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn python_inspects_our_worker() {
        super::python_inspects_our_worker(env()).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn celerity_inspects_a_python_worker() {
        super::celerity_inspects_a_python_worker(env()).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn celerity_controls_our_worker() {
        super::celerity_controls_our_worker(env()).await
    }
}

mod amqp {
    use super::*;

    fn env() -> Env {
        Env::new(Transport::Amqp)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn scheduled_jobs_are_listed() {
        super::scheduled_jobs_are_listed(env()).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn flower_lists_our_worker() {
        super::flower_lists_our_worker(env()).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn pool_children_are_nodes() {
        super::pool_children_are_nodes(env()).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn events_reach_a_python_receiver() {
        super::events_reach_a_python_receiver(env()).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn python_inspects_our_worker() {
        super::python_inspects_our_worker(env()).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn celerity_inspects_a_python_worker() {
        super::celerity_inspects_a_python_worker(env()).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn celerity_controls_our_worker() {
        super::celerity_controls_our_worker(env()).await
    }
}
