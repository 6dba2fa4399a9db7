//! Hostile remote-control messages broadcast on `celery.pidbox` at the test's worker: unknown
//! methods, arguments of the wrong type, a huge `n`, long glob patterns, bodies that are not
//! objects. None has an outcome to store; the worker must simply go on serving.

use serde_json::{json, Map, Value};

use celerity_broker::message::Message;

use crate::gen::Rng;

/// `count` hostile control messages, each aimed at `node` only (or at a pattern only it matches),
/// so no other worker on the shared brokers acts on them.
pub fn messages(rng: &mut Rng, node: &str, count: usize) -> Vec<Message> {
    (0..count)
        .map(|i| {
            let body: Value = match i % 8 {
                0 => json!({"method": format!("no_such_method_{i}"), "arguments": {}, "destination": [node]}),
                1 => json!({"method": "rate_limit", "arguments": {"task_name": ["x"], "rate_limit": {"a": 1}}, "destination": [node]}),
                2 => json!({"method": "pool_grow", "arguments": {"n": *rng.pick(&[u64::MAX as f64, 1e300, -1.0, 1e18])}, "destination": [node]}),
                3 => json!({"method": "pool_shrink", "arguments": {"n": "many"}, "destination": [node]}),
                4 => json!({"method": "ping", "arguments": {}, "pattern": format!("{}{node}", "*".repeat(5_000)), "matcher": "glob"}),
                5 => json!({"method": "ping", "arguments": {}, "pattern": format!("{node}{}", "?*".repeat(100_000)), "matcher": "glob"}),
                6 => json!({"method": "rate_limit", "arguments": {"task_name": "demo.add", "rate_limit": "1e-300/h"}, "destination": [node]}),
                _ => return raw(rng),
            };
            Message::transient_json(Map::new(), &body)
        })
        .collect()
}

fn raw(rng: &mut Rng) -> Message {
    let body: &[u8] = rng.pick::<&[u8]>(&[
        &b"[]"[..],
        b"null",
        b"\"ping\"",
        b"{\"method\": 5}",
        b"{\"method\": \"ping\", \"arguments\": [1]}",
        b"\xff\xfe{",
        b"",
    ]);
    Message {
        body: body.to_vec(),
        ..Message::transient_json(Map::new(), &Value::Null)
    }
}
