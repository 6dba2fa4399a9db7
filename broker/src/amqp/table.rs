//! JSON values ↔ AMQP field values, for message headers.
//!
//! Writing: null → Void, bool → Boolean, integer → LongLongInt (an unsigned integer above `i64::MAX`
//! becomes a Double), float → Double, string → LongString, array → FieldArray, object → FieldTable.
//! Reading also accepts what Python (py-amqp) and other clients send: every integer width, Float,
//! Decimal (→ exact decimal string), Timestamp (→ ISO-8601 UTC string), ShortString, ByteArray
//! (→ lossy UTF-8 string). Non-finite floats read as null.
//!
//! Reading stops at [`MAX_DEPTH`] levels of nesting: a deeper table or array reads as a string
//! saying so (the message then fails to decode and is dead-lettered), so a hostile header cannot
//! overflow the reader's stack or build a JSON value too deep to drop.
//!
//! lapin's `FieldTable` is a `BTreeMap`, so header keys travel sorted by name (key order carries no
//! meaning on AMQP).

use chrono::{DateTime, SecondsFormat};
use lapin::types::{AMQPValue, DecimalValue, FieldArray, FieldTable, ShortString};
use serde_json::{Map, Number, Value};

use crate::error::{BrokerError, Result};

/// Converts a JSON object into an AMQP table. Fails only on a key longer than 255 bytes.
pub(crate) fn to_table(map: &Map<String, Value>) -> Result<FieldTable> {
    let mut table = FieldTable::default();
    for (k, v) in map {
        table.insert(short_string(k, "header name")?, to_value(v)?);
    }
    Ok(table)
}

/// Most levels of nested tables and arrays read from a header (serde_json parses at most 128).
pub(crate) const MAX_DEPTH: usize = 64;

/// Converts an AMQP table into a JSON object.
pub(crate) fn from_table(table: &FieldTable) -> Map<String, Value> {
    table_at(table, 0)
}

fn table_at(table: &FieldTable, depth: usize) -> Map<String, Value> {
    table
        .inner()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), from_value(v, depth)))
        .collect()
}

/// What a table or array nested past [`MAX_DEPTH`] reads as.
fn too_deep() -> Value {
    Value::String(format!("<nested deeper than {MAX_DEPTH} levels>"))
}

