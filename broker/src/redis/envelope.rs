//! kombu's Redis message envelope: the JSON document pushed to a queue list, and the
//! `[envelope, exchange, routing_key]` record kept in `unacked`.
//!
//! Encoding writes exactly what kombu 5.x writes (Python `json.dumps` formatting via [`crate::pyjson`],
//! kombu's key order, body base64-encoded). Decoding is lenient about what may be missing (a missing
//! key takes kombu's default) and strict about what is wrong: a value of the wrong type is a
//! [`BrokerError::Malformed`] naming the field. Nothing here panics on input.

use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::{BrokerError, Result};
use crate::message::{Message, Properties, PERSISTENT};
use crate::pyjson;

/// Standard alphabet; writes padding, accepts input with or without it (Python's `b64decode` is lenient
/// the same way about padding).
const B64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_encode_padding(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

#[derive(Serialize)]
struct Envelope<'a> {
    body: String,
    #[serde(rename = "content-encoding")]
    content_encoding: &'a str,
    #[serde(rename = "content-type")]
    content_type: &'a str,
    headers: &'a Map<String, Value>,
    properties: EnvelopeProperties<'a>,
}

/// kombu's property order (as Celery 5.7 writes it on Redis).
#[derive(Serialize)]
struct EnvelopeProperties<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    correlation_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reply_to: Option<&'a str>,
    delivery_mode: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    expiration: Option<&'a str>,
    delivery_info: DeliveryInfo<'a>,
    priority: u8,
    body_encoding: &'static str,
    delivery_tag: String,
}

#[derive(Serialize)]
struct DeliveryInfo<'a> {
    exchange: &'a str,
    routing_key: &'a str,
}

/// Builds the envelope kombu would push for `message` published to `exchange` with `routing_key`,
/// with a fresh uuid4 delivery tag.
pub(crate) fn encode(message: &Message, exchange: &str, routing_key: &str) -> Vec<u8> {
    let p = &message.properties;
    pyjson::to_vec(&Envelope {
        body: B64.encode(&message.body),
        content_encoding: &p.content_encoding,
        content_type: &p.content_type,
        headers: &message.headers,
        properties: EnvelopeProperties {
            correlation_id: p.correlation_id.as_deref(),
            reply_to: p.reply_to.as_deref(),
            delivery_mode: p.delivery_mode,
            expiration: p.expiration.as_deref(),
            delivery_info: DeliveryInfo {
                exchange,
                routing_key,
            },
            priority: p.priority,
            body_encoding: "base64",
            delivery_tag: uuid::Uuid::new_v4().to_string(),
        },
    })
}

/// A decoded envelope.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Decoded {
    pub message: Message,
    /// Set by a restore (kombu marks both `headers` and `delivery_info`).
    pub redelivered: bool,
}

