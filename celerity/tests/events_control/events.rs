//! Task events reach a Python `app.events.Receiver` feeding `app.events.State` (what Flower and
//! `celery events` run): our node alive, our jobs with their events and final states.

use super::*;

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

pub(crate) async fn events_reach_a_python_receiver(env: Env) {
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
