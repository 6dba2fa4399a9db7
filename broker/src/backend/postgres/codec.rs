//! Between a [`TaskMeta`] and a row of Celery's task table, byte for byte as Celery 5.7's database
//! backend writes it: `result`, `children`, `args`, `kwargs` and `stamps` hold the result
//! serializer's bytes (JSON, `{"a": [1, 2]}`, as kombu's `json.dumps` spaces it), `children` is NULL
//! when there are none, `date_done` is naive UTC and set only for ready states, `group_id` and
//! `parent_id` are not stored (the table has no column for them).
//!
//! Reading, a column that is not JSON but starts with pickle's protocol marker (a row from a Celery
//! older than 5.5, whose `PickleType` column pickled whatever the serializer) is read with
//! `serde-pickle`, which builds no Python objects and runs no code: plain data (None, bool,
//! numbers, strings, lists, tuples, dicts with string or integer keys) only. Anything else (a
//! pickled exception instance, a class reference, bytes, sets) is refused with an error naming the
//! task; it is never executed.

use chrono::{NaiveDateTime, TimeZone, Utc};
use serde_json::{json, Map, Value};
use tokio_postgres::Row;

use crate::backend::meta::{State, TaskMeta};
use crate::error::{BrokerError, Result};
use crate::pyjson;

/// Longest `task_id`, `name`, `worker`, `queue` (`VARCHAR(155)`) and `status` (`VARCHAR(50)`).
const ID_CHARS: usize = 155;
const STATUS_CHARS: usize = 50;

/// One row's values, ready to bind.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct TaskRow {
    pub(super) task_id: String,
    pub(super) status: String,
    pub(super) result: Vec<u8>,
    pub(super) date_done: Option<NaiveDateTime>,
    pub(super) traceback: Option<String>,
    pub(super) children: Option<Vec<u8>>,
    pub(super) name: Option<String>,
    pub(super) args: Option<Vec<u8>>,
    pub(super) kwargs: Option<Vec<u8>>,
    pub(super) worker: Option<String>,
    pub(super) retries: Option<i32>,
    pub(super) queue: Option<String>,
    pub(super) stamps: Option<Vec<u8>>,
}

impl TaskRow {
    /// The row Celery would write for `meta`. A task id or state name that the column cannot hold
    /// (too long, or holding NUL, which PostgreSQL text refuses) is an error for this meta alone.
    pub(super) fn from_meta(meta: &TaskMeta) -> Result<TaskRow> {
        let refuse = |what: &str| {
            Err(BrokerError::Transport {
                transport: "postgresql",
                message: format!(
                    "cannot store the result of task {:?}: {what}",
                    truncate(&meta.task_id)
                ),
            })
        };
        if meta.task_id.chars().count() > ID_CHARS || meta.task_id.contains('\0') {
            return refuse("the task id is over 155 characters or holds NUL (column task_id)");
        }
        let status = meta.status.as_str();
        if status.chars().count() > STATUS_CHARS || status.contains('\0') {
            return refuse("the state name is over 50 characters or holds NUL (column status)");
        }
        let extra = &meta.extra;
        let text = |k: &str| extra.get(k).and_then(Value::as_str).map(column_text);
        let encoded = |k: &str| extra.get(k).map(pyjson::to_vec);
        let children = match &meta.children {
            Value::Array(a) if a.is_empty() => None,
            Value::Null => None,
            other => Some(pyjson::to_vec(other)),
        };
        Ok(TaskRow {
            task_id: meta.task_id.clone(),
            status: status.to_owned(),
            result: pyjson::to_vec(&meta.result),
            date_done: meta
                .date_done
                .filter(|_| meta.status.is_ready())
                .map(|d| d.naive_utc()),
            traceback: meta.traceback.as_deref().map(|t| t.replace('\0', "\\x00")),
            children,
            name: text("name"),
            args: encoded("args"),
            kwargs: encoded("kwargs"),
            worker: text("worker"),
            retries: extra
                .get("retries")
                .and_then(Value::as_i64)
                .and_then(|r| i32::try_from(r).ok()),
            queue: text("queue"),
            stamps: stamps(extra),
        })
    }
}

