//! Entry points for the cargo-fuzz targets under `fuzz/` and for the test that replays their corpus
//! (`broker/tests/fuzz_corpus.rs`). Each takes raw bytes as they come off the network and runs them
//! through the decoders the transports and the worker use, then through what is done next with a
//! decoded message (reprs, signatures, re-encoding). None may panic, whatever the bytes; and what a
//! decoded message re-encodes to (a retry, a parked ETA, a restore) must decode again: asserted, so
//! a message that would be refused after its first trip shows up as a crash.
//!
//! Only built with the `fuzzing` feature, and not an API: the names and input layouts may change.

use serde_json::{Map, Value};

use crate::message::Message;
use crate::protocol::{control::ControlRequest, event, Signature, TaskMessage};

/// One fuzz target: its name (the directory of its corpus, `fuzz/corpus/<name>/`) and its function.
pub type Target = (&'static str, fn(&[u8]));

/// Every target, by the name of its `fuzz/fuzz_targets/<name>.rs` and corpus directory.
pub const TARGETS: &[Target] = &[
    ("task_message", task_message),
    ("redis_envelope", redis_envelope),
    ("amqp_properties", amqp_properties),
    ("control_request", control_request),
];

/// A task message as a transport hands it to the worker. Input: the headers as a JSON object, a NUL
/// byte, then the body; without a NUL the whole input is the body and there are no headers (a
/// protocol v1 message). Headers that are not a JSON object read as none. Properties are Celery's
/// (`application/json`, `utf-8`).
pub fn task_message(data: &[u8]) {
    let (headers, body) = match data.iter().position(|&b| b == 0) {
        Some(at) => (json_object(&data[..at]), &data[at + 1..]),
        None => (Map::new(), data),
    };
    let message = Message {
        headers,
        body: body.to_vec(),
        ..Message::default()
    };
    after_decode(&message);
}

/// An element popped from a Redis queue list (kombu's JSON envelope), then the same bytes as an
/// `unacked` record (`[envelope, exchange, routing_key]`) read by the restore sweep.
pub fn redis_envelope(data: &[u8]) {
    if let Ok(d) = crate::redis::envelope::decode(data) {
        after_decode(&d.message);
        // What a restore or a re-publish writes must read back.
        let again = crate::redis::envelope::encode(&d.message, "", "q");
        let back = crate::redis::envelope::decode(&again);
        assert!(
            back.is_ok(),
            "re-encoded envelope does not decode: {back:?}"
        );
    }
    if let Ok(r) = crate::redis::envelope::restored(data) {
        let _ = crate::redis::envelope::decode(&r.payload);
    }
}

/// The AMQP content-header properties of a delivery (flags, then each property present, the headers
/// a field table), parsed by amq-protocol as lapin parses them, then read by the AMQP consumer; the
/// bytes after the properties are the body.
pub fn amqp_properties(data: &[u8]) {
    if let Ok((body, props)) = lapin::protocol::basic::parse_properties(data) {
        let message = crate::amqp::props::to_message(&props, body.to_vec());
        after_decode(&message);
        // A message we pass on (retry, ETA parking) is written back to a table.
        let _ = crate::amqp::props::to_properties(&message);
    }
}

/// A `celery.pidbox` message body (a remote-control request) as a worker receives it; the same body
/// is also read as a `celeryev` event message, the other broadcast a worker listens to.
pub fn control_request(data: &[u8]) {
    let message = Message {
        body: data.to_vec(),
        ..Message::default()
    };
    if let Ok(r) = ControlRequest::from_message(&message) {
        let _ = r.is_for("celerity@host-1");
        let _ = r.reply_target();
        let _ = ControlRequest::from_message(&r.to_message(1));
    }
    let _ = event::from_message(&message);
}

/// What the worker does with a message it received: decode it as a task and, if it is one, read its
/// reprs and workflow steps and encode it again (a retry or a parked ETA), which must decode.
fn after_decode(message: &Message) {
    let Ok(task) = TaskMessage::decode(message) else {
        return;
    };
    let _ = (task.args_repr(), task.kwargs_repr());
    let embed = &task.embed;
    for steps in [&embed.callbacks, &embed.errbacks, &embed.chain] {
        let _ = Signature::list_from_value(steps);
    }
    let _ = Signature::from_value(&embed.chord);
    let again = TaskMessage::decode(&task.encode());
    assert!(again.is_ok(), "re-encoded task does not decode: {again:?}");
}

fn json_object(raw: &[u8]) -> Map<String, Value> {
    match serde_json::from_slice(raw) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    }
}
