//! Celery events (what Flower and `celery events` read): JSON objects with a `type`
//! (`worker-heartbeat`, `task-succeeded`, …) and the fields every event carries (`hostname`,
//! `timestamp`, `utcoffset`, `pid`, `clock`), broadcast on the `celeryev` exchange with the type as
//! routing key (`task-succeeded` → `task.succeeded`). Several task events may travel as one JSON
//! array on routing key `task.multi`, as a Celery worker batches them; receivers accept both.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

use crate::message::Message;

/// The events exchange (Celery's `event_exchange`): topic on AMQP, fanout channels on Redis.
pub const EVENT_EXCHANGE: &str = "celeryev";

/// Routing key of a batch of task events (a JSON array).
pub const MULTI_ROUTING_KEY: &str = "task.multi";

/// What a Celery worker reports as its software (`sw_ident`, `sw_ver`): we identify as ourselves.
pub const SW_IDENT: &str = "celerity";

/// The routing key of event type `kind`: `task-succeeded` → `task.succeeded`.
pub fn routing_key(kind: &str) -> String {
    kind.replace('-', ".")
}

/// Seconds since the UNIX epoch, as a float (the `timestamp` field).
pub fn timestamp() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Python's `utcoffset()` of `celery.utils.time`: `time.timezone // 3600` (or `altzone` in DST),
/// i.e. floor(−local offset / 1 h): 0 on UTC, −2 on UTC+2, 5 on UTC−5. Receivers shift timestamps
/// by it, so it has to follow this sign convention.
/// Worked out at most once a minute (it changes only with DST), since every event carries it.
pub fn utcoffset() -> i64 {
    use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
    static VALUE: AtomicI64 = AtomicI64::new(0);
    static AT: AtomicU64 = AtomicU64::new(0);
    let now = timestamp() as u64;
    let at = AT.load(Ordering::Relaxed);
    if at != 0 && now.saturating_sub(at) < 60 {
        return VALUE.load(Ordering::Relaxed);
    }
    let local = i64::from(chrono::Local::now().offset().local_minus_utc());
    let value = (-local).div_euclid(3600);
    VALUE.store(value, Ordering::Relaxed);
    AT.store(now.max(1), Ordering::Relaxed);
    value
}

/// This process's pid (read once).
fn pid() -> u32 {
    static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *PID.get_or_init(std::process::id)
}

/// `platform.system()` of this machine (`Linux`, `Darwin`, …).
pub fn sw_sys() -> &'static str {
    match std::env::consts::OS {
        "linux" => "Linux",
        "macos" => "Darwin",
        "windows" => "Windows",
        "freebsd" => "FreeBSD",
        other => other,
    }
}

/// An event of type `kind` with the fields every event carries, plus `fields`.
pub fn event(
    kind: &str,
    hostname: &str,
    clock: u64,
    fields: Map<String, Value>,
) -> Map<String, Value> {
    let mut e = Map::with_capacity(fields.len() + 6);
    e.insert("type".into(), Value::String(kind.to_owned()));
    e.insert("hostname".into(), Value::String(hostname.to_owned()));
    e.insert("timestamp".into(), Value::from(timestamp()));
    e.insert("utcoffset".into(), Value::from(utcoffset()));
    e.insert("pid".into(), Value::from(pid()));
    e.insert("clock".into(), Value::from(clock));
    e.extend(fields);
    e
}

/// The message carrying `events` (one object, or an array when several) from `hostname`, and its
/// routing key. `None` for no events.
pub fn to_message(hostname: &str, events: Vec<Map<String, Value>>) -> Option<(String, Message)> {
    let (key, body) = match events.len() {
        0 => return None,
        1 => {
            let e = events.into_iter().next()?;
            let kind = e.get("type").and_then(Value::as_str).unwrap_or("unknown");
            (routing_key(kind), Value::Object(e))
        }
        _ => (
            MULTI_ROUTING_KEY.to_owned(),
            Value::Array(events.into_iter().map(Value::Object).collect()),
        ),
    };
    let mut headers = Map::new();
    headers.insert("hostname".into(), Value::String(hostname.to_owned()));
    Some((key, Message::transient_json(headers, &body)))
}

/// The events a message carries (an object or an array of them); empty if it is not JSON.
pub fn from_message(m: &Message) -> Vec<Map<String, Value>> {
    match serde_json::from_slice::<Value>(&m.body) {
        Ok(Value::Object(o)) => vec![o],
        Ok(Value::Array(a)) => a
            .into_iter()
            .filter_map(|v| match v {
                Value::Object(o) => Some(o),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn one_event_or_a_batch() {
        let e = event("task-started", "celerity@h", 7, Map::new());
        assert_eq!(e["type"], "task-started");
        assert_eq!(e["clock"], 7);
        assert!(e["timestamp"].as_f64().unwrap() > 1.0e9);
        let (key, m) = to_message("celerity@h", vec![e.clone()]).unwrap();
        assert_eq!(key, "task.started");
        assert_eq!(m.headers["hostname"], json!("celerity@h"));
        assert_eq!(m.properties.delivery_mode, crate::message::TRANSIENT);
        let back = from_message(&m);
        assert_eq!(back.len(), 1);
        assert_eq!(
            (&back[0]["type"], &back[0]["clock"]),
            (&e["type"], &e["clock"])
        );
        let (key, m) = to_message("celerity@h", vec![e.clone(), e.clone()]).unwrap();
        assert_eq!(key, "task.multi");
        assert_eq!(from_message(&m).len(), 2);
        assert!(to_message("x", Vec::new()).is_none());
    }

    #[test]
    fn utcoffset_uses_pythons_sign() {
        // Whatever the zone here, the value is a whole number of hours within a day.
        assert!((-14..=12).contains(&utcoffset()));
    }
}
