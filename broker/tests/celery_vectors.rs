//! Wire compatibility with real Python Celery 5.7, checked against captured test vectors.
//!
//! `tests/vectors/` holds bytes that Celery itself put on Redis and RabbitMQ, and result documents
//! its Redis backend wrote (see `tests/vectors/README.md` for how they were captured). These tests
//! decode every captured message with [`TaskMessage::decode`] and compare the result with what
//! Celery's own worker understood (`celery_view`), re-encode it and demand Celery's exact bytes,
//! and read/write every backend document with [`TaskMeta`]. The last test goes the other way: it
//! feeds messages made by our encoder to Celery's worker-side decoding (`tests/vectors/accept.py`,
//! run in the venv from `scripts/celery-venv.sh`) and checks Celery understood each one.
//! Set `CELERITY_NO_PYTHON=1` to skip that one test on machines without Python.

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine as _;
use celerity_broker::backend::{ExceptionInfo, State, TaskMeta};
use celerity_broker::protocol::time::{format_iso, parse_iso};
use celerity_broker::protocol::{Signature, TaskMessage};
use celerity_broker::{pyjson, Message, Properties};
use serde_json::{json, Map, Value};

// ---------------------------------------------------------------------------------------------
// Loading the vectors.

fn vectors_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors")
}

/// Every `<group>/<case>.json`, sorted by case name.
fn load_group(group: &str) -> Vec<(String, Value)> {
    let dir = vectors_dir().join(group);
    let mut out: Vec<(String, Value)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let doc: Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p.file_stem().unwrap().to_string_lossy().into_owned(), doc)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Raw bytes stored as `field` (UTF-8 text) or `field_base64`.
fn raw(obj: &Value, field: &str) -> Vec<u8> {
    if let Some(s) = obj[field].as_str() {
        return s.as_bytes().to_vec();
    }
    let b64 = obj[format!("{field}_base64")]
        .as_str()
        .unwrap_or_else(|| panic!("no `{field}` or `{field}_base64` in {obj}"));
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
}

fn opt_str(v: &Value) -> Option<String> {
    v.as_str().map(str::to_owned)
}

/// Properties as Celery/py-amqp reported them (AMQP) or as kombu put them in the envelope (Redis).
fn properties_from(p: &Value, content_type: &Value, content_encoding: &Value) -> Properties {
    Properties {
        content_type: content_type.as_str().unwrap().to_owned(),
        content_encoding: content_encoding.as_str().unwrap().to_owned(),
        correlation_id: opt_str(&p["correlation_id"]),
        reply_to: opt_str(&p["reply_to"]),
        delivery_mode: p["delivery_mode"].as_u64().unwrap() as u8,
        priority: p["priority"].as_u64().unwrap() as u8,
        expiration: opt_str(&p["expiration"]),
    }
}

/// The captured AMQP message as a [`Message`].
fn amqp_message(rec: &Value) -> Message {
    let p = &rec["properties"];
    Message {
        properties: properties_from(p, &p["content_type"], &p["content_encoding"]),
        headers: rec["headers"].as_object().unwrap().clone(),
        body: raw(rec, "body"),
    }
}

/// The captured Redis list element, parsed as kombu's virtual transport does (body base64-decoded).
fn redis_message(envelope: &str) -> Message {
    let env: Value = serde_json::from_str(envelope).unwrap();
    let p = &env["properties"];
    assert_eq!(p["body_encoding"], "base64");
    Message {
        properties: properties_from(p, &env["content-type"], &env["content-encoding"]),
        headers: env["headers"].as_object().unwrap().clone(),
        body: base64::engine::general_purpose::STANDARD
            .decode(env["body"].as_str().unwrap())
            .unwrap(),
    }
}

// ---------------------------------------------------------------------------------------------
// Comparing a decoded message with what Celery understood.

fn time_str(t: &Option<chrono::DateTime<chrono::FixedOffset>>) -> Value {
    t.as_ref().map_or(Value::Null, |t| json!(format_iso(t)))
}

fn opt_json(v: &Option<String>) -> Value {
    v.as_ref().map_or(Value::Null, |s| json!(s))
}

fn timelimit_of(v: &Value) -> (Option<f64>, Option<f64>) {
    let a = v.as_array().unwrap();
    (a[0].as_f64(), a[1].as_f64())
}

