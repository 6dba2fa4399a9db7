//! Messages from our encoder are accepted by Celery's worker-side decoding (`accept.py`), which also
//! rejects what Celery rejects.

use super::*;

/// Messages built by our encoder, covering what the captured vectors cover.
fn our_messages() -> Vec<TaskMessage> {
    let kw = |v: Value| v.as_object().cloned().unwrap();
    let mut out = Vec::new();

    out.push(TaskMessage::new(
        "proj.tasks.add",
        vec![json!(2), json!(3)],
        Map::new(),
    ));

    out.push(TaskMessage::new(
        "proj.tasks.echo",
        vec![
            json!("héllo ☃"),
            json!("emoji 😀🎉"),
            json!({"nested": [1, [2, [3, null]], {"x": 1.25, "flag": true}]}),
            json!("ctl: tab\t nl\n del\u{7f}"),
        ],
        kw(json!({"name": "Zoë ☕", "tags": ["ä", "🚀"], "none": null})),
    ));

    let mut timed = TaskMessage::new("proj.tasks.add", vec![json!(2), json!(3)], Map::new());
    timed.headers.eta = Some(parse_iso("2030-01-02T03:04:05.678901+00:00").unwrap());
    timed.headers.expires = Some(parse_iso("2031-01-01T00:00:00+00:00").unwrap());
    timed.headers.timelimit = (Some(10.0), Some(5.5));
    timed.headers.retries = 2;
    timed.properties.priority = 7;
    timed.properties.expiration = Some("60000".into());
    out.push(timed);

    let mut chained = TaskMessage::new("proj.tasks.add", vec![json!(2), json!(2)], Map::new());
    let step = |task: &str, arg: i64, id: &str| {
        let mut s = Signature::new(task, vec![json!(arg)], Map::new());
        s.options.insert("task_id".into(), json!(id));
        s.to_value()
    };
    chained.embed.chain = json!([
        step("proj.tasks.mul", 8, "3e1f0000-0000-4000-8000-000000000003"),
        step("proj.tasks.add", 4, "3e1f0000-0000-4000-8000-000000000002"),
    ]);
    chained.embed.callbacks = json!([step(
        "proj.tasks.echo",
        1,
        "3e1f0000-0000-4000-8000-0000000000c1"
    )]);
    out.push(chained);

    let mut member = TaskMessage::new("proj.tasks.add", vec![json!(1), json!(1)], Map::new());
    member.headers.group = Some("0f9e8d7c-6b5a-4c3d-8e2f-1a0b9c8d7e6f".into());
    member.headers.group_index = Some(1);
    member.headers.parent_id = Some("5b4a3c2d-1e0f-4a9b-8c7d-6e5f4a3b2c1d".into());
    member.headers.root_id = Some("5b4a3c2d-1e0f-4a9b-8c7d-6e5f4a3b2c1d".into());
    member.headers.shadow = Some("add-shadowed".into());
    let mut body = Signature::new("proj.tasks.xsum", vec![], Map::new());
    body.options.insert(
        "task_id".into(),
        json!("cb000000-0000-4000-8000-000000000001"),
    );
    body.options.insert(
        "group_id".into(),
        json!("0f9e8d7c-6b5a-4c3d-8e2f-1a0b9c8d7e6f"),
    );
    member.embed.chord = body.to_value();
    out.push(member);

    out
}

/// The AMQP form accept.py reads.
fn accept_item(m: &Message) -> Value {
    let p = &m.properties;
    let mut props = json!({
        "content_type": p.content_type,
        "content_encoding": p.content_encoding,
        "delivery_mode": p.delivery_mode,
        "priority": p.priority,
    });
    let o = props.as_object_mut().unwrap();
    for (k, v) in [
        ("correlation_id", &p.correlation_id),
        ("reply_to", &p.reply_to),
        ("expiration", &p.expiration),
    ] {
        if let Some(v) = v {
            o.insert(k.into(), json!(v));
        }
    }
    json!({
        "properties": props,
        "headers": m.headers,
        "body": String::from_utf8(m.body.clone()).unwrap(),
    })
}

#[test]
fn celery_accepts_messages_from_our_encoder() {
    let Some(python) = celerity_testsupport::celery_python() else {
        return;
    };
    let messages = our_messages();
    let encoded: Vec<Message> = messages.iter().map(TaskMessage::encode).collect();
    let input = Value::Array(encoded.iter().map(accept_item).collect());

    let mut child = Command::new(&python)
        .arg(vectors_dir().join("accept.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "accept.py failed: {:?}", out.status);
    let views: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(views.len(), messages.len());
    for (i, (t, view)) in messages.iter().zip(&views).enumerate() {
        assert_eq!(view["index"], i);
        // Round-trip through our decoder too, so both sides are compared on the same footing.
        let ours = TaskMessage::decode(&encoded[i]).unwrap();
        assert_eq!(&ours, t, "message {i}: our decoder");
        assert_matches_celery(&format!("ours#{i}"), t, view);
    }
    assert_eq!(views[2]["eta"], "2030-01-02T03:04:05.678901+00:00");
    assert_eq!(views[2]["timelimit"], json!([10, 5.5]));
    assert_eq!(views[3]["chain"][0]["task"], "proj.tasks.mul");
    assert_eq!(views[4]["chord"]["task"], "proj.tasks.xsum");
    assert_eq!(views[4]["name"], "add-shadowed");
}

#[test]
fn accept_py_rejects_what_celery_rejects() {
    let Some(python) = celerity_testsupport::celery_python() else {
        return;
    };
    let good = TaskMessage::new("proj.tasks.add", vec![json!(1)], Map::new()).encode();
    let mut pickle = good.clone();
    pickle.properties.content_type = "application/x-python-serialize".into();
    let mut bad_eta = good.clone();
    bad_eta.headers.insert("eta".into(), json!("tomorrow"));
    let input = Value::Array(vec![
        accept_item(&good),
        accept_item(&pickle),
        accept_item(&bad_eta),
    ]);
    let mut child = Command::new(&python)
        .arg(vectors_dir().join("accept.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let oks: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["ok"].clone())
        .collect();
    assert_eq!(oks, [json!(true), json!(false), json!(false)]);
}