/// An AMQP short string (at most 255 bytes); `what` names it in the error.
pub(crate) fn short_string(s: &str, what: &str) -> Result<ShortString> {
    ShortString::try_new(s)
        .map_err(|e| BrokerError::malformed(format!("{what} `{}…`: {e}", truncate(s, 40))))
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn to_value(v: &Value) -> Result<AMQPValue> {
    Ok(match v {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => AMQPValue::LongLongInt(i),
            (None, Some(u)) => AMQPValue::Double(u as f64),
            (None, None) => AMQPValue::Double(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => AMQPValue::LongString(s.as_str().into()),
        Value::Array(items) => AMQPValue::FieldArray(FieldArray::from(
            items.iter().map(to_value).collect::<Result<Vec<_>>>()?,
        )),
        Value::Object(map) => AMQPValue::FieldTable(to_table(map)?),
    })
}

fn from_value(v: &AMQPValue, depth: usize) -> Value {
    match v {
        AMQPValue::Void => Value::Null,
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(i) => Value::from(*i),
        AMQPValue::ShortShortUInt(i) => Value::from(*i),
        AMQPValue::ShortInt(i) => Value::from(*i),
        AMQPValue::ShortUInt(i) => Value::from(*i),
        AMQPValue::LongInt(i) => Value::from(*i),
        AMQPValue::LongUInt(i) => Value::from(*i),
        AMQPValue::LongLongInt(i) => Value::from(*i),
        // Through the shortest decimal text, so 0.1f32 reads as 0.1 rather than 0.100000001…
        AMQPValue::Float(f) => float(f.to_string().parse().unwrap_or(f64::NAN)),
        AMQPValue::Double(d) => float(*d),
        AMQPValue::DecimalValue(d) => Value::String(decimal(*d)),
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_owned()),
        AMQPValue::LongString(s) => Value::String(String::from_utf8_lossy(s.as_bytes()).into()),
        AMQPValue::ByteArray(b) => Value::String(String::from_utf8_lossy(b.as_slice()).into()),
        AMQPValue::FieldArray(_) | AMQPValue::FieldTable(_) if depth >= MAX_DEPTH => too_deep(),
        AMQPValue::FieldArray(a) => Value::Array(
            a.as_slice()
                .iter()
                .map(|v| from_value(v, depth + 1))
                .collect(),
        ),
        AMQPValue::FieldTable(t) => Value::Object(table_at(t, depth + 1)),
        AMQPValue::Timestamp(t) => i64::try_from(*t)
            .ok()
            .and_then(|secs| DateTime::from_timestamp(secs, 0))
            .map_or_else(
                || Value::from(*t),
                |dt| Value::String(dt.to_rfc3339_opts(SecondsFormat::Secs, false)),
            ),
    }
}

fn float(f: f64) -> Value {
    Number::from_f64(f).map_or(Value::Null, Value::Number)
}

/// `value × 10^-scale` as exact decimal text. The wire value is a signed 32-bit integer (RabbitMQ
/// and py-amqp), even though lapin types it unsigned.
fn decimal(d: DecimalValue) -> String {
    let n = d.value as i32;
    let digits = n.unsigned_abs().to_string();
    let sign = if n < 0 { "-" } else { "" };
    let scale = usize::from(d.scale);
    if scale == 0 {
        return format!("{sign}{digits}");
    }
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (int, frac) = padded.split_at(padded.len() - scale);
    format!("{sign}{int}.{frac}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_table_nested_past_the_limit_reads_as_a_marker_not_a_stack_overflow() {
        // Deep enough to overflow a 2 MiB stack with unbounded recursion (the value is dropped
        // iteratively below so the test itself stays within its stack).
        let mut v = AMQPValue::Boolean(true);
        for i in 0..20_000 {
            v = if i % 2 == 0 {
                let mut t = FieldTable::default();
                t.insert("a".into(), v);
                AMQPValue::FieldTable(t)
            } else {
                AMQPValue::FieldArray(FieldArray::from(vec![v]))
            };
        }
        let mut outer = FieldTable::default();
        outer.insert("deep".into(), v);
        let read = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || {
                let json = from_table(&outer);
                let mut depth = 0;
                let mut cur = &json["deep"];
                loop {
                    cur = match cur {
                        Value::Object(m) => &m["a"],
                        Value::Array(a) => &a[0],
                        other => break (depth, other.clone(), outer),
                    };
                    depth += 1;
                }
            })
            .map(|h| h.join());
        let Ok(Ok((depth, end, outer))) = read else {
            panic!("reading the deep table crashed its thread");
        };
        assert_eq!(depth, MAX_DEPTH);
        assert_eq!(end, too_deep());
        // lapin's own drop of the 20,000-deep value is recursive: leak it on purpose.
        std::mem::forget(outer);
    }

    #[test]
    fn json_round_trips() {
        let v = json!({
            "task": "demo.add", "n": null, "ok": true, "i": -7, "big": i64::MAX,
            "f": 5.5, "s": "héllo ✓", "arr": [10, 5.5, null, [1]], "obj": {"a": {"b": []}, "c": {}}
        });
        let map = v.as_object().unwrap();
        let table = to_table(map).unwrap();
        assert_eq!(Value::Object(from_table(&table)), v);
        assert_eq!(
            table.inner().get("i"),
            Some(&AMQPValue::LongLongInt(-7)),
            "integers go out as long-long-int"
        );
    }

    #[test]
    fn reads_what_python_sends() {
        let mut t = FieldTable::default();
        t.insert("b".into(), AMQPValue::ShortShortInt(-1));
        t.insert("u".into(), AMQPValue::LongUInt(7));
        t.insert("f".into(), AMQPValue::Float(0.1));
        t.insert("nan".into(), AMQPValue::Double(f64::NAN));
        t.insert("ss".into(), AMQPValue::ShortString("x".into()));
        t.insert(
            "bytes".into(),
            AMQPValue::ByteArray(b"ab\xff".to_vec().into()),
        );
        t.insert("ts".into(), AMQPValue::Timestamp(1_714_564_805));
        let dec = |scale, value| AMQPValue::DecimalValue(DecimalValue { scale, value });
        t.insert("d1".into(), dec(2, 12345));
        t.insert("d2".into(), dec(3, 5));
        t.insert("d3".into(), dec(1, (-15i32) as u32));
        t.insert("d4".into(), dec(0, 42));
        assert_eq!(
            Value::Object(from_table(&t)),
            json!({
                "b": -1, "bytes": "ab\u{fffd}", "d1": "123.45", "d2": "0.005", "d3": "-1.5",
                "d4": "42", "f": 0.1, "nan": null, "ss": "x", "ts": "2024-05-01T12:00:05+00:00",
                "u": 7
            })
        );
    }

    #[test]
    fn huge_unsigned_becomes_double_and_long_keys_fail() {
        let v = json!({ "u": u64::MAX });
        let t = to_table(v.as_object().unwrap()).unwrap();
        assert!(matches!(t.inner().get("u"), Some(AMQPValue::Double(_))));
        let mut m = Map::new();
        m.insert("k".repeat(256), Value::Null);
        assert!(matches!(to_table(&m), Err(BrokerError::Malformed(_))));
    }
}
