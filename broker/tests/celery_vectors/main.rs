//! Wire compatibility with real Python Celery 5.7, checked against captured test vectors.
//!
//! `tests/vectors/` holds bytes that Celery itself put on Redis and RabbitMQ, and result documents
//! its Redis backend wrote (see `tests/vectors/README.md` for how they were captured). `messages`
//! decodes every captured message with [`TaskMessage::decode`] and compares the result with what
//! Celery's own worker understood (`celery_view`), re-encodes it and demands Celery's exact bytes;
//! `backend` reads and writes every backend document with [`TaskMeta`]; `celery_accepts` goes the
//! other way: it feeds messages made by our encoder to Celery's worker-side decoding
//! (`tests/vectors/accept.py`, run in the venv from `scripts/celery-venv.sh`) and checks Celery
//! understood each one. Set `CELERITY_NO_PYTHON=1` to skip those on machines without Python.
//!
//! This file holds loading the vectors and the comparisons the modules share.

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

mod backend;
mod celery_accepts;
mod messages;