/// Celery's `stamps` column: `{"stamped_headers": [...], "stamps": {header: value}}`, or NULL.
fn stamps(extra: &Map<String, Value>) -> Option<Vec<u8>> {
    let headers = extra.get("stamped_headers")?.as_array()?;
    if headers.is_empty() {
        return None;
    }
    let stamps: Map<String, Value> = headers
        .iter()
        .filter_map(Value::as_str)
        .filter_map(|h| extra.get(h).map(|v| (h.to_owned(), v.clone())))
        .collect();
    Some(pyjson::to_vec(
        &json!({"stamped_headers": headers, "stamps": stamps}),
    ))
}

/// A `VARCHAR(155)` value: cut to 155 characters, NUL dropped (a name too long for Celery's
/// column should not cost the result).
fn column_text(s: &str) -> String {
    s.chars().filter(|c| *c != '\0').take(ID_CHARS).collect()
}

/// A task id for an error message, at most 155 characters.
fn truncate(s: &str) -> String {
    s.chars().take(ID_CHARS).collect()
}

/// The columns [`meta_from_row`] reads, in order.
pub(super) const SELECT_COLUMNS: &str =
    "task_id, status, result, date_done, traceback, children, name, args, kwargs, worker, retries, queue, stamps";

/// Reads a row selected with [`SELECT_COLUMNS`], as Celery's `_get_task_meta_for` does.
pub(super) fn meta_from_row(task_id: &str, row: &Row) -> Result<TaskMeta> {
    let bad = |e: tokio_postgres::Error| {
        BrokerError::malformed(format_args!(
            "the row of task {task_id:?} does not have Celery's column types: {e}"
        ))
    };
    let status: Option<String> = row.try_get(1).map_err(bad)?;
    let result: Option<Vec<u8>> = row.try_get(2).map_err(bad)?;
    let date_done: Option<NaiveDateTime> = row.try_get(3).map_err(bad)?;
    let traceback: Option<String> = row.try_get(4).map_err(bad)?;
    let children: Option<Vec<u8>> = row.try_get(5).map_err(bad)?;
    let mut extra = Map::new();
    if let Some(name) = row.try_get::<_, Option<String>>(6).map_err(bad)? {
        extra.insert("name".into(), Value::String(name));
    }
    for (i, key) in [(7, "args"), (8, "kwargs")] {
        if let Some(bytes) = row.try_get::<_, Option<Vec<u8>>>(i).map_err(bad)? {
            extra.insert(key.into(), decode_column(task_id, key, &bytes)?);
        }
    }
    if let Some(worker) = row.try_get::<_, Option<String>>(9).map_err(bad)? {
        extra.insert("worker".into(), Value::String(worker));
    }
    if let Some(retries) = row.try_get::<_, Option<i32>>(10).map_err(bad)? {
        extra.insert("retries".into(), Value::from(retries));
    }
    if let Some(queue) = row.try_get::<_, Option<String>>(11).map_err(bad)? {
        extra.insert("queue".into(), Value::String(queue));
    }
    if let Some(bytes) = row.try_get::<_, Option<Vec<u8>>>(12).map_err(bad)? {
        // Celery ignores a stamps column it cannot read; so do we.
        if let Ok(Value::Object(mut info)) = decode_column(task_id, "stamps", &bytes) {
            if let Some(Value::Object(stamps)) = info.shift_remove("stamps") {
                extra.extend(stamps);
            }
            if let Some(headers) = info.shift_remove("stamped_headers") {
                extra.insert("stamped_headers".into(), headers);
            }
        }
    }
    let status = State::parse(status.as_deref().unwrap_or("PENDING"));
    Ok(TaskMeta {
        task_id: task_id.to_owned(),
        result: match result {
            None => Value::Null,
            Some(bytes) => decode_column(task_id, "result", &bytes)?,
        },
        traceback,
        children: match children {
            None => Value::Array(Vec::new()),
            Some(bytes) => decode_column(task_id, "children", &bytes)?,
        },
        date_done: date_done.map(|d| Utc.from_utc_datetime(&d)),
        status,
        extra,
        reply: None,
    })
}