/// Decodes an envelope popped from a queue list.
pub(crate) fn decode(raw: &[u8]) -> Result<Decoded> {
    let mut top = match serde_json::from_slice::<Value>(raw) {
        Ok(Value::Object(top)) => top,
        Ok(_) => return Err(BrokerError::malformed("envelope is not a JSON object")),
        Err(e) => return Err(BrokerError::malformed(format!("envelope is not JSON: {e}"))),
    };
    let props = match top.remove("properties") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(field_error("properties", "an object")),
    };
    let props = &props;
    let body_encoding = opt_str(props, "body_encoding", "properties.body_encoding")?;
    let body = match (top.get("body"), body_encoding) {
        (None | Some(Value::Null), _) => Vec::new(),
        (Some(Value::String(s)), Some("base64")) => B64
            .decode(s.trim_end())
            .map_err(|e| BrokerError::malformed(format!("envelope body is not base64: {e}")))?,
        (Some(Value::String(s)), None | Some("utf-8" | "utf8")) => s.clone().into_bytes(),
        // kombu leaves a non-string body as it is when there is no body encoding.
        (Some(other), None) => pyjson::to_vec(other),
        (Some(_), Some(enc @ ("base64" | "utf-8" | "utf8"))) => {
            return Err(BrokerError::malformed(format!(
                "envelope body is not a string (body_encoding `{enc}`)"
            )))
        }
        (Some(_), Some(other)) => {
            return Err(BrokerError::malformed(format!(
                "unknown body_encoding `{other}` (expected base64 or utf-8)"
            )))
        }
    };
    let headers = match top.remove("headers") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(h)) => h,
        Some(_) => return Err(field_error("headers", "an object")),
    };
    let delivery_info = match props.get("delivery_info") {
        Some(Value::Object(d)) => Some(d),
        _ => None,
    };
    let redelivered = headers.get("redelivered") == Some(&Value::Bool(true))
        || delivery_info.and_then(|d| d.get("redelivered")) == Some(&Value::Bool(true));
    let properties = Properties {
        content_type: opt_str(&top, "content-type", "content-type")?
            .unwrap_or_default()
            .to_owned(),
        content_encoding: opt_str(&top, "content-encoding", "content-encoding")?
            .unwrap_or_default()
            .to_owned(),
        correlation_id: opt_text(props, "correlation_id")?,
        reply_to: opt_text(props, "reply_to")?,
        delivery_mode: match props.get("delivery_mode") {
            None | Some(Value::Null) => PERSISTENT,
            Some(v) => int_of(v)
                .map(|n| n.clamp(0, 255) as u8)
                .ok_or_else(|| field_error("properties.delivery_mode", "an integer"))?,
        },
        priority: props
            .get("priority")
            .and_then(int_of)
            .map_or(0, |n| n.clamp(0, 255) as u8),
        expiration: opt_text(props, "expiration")?,
    };
    Ok(Decoded {
        message: Message {
            properties,
            headers,
            body,
        },
        redelivered,
    })
}

/// What a restore pushes back, worked out from an `unacked` record.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Restored {
    /// The envelope with `redelivered: true` set (kombu's `_do_restore_message`), re-serialized.
    pub payload: Vec<u8>,
    pub exchange: String,
    pub routing_key: String,
    /// `properties.priority` as kombu reads it (`int(...)`, 0 when absent or invalid).
    pub priority: i64,
}

/// Parses an `unacked` record `[envelope, exchange, routing_key]` and marks the envelope redelivered.
pub(crate) fn restored(record: &[u8]) -> Result<Restored> {
    let parsed: Value = serde_json::from_slice(record)
        .map_err(|e| BrokerError::malformed(format!("unacked record is not JSON: {e}")))?;
    let Value::Array(mut items) = parsed else {
        return Err(BrokerError::malformed("unacked record is not a JSON array"));
    };
    if items.len() != 3 {
        return Err(BrokerError::malformed(format!(
            "unacked record has {} items, expected [envelope, exchange, routing_key]",
            items.len()
        )));
    }
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        _ => String::new(),
    };
    let routing_key = text(&items[2]);
    let exchange = text(&items[1]);
    let mut envelope = items.swap_remove(0);
    let mut priority = 0;
    if let Value::Object(env) = &mut envelope {
        if let Some(Value::Object(h)) = env.get_mut("headers") {
            h.insert("redelivered".into(), Value::Bool(true));
        }
        if let Some(Value::Object(p)) = env.get_mut("properties") {
            priority = p.get("priority").and_then(int_of).unwrap_or(0);
            if let Some(Value::Object(d)) = p.get_mut("delivery_info") {
                d.insert("redelivered".into(), Value::Bool(true));
            }
        }
    }
    Ok(Restored {
        payload: pyjson::to_vec(&envelope),
        exchange,
        routing_key,
        priority,
    })
}

fn field_error(field: &str, expected: &str) -> BrokerError {
    BrokerError::malformed(format!("envelope field `{field}` is not {expected}"))
}

/// A string field that may be absent or null.
fn opt_str<'a>(m: &'a Map<String, Value>, key: &str, field: &str) -> Result<Option<&'a str>> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(field_error(field, "a string")),
    }
}