/// The signature summary accept.py prints, built from our [`Signature`].
fn sig_info(s: &Signature) -> Value {
    json!({
        "task": s.task,
        "args": s.args,
        "kwargs": s.kwargs,
        "task_id": s.task_id(),
        "subtask_type": s.subtask_type,
        "immutable": s.immutable,
    })
}

fn sig_list_info(v: &Value) -> Value {
    if v.is_null() {
        return Value::Null;
    }
    let sigs = Signature::list_from_value(v).unwrap();
    Value::Array(sigs.iter().map(sig_info).collect())
}

/// Asserts our decoding of a message agrees with Celery's on every field Celery reports.
fn assert_matches_celery(what: &str, t: &TaskMessage, view: &Value) {
    assert_eq!(view["ok"], true, "{what}: {view}");
    let h = &t.headers;
    let name = h.shadow.clone().unwrap_or_else(|| h.task.clone());
    let ours = json!({
        "task": h.task,
        "name": name,
        "id": h.id,
        "args": t.args,
        "kwargs": t.kwargs,
        "eta": time_str(&h.eta),
        "expires": time_str(&h.expires),
        "retries": h.retries,
        "root_id": opt_json(&h.root_id),
        "parent_id": opt_json(&h.parent_id),
        "group": opt_json(&h.group),
        "group_index": h.group_index,
        "shadow": opt_json(&h.shadow),
        "origin": opt_json(&h.origin),
        "argsrepr": opt_json(&h.argsrepr),
        "kwargsrepr": opt_json(&h.kwargsrepr),
        "replaced_task_nesting": h.replaced_task_nesting,
        "stamped_headers": h.stamped_headers,
        "stamps": h.stamps,
        "reply_to": opt_json(&t.properties.reply_to),
        "correlation_id": opt_json(&t.properties.correlation_id),
        "priority": t.properties.priority,
        "callbacks": sig_list_info(&t.embed.callbacks),
        "errbacks": sig_list_info(&t.embed.errbacks),
        "chain": sig_list_info(&t.embed.chain),
        "chord": if t.embed.chord.is_null() {
            Value::Null
        } else {
            sig_info(&Signature::from_value(&t.embed.chord).unwrap())
        },
    });
    let mut celery = view.clone();
    let celery = celery.as_object_mut().unwrap();
    celery.insert("priority".into(), view["delivery_info"]["priority"].clone());
    for (key, value) in ours.as_object().unwrap() {
        assert_eq!(
            Some(value),
            celery.get(key),
            "{what}: `{key}` differs from what Celery understood"
        );
    }
    assert_eq!(
        h.timelimit,
        timelimit_of(&view["timelimit"]),
        "{what}: timelimit"
    );
}

/// Asserts re-encoding gives Celery's exact body bytes and the same headers in the same order.
fn assert_reencodes_exactly(what: &str, t: &TaskMessage, original: &Message) {
    let again = t.encode();
    assert_eq!(
        String::from_utf8_lossy(&again.body),
        String::from_utf8_lossy(&original.body),
        "{what}: body bytes"
    );
    assert_eq!(again.headers, original.headers, "{what}: headers");
    let keys = |m: &Map<String, Value>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        keys(&again.headers),
        keys(&original.headers),
        "{what}: header order"
    );
    assert_eq!(
        pyjson::to_string(&again.headers),
        pyjson::to_string(&original.headers),
        "{what}: headers as text"
    );
    assert_eq!(again.properties, original.properties, "{what}: properties");
}

/// Cases whose args hold numbers Python spells differently from serde_json (`1e-07` vs `1e-7`).
const FLOAT_CASE: &str = "floats";

fn each_message(group: &str, mut check: impl FnMut(&str, &Value)) -> usize {
    let docs = load_group(group);
    assert!(
        docs.len() >= 13,
        "expected the {group} vectors, found {}",
        docs.len()
    );
    let mut n = 0;
    for (case, doc) in &docs {
        assert_eq!(doc["celery_version"], "5.7.0");
        let messages = doc["messages"].as_array().unwrap();
        assert!(!messages.is_empty(), "{group}/{case}: no messages");
        for (i, rec) in messages.iter().enumerate() {
            check(&format!("{group}/{case}#{i}"), rec);
            n += 1;
        }
    }
    n
}

