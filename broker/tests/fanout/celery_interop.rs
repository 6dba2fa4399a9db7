//! With the real Celery/kombu: Celery's revoke reaches us, and a kombu node receives ours.

use super::*;

/// Python Celery's `app.control.revoke(id, terminate=True)` reaches our pidbox subscription.
pub(crate) async fn celery_revoke_reaches_us(env: Env) {
    let Some(python) = celery_python() else {
        return;
    };
    let b = env.broker().await;
    let node = format!("celtest-{}@test", env.uid);
    let mut sub = b
        .subscribe("celery.pidbox", "", &format!("{node}.celery.pidbox"))
        .await
        .unwrap();
    let task_id = format!("task-{}", env.uid);
    let script = r#"
import sys
from celery import Celery
url, prefix, task_id = sys.argv[1:4]
app = Celery(broker=url)
if prefix:
    app.conf.broker_transport_options = {'global_keyprefix': prefix}
app.control.revoke(task_id, terminate=True)
"#;
    let (url, prefix) = env.python_broker();
    let out = tokio::process::Command::new(&python)
        .args(["-c", script, &url, &prefix, &task_id])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "python: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = recv_where(&mut sub, |m| {
        serde_json::from_slice::<Value>(&m.body)
            .is_ok_and(|v| v["arguments"]["task_id"] == json!(task_id))
    })
    .await;
    let body: Value = serde_json::from_slice(&m.body).unwrap();
    assert_eq!(body["method"], "revoke");
    assert_eq!(body["arguments"]["task_id"], json!(task_id));
    assert_eq!(body["arguments"]["terminate"], json!(true));
    assert_eq!(body["destination"], Value::Null);
    assert!(body.get("reply_to").is_none(), "a cast wants no reply");
    assert_eq!(m.properties.content_type, "application/json");
    assert!(m.headers.contains_key("clock"));
    b.close().await.unwrap();
}

/// Our broadcast reaches a kombu `Node` listening the way a Celery worker's pidbox does.
pub(crate) async fn kombu_node_receives_ours(env: Env) {
    let Some(python) = celery_python() else {
        return;
    };
    let script = r#"
import json, sys
from celery import Celery
url, prefix, namespace, node = sys.argv[1:5]
app = Celery(broker=url)
app.conf.control_exchange = namespace
if prefix:
    app.conf.broker_transport_options = {'global_keyprefix': prefix}
got = []
def on_message(body, message):
    got.append({'body': body, 'headers': message.headers, 'content_type': message.content_type,
                'delivery_info': {k: message.delivery_info.get(k) for k in ('exchange', 'routing_key')}})
with app.connection_for_write() as conn:
    # As celery.worker.pidbox.Pidbox.start does it.
    pidbox = app.control.mailbox(conn).Node(node, channel=conn.channel())
    consumer = pidbox.listen(callback=on_message)
    print('ready', flush=True)
    while not got:
        conn.drain_events(timeout=10)
    consumer.cancel()
print(json.dumps(got[0]), flush=True)
"#;
    let (url, prefix) = env.python_broker();
    let node = format!("celtest-{}@test", env.uid);
    let mut child = tokio::process::Command::new(&python)
        .args(["-c", script, &url, &prefix, &env.namespace(), &node])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(PATIENCE, lines.next_line())
        .await
        .expect("python got ready")
        .unwrap();
    assert_eq!(ready.as_deref(), Some("ready"));

    // kombu subscribes on Redis only when it starts draining: send until it has one.
    let b = env.broker().await;
    let ex = env.pidbox();
    let received = async {
        let sending = async {
            loop {
                b.broadcast(&ex, "", &env.message(7)).await.unwrap();
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        tokio::select! {
            line = lines.next_line() => line.unwrap().expect("python printed what it got"),
            () = sending => unreachable!(),
        }
    };
    let line = tokio::time::timeout(PATIENCE, received)
        .await
        .expect("kombu received the broadcast");
    let status = child.wait().await.unwrap();
    assert!(status.success(), "python failed");
    let got: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        got["body"],
        json!({"method": "ping", "arguments": {"n": 7}, "destination": null,
               "pattern": null, "matcher": null})
    );
    assert_eq!(got["headers"]["test"], json!(env.uid));
    assert_eq!(got["headers"]["clock"], json!(7));
    assert_eq!(got["content_type"], "application/json");
    assert_eq!(got["delivery_info"]["exchange"], json!(ex));
    b.close().await.unwrap();
}