/// One encoded column: JSON, or a legacy pickle of plain data (see the module doc).
pub(super) fn decode_column(task_id: &str, column: &str, bytes: &[u8]) -> Result<Value> {
    let json_error = match serde_json::from_slice::<Value>(bytes) {
        Ok(v) => return Ok(v),
        Err(e) => e,
    };
    let unreadable = |why: String| {
        BrokerError::malformed(format_args!(
            "the `{column}` column of task {task_id:?} cannot be read: {why}"
        ))
    };
    if bytes.first() != Some(&0x80) {
        return Err(unreadable(format!(
            "not JSON ({json_error}) and not a pickle"
        )));
    }
    let options = serde_pickle::DeOptions::new().decode_strings();
    let value = serde_pickle::value_from_slice(bytes, options).map_err(|e| {
        unreadable(format!(
            "a pickle that is not plain data ({e}); pickled objects are never loaded"
        ))
    })?;
    pickle_to_json(value).map_err(unreadable)
}

/// Plain pickle data as JSON; anything JSON cannot say is refused.
fn pickle_to_json(v: serde_pickle::Value) -> std::result::Result<Value, String> {
    use serde_pickle::{HashableValue as H, Value as P};
    Ok(match v {
        P::None => Value::Null,
        P::Bool(b) => Value::Bool(b),
        P::I64(i) => Value::from(i),
        P::F64(f) => serde_json::Number::from_f64(f)
            .map(Value::Number)
            .ok_or("a float that JSON cannot hold (nan/inf)")?,
        P::String(s) => Value::String(s),
        P::List(items) | P::Tuple(items) => Value::Array(
            items
                .into_iter()
                .map(pickle_to_json)
                .collect::<std::result::Result<_, _>>()?,
        ),
        P::Dict(map) => {
            let mut out = Map::new();
            for (k, v) in map {
                let key = match k {
                    H::String(s) => s,
                    H::I64(i) => i.to_string(),
                    other => return Err(format!("a dict key JSON cannot hold: {other:?}")),
                };
                out.insert(key, pickle_to_json(v)?);
            }
            Value::Object(out)
        }
        P::Int(_) => return Err("an integer beyond 64 bits".into()),
        P::Bytes(_) => return Err("a bytes value".into()),
        P::Set(_) | P::FrozenSet(_) => return Err("a set".into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_match_what_celery_writes() {
        let mut m = TaskMeta::success("t1", json!({"a": [1, 2]}));
        m.extra.insert("group_id".into(), json!("g"));
        let row = TaskRow::from_meta(&m).unwrap();
        assert_eq!(row.result, br#"{"a": [1, 2]}"#);
        assert_eq!(row.children, None);
        assert!(row.date_done.is_some());
        assert_eq!((row.name, row.args), (None, None));
        let started = TaskMeta::with_state("t2", State::Started, json!({"pid": 1}));
        assert_eq!(TaskRow::from_meta(&started).unwrap().date_done, None);
        let long = TaskMeta::success("x".repeat(156), json!(1));
        assert!(TaskRow::from_meta(&long).is_err());
    }

    #[test]
    fn legacy_pickles_are_read_as_plain_data_only() {
        // pickle.dumps({'a': [1, 2.5, None, True, 'x']}, protocol=2)
        let plain = b"\x80\x02}q\x00X\x01\x00\x00\x00aq\x01]q\x02(K\x01G@\x04\x00\x00\x00\x00\x00\x00N\x88X\x01\x00\x00\x00xq\x03es.";
        assert_eq!(
            decode_column("t", "result", plain).unwrap(),
            json!({"a": [1, 2.5, null, true, "x"]})
        );
        // pickle.dumps(ValueError('boom'), protocol=2): a class reference, refused.
        let exc =
            b"\x80\x02cexceptions\nValueError\nq\x00X\x04\x00\x00\x00boomq\x01\x85q\x02Rq\x03.";
        let e = decode_column("t", "result", exc).unwrap_err().to_string();
        assert!(e.contains("never loaded"), "{e}");
        let e = decode_column("t", "result", b"\x00garbage")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not JSON"), "{e}");
    }
}