// ---------------------------------------------------------------------------------------------
// Task messages.

#[test]
fn amqp_vectors_decode_as_celery_understood_them() {
    let n = each_message("amqp", |what, rec| {
        let m = amqp_message(rec);
        let t = TaskMessage::decode(&m).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_matches_celery(what, &t, &rec["celery_view"]);
    });
    assert_eq!(n, 16);
}

#[test]
fn amqp_vectors_reencode_to_celerys_bytes() {
    each_message("amqp", |what, rec| {
        if what.contains(&format!("/{FLOAT_CASE}#")) {
            return;
        }
        let m = amqp_message(rec);
        let t = TaskMessage::decode(&m).unwrap();
        assert_reencodes_exactly(what, &t, &m);
    });
}

#[test]
fn redis_vectors_decode_as_celery_understood_them() {
    let n = each_message("redis", |what, rec| {
        let m = redis_message(rec["envelope"].as_str().unwrap());
        assert_eq!(m.body, raw(rec, "body"), "{what}: base64 body");
        let t = TaskMessage::decode(&m).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_matches_celery(what, &t, &rec["celery_view"]);
    });
    assert_eq!(n, 16);
}

#[test]
fn redis_vectors_reencode_to_celerys_bytes() {
    each_message("redis", |what, rec| {
        let envelope = rec["envelope"].as_str().unwrap();
        // The envelope itself is Python `json.dumps` output: pyjson must write it back unchanged.
        let parsed: Value = serde_json::from_str(envelope).unwrap();
        assert_eq!(
            pyjson::to_string(&parsed),
            envelope,
            "{what}: envelope text"
        );
        if what.contains(&format!("/{FLOAT_CASE}#")) {
            return;
        }
        let m = redis_message(envelope);
        let t = TaskMessage::decode(&m).unwrap();
        assert_reencodes_exactly(what, &t, &m);
    });
}

#[test]
fn chain_group_and_chord_vectors_have_celerys_workflow_shape() {
    let docs: Map<String, Value> = load_group("amqp").into_iter().collect();
    let first = |case: &str| {
        let rec = &docs[case]["messages"][0];
        TaskMessage::decode(&amqp_message(rec)).unwrap()
    };
    // chain(add.s(2, 2), add.s(4), mul.s(8)): the next step is the LAST element.
    let chain = first("chain");
    let steps = Signature::list_from_value(&chain.embed.chain).unwrap();
    let names: Vec<&str> = steps.iter().map(|s| s.task.as_str()).collect();
    assert_eq!(names, ["proj.tasks.mul", "proj.tasks.add"]);
    assert_eq!(steps[1].args, vec![json!(4)]);
    assert_eq!(chain.args, vec![json!(2), json!(2)]);
    // Group members carry group + group_index 0, 1, 2.
    let group = &docs["group"]["messages"];
    for (i, rec) in group.as_array().unwrap().iter().enumerate() {
        let t = TaskMessage::decode(&amqp_message(rec)).unwrap();
        assert_eq!(t.headers.group_index, Some(i as i64));
        assert!(t.headers.group.is_some());
    }
    // Chord header messages carry the body signature, whose group_id is the header's group.
    let chord = first("chord");
    let body = Signature::from_value(&chord.embed.chord).unwrap();
    assert_eq!(body.task, "proj.tasks.xsum");
    assert_eq!(
        body.options.get("group_id").and_then(Value::as_str),
        chord.headers.group.as_deref()
    );
    // time_limits: [hard, soft] = [10, 5.5], the soft one a float on the wire.
    let tl = first("time_limits");
    assert_eq!(tl.headers.timelimit, (Some(10.0), Some(5.5)));
    assert_eq!(tl.encode().headers["timelimit"], json!([10, 5.5]));
    // expires=60: the AMQP `expiration` property is the string "60000".
    assert_eq!(
        first("expires").properties.expiration.as_deref(),
        Some("60000")
    );
}

/// Python writes `1e-07`, `1e+16`, `1e+100`; serde_json writes `1e-7`, `1e16`, `1e100`.
/// Decoding must agree with Celery's values (checked above); this pins the byte-level spelling.
#[test]
fn float_spelling_matches_python() {
    for group in ["amqp", "redis"] {
        let docs: Map<String, Value> = load_group(group).into_iter().collect();
        let rec = &docs[FLOAT_CASE]["messages"][0];
        let m = match group {
            "amqp" => amqp_message(rec),
            _ => redis_message(rec["envelope"].as_str().unwrap()),
        };
        let t = TaskMessage::decode(&m).unwrap();
        assert_reencodes_exactly(&format!("{group}/{FLOAT_CASE}"), &t, &m);
    }
}