/// A property that is text, possibly written as a number (`expiration` is sometimes one).
fn opt_text(props: &Map<String, Value>, key: &str) -> Result<Option<String>> {
    match props.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(_) => Err(field_error(&format!("properties.{key}"), "a string")),
    }
}

/// Python's `int(x)` on a JSON value: integers, floats (truncated) and numeric strings.
fn int_of(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n
            .as_i64()
            .or_else(|| n.as_f64().filter(|f| f.is_finite()).map(|f| f as i64)),
        Value::String(s) => s.trim().parse().ok(),
        Value::Bool(b) => Some(i64::from(*b)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Pushed by Celery 5.7 (`send_task('demo.add', (2,3), kwargs={'z':'héllo ☃'}, queue='probeq',
    /// countdown=5, expires=60, priority=3, time_limit=10, soft_time_limit=5.5)`).
    const CELERY_SAMPLE: &str = r#"{"body": "W1syLCAzXSwgeyJ6IjogImhcdTAwZTlsbG8gXHUyNjAzIn0sIHsiY2FsbGJhY2tzIjogbnVsbCwgImVycmJhY2tzIjogbnVsbCwgImNoYWluIjogbnVsbCwgImNob3JkIjogbnVsbH1d", "content-encoding": "utf-8", "content-type": "application/json", "headers": {"lang": "py", "task": "demo.add", "id": "85621692-0899-4a99-a3c9-46d0063eef39", "shadow": null, "eta": "2026-11-23T11:23:37.319511+00:00", "expires": "2026-11-23T11:24:32.319511+00:00", "group": null, "group_index": null, "retries": 0, "timelimit": [10, 5.5], "root_id": "85621692-0899-4a99-a3c9-46d0063eef39", "parent_id": null, "argsrepr": "(2, 3)", "kwargsrepr": "{'z': 'h\u00e9llo \u2603'}", "origin": "gen10785@vm", "ignore_result": null, "replaced_task_nesting": 0, "stamped_headers": null, "stamps": {}}, "properties": {"correlation_id": "85621692-0899-4a99-a3c9-46d0063eef39", "reply_to": "a2c3a804-92fa-3a6c-9aa0-ca9fde3742cc", "delivery_mode": 2, "expiration": "60000", "delivery_info": {"exchange": "", "routing_key": "probeq"}, "priority": 3, "body_encoding": "base64", "delivery_tag": "944d3ba7-6c3f-4749-9676-91ebb81f4ec4"}}"#;

    #[test]
    fn decodes_the_celery_sample() {
        let d = decode(CELERY_SAMPLE.as_bytes()).unwrap();
        let m = &d.message;
        assert!(!d.redelivered);
        assert_eq!(
            m.body,
            br#"[[2, 3], {"z": "h\u00e9llo \u2603"}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]"#
        );
        assert_eq!(m.task_name(), Some("demo.add"));
        assert_eq!(m.headers["timelimit"], json!([10, 5.5]));
        assert_eq!(m.headers["kwargsrepr"], json!("{'z': 'héllo ☃'}"));
        let p = &m.properties;
        assert_eq!(p.content_type, "application/json");
        assert_eq!(p.content_encoding, "utf-8");
        assert_eq!(
            p.correlation_id.as_deref(),
            Some("85621692-0899-4a99-a3c9-46d0063eef39")
        );
        assert_eq!(
            p.reply_to.as_deref(),
            Some("a2c3a804-92fa-3a6c-9aa0-ca9fde3742cc")
        );
        assert_eq!((p.delivery_mode, p.priority), (2, 3));
        assert_eq!(p.expiration.as_deref(), Some("60000"));
    }

    #[test]
    fn encodes_like_kombu() {
        let sample = decode(CELERY_SAMPLE.as_bytes()).unwrap().message;
        let ours = encode(&sample, "", "probeq");
        let text = String::from_utf8(ours.clone()).unwrap();
        // Same bytes as Celery up to the delivery tag, which is fresh.
        let cut = CELERY_SAMPLE.find("\"delivery_tag\": \"").unwrap() + 17;
        assert_eq!(&text[..cut], &CELERY_SAMPLE[..cut]);
        let v: Value = serde_json::from_slice(&ours).unwrap();
        let tag = v["properties"]["delivery_tag"].as_str().unwrap();
        assert_eq!(uuid::Uuid::parse_str(tag).unwrap().get_version_num(), 4);
        assert_eq!(text.len(), CELERY_SAMPLE.len());
        // Round trip.
        assert_eq!(decode(&ours).unwrap().message, sample);
    }

    #[test]
    fn optional_properties_are_left_out() {
        let m = Message {
            body: b"[[], {}, {}]".to_vec(),
            ..Message::default()
        };
        let v: Value = serde_json::from_slice(&encode(&m, "", "q")).unwrap();
        let keys: Vec<&str> = v["properties"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            [
                "delivery_mode",
                "delivery_info",
                "priority",
                "body_encoding",
                "delivery_tag"
            ]
        );
        assert_eq!(decode(&encode(&m, "", "q")).unwrap().message, m);
    }

    #[test]
    fn decoding_is_lenient_about_missing_keys() {
        let d = decode(br#"{"body": "hello", "headers": {"redelivered": true}}"#).unwrap();
        assert_eq!(d.message.body, b"hello");
        assert!(d.redelivered);
        assert_eq!(d.message.properties.delivery_mode, PERSISTENT);
        assert_eq!(d.message.properties.content_type, "");
        let d = decode(
            br#"{"body": "aGk", "properties": {"body_encoding": "base64", "priority": "7",
                 "delivery_info": {"redelivered": true}, "expiration": 500}}"#,
        )
        .unwrap();
        assert_eq!(d.message.body, b"hi");
        assert_eq!(d.message.properties.priority, 7);
        assert_eq!(d.message.properties.expiration.as_deref(), Some("500"));
        assert!(d.redelivered);
    }

    #[test]
    fn bad_envelopes_are_named() {
        for (raw, needle) in [
            (&b"not json"[..], "not JSON"),
            (b"[1, 2]", "not a JSON object"),
            (b"{\"properties\": 3}", "`properties`"),
            (b"{\"headers\": []}", "`headers`"),
            (
                b"{\"body\": \"!!\", \"properties\": {\"body_encoding\": \"base64\"}}",
                "base64",
            ),
            (
                b"{\"body\": \"x\", \"properties\": {\"body_encoding\": \"rot13\"}}",
                "rot13",
            ),
            (
                b"{\"body\": 1, \"properties\": {\"body_encoding\": \"base64\"}}",
                "not a string",
            ),
            (
                b"{\"properties\": {\"delivery_mode\": \"x\"}}",
                "delivery_mode",
            ),
            (b"{\"content-type\": 1}", "content-type"),
            (b"\xff\xfe", "not JSON"),
        ] {
            match decode(raw) {
                Err(BrokerError::Malformed(msg)) => {
                    assert!(msg.contains(needle), "{msg:?} should mention {needle:?}")
                }
                other => panic!("{:?}: expected Malformed, got {other:?}", raw),
            }
        }
    }

    #[test]
    fn restore_marks_redelivered_and_keeps_order() {
        let record = format!("[{CELERY_SAMPLE}, \"\", \"probeq\"]");
        let r = restored(record.as_bytes()).unwrap();
        assert_eq!(
            (r.exchange.as_str(), r.routing_key.as_str(), r.priority),
            ("", "probeq", 3)
        );
        let text = String::from_utf8(r.payload.clone()).unwrap();
        assert!(text.contains(r#""stamps": {}, "redelivered": true}, "properties""#));
        assert!(text.contains(r#""routing_key": "probeq", "redelivered": true}"#));
        assert!(text.contains(r#""timelimit": [10, 5.5]"#));
        let d = decode(&r.payload).unwrap();
        assert!(d.redelivered);
        assert!(restored(b"[1, 2]").is_err());
        assert!(restored(b"{}").is_err());
        // A non-object envelope is pushed back unchanged.
        assert_eq!(restored(b"[\"x\", null, \"q\"]").unwrap().payload, b"\"x\"");
    }
}