// ---------------------------------------------------------------------------------------------
// Result backend documents.

/// The keys every meta document has; anything else is `TaskMeta::extra`.
const META_KEYS: &[&str] = &[
    "status",
    "result",
    "traceback",
    "children",
    "date_done",
    "task_id",
];

#[test]
fn backend_vectors_read_as_celery_wrote_them() {
    let docs = load_group("backend");
    assert!(
        docs.len() >= 10,
        "expected the backend vectors, found {}",
        docs.len()
    );
    for (case, doc) in &docs {
        let stored = raw(doc, "stored");
        assert_eq!(
            stored,
            raw(doc, "published"),
            "{case}: SETEX and PUBLISH carry the same bytes"
        );
        let tid = doc["task_id"].as_str().unwrap();
        let meta = TaskMeta::from_json(tid, &stored).unwrap_or_else(|e| panic!("{case}: {e}"));
        let want = &doc["meta"];
        assert_eq!(meta.task_id, tid, "{case}");
        assert_eq!(meta.status.as_str(), want["status"], "{case}: status");
        assert_eq!(meta.status.as_str(), doc["celery_view"]["status"], "{case}");
        assert_eq!(meta.result, want["result"], "{case}: result");
        assert_eq!(
            opt_json(&meta.traceback),
            want["traceback"],
            "{case}: traceback"
        );
        assert_eq!(
            meta.date_done.map(|d| json!(format_iso(&d.fixed_offset()))),
            want["date_done"].as_str().map(|s| json!(s)),
            "{case}: date_done"
        );
        assert_eq!(meta.date_done.is_some(), meta.status.is_ready(), "{case}");
        if meta.status.is_exception() {
            let exc = meta
                .exception()
                .unwrap_or_else(|| panic!("{case}: no exception"));
            assert_eq!(
                Some(exc.clone()),
                ExceptionInfo::from_value(&want["result"]),
                "{case}"
            );
            assert_eq!(
                format!("{}", exc.exc_type),
                doc["celery_view"]["result_type"].as_str().unwrap(),
                "{case}: Celery rebuilt the same exception class"
            );
        }
        // Extra keys (group_id, parent_id, extended fields) are all kept with their values.
        let mut extra: Vec<(&String, &Value)> = meta.extra.iter().collect();
        let mut want_extra: Vec<(&String, &Value)> = want
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| !META_KEYS.contains(&k.as_str()))
            .collect();
        extra.sort_by_key(|(k, _)| *k);
        want_extra.sort_by_key(|(k, _)| *k);
        assert_eq!(extra, want_extra, "{case}: extra keys");
    }
    let by_case: Map<String, Value> = docs.into_iter().collect();
    let failure = &by_case["failure_value_error"];
    let meta = TaskMeta::from_json("x", &raw(failure, "stored")).unwrap();
    assert_eq!(meta.status, State::Failure);
    assert_eq!(
        meta.exception(),
        Some(ExceptionInfo::new("ValueError", "bad value", "builtins"))
    );
    assert!(meta
        .traceback
        .as_deref()
        .is_some_and(|t| t.starts_with("Traceback") && t.ends_with("ValueError: bad value\n")));
    let revoked = TaskMeta::from_json("x", &raw(&by_case["revoked"], "stored")).unwrap();
    assert_eq!(
        revoked.exception(),
        Some(ExceptionInfo::new(
            "TaskRevokedError",
            "revoked",
            "celery.exceptions"
        ))
    );
}

#[test]
fn backend_vectors_rewrite_to_celerys_bytes() {
    for (case, doc) in load_group("backend") {
        let stored = raw(&doc, "stored");
        let meta = TaskMeta::from_json(doc["task_id"].as_str().unwrap(), &stored).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&meta.to_json()),
            String::from_utf8_lossy(&stored),
            "{case}: to_json"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Celery accepts what we encode.

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
    let Some(python) = support::celery_python() else {
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
    let Some(python) = support::celery_python() else {
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
