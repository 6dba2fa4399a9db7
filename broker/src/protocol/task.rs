//! The typed protocol v2 task message: headers, properties and the `[args, kwargs, embed]` body.

use chrono::{DateTime, FixedOffset};
use serde_json::{Map, Value};

use super::fields::{kind, number, number_value, Fields};
use super::node::{new_task_id, process_oid, producer_nodename};
use super::repr::{args_repr, kwargs_repr};
use super::time::format_iso;
use crate::error::{BrokerError, Result};
use crate::message::{Message, Properties, CONTENT_TYPE_JSON};
use crate::pyjson;

/// Headers of a protocol v2 task message, in the order Celery writes them.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskHeaders {
    /// Always `"py"` from Celery; we send it too, so Python workers treat our messages as their own.
    pub lang: String,
    pub task: String,
    pub id: String,
    pub shadow: Option<String>,
    pub eta: Option<DateTime<FixedOffset>>,
    pub expires: Option<DateTime<FixedOffset>>,
    pub group: Option<String>,
    pub group_index: Option<i64>,
    pub retries: u32,
    /// `(hard, soft)` seconds — Celery's wire order is hard first.
    pub timelimit: (Option<f64>, Option<f64>),
    pub root_id: Option<String>,
    pub parent_id: Option<String>,
    pub argsrepr: Option<String>,
    pub kwargsrepr: Option<String>,
    pub origin: Option<String>,
    /// `None` when the producer did not say (Celery then writes `null`).
    pub ignore_result: Option<bool>,
    pub replaced_task_nesting: u32,
    pub stamped_headers: Value,
    pub stamps: Value,
    /// Headers we do not model, kept and written back after the known ones.
    pub extra: Map<String, Value>,
}

const KNOWN_HEADERS: &[&str] = &[
    "lang",
    "task",
    "id",
    "shadow",
    "eta",
    "expires",
    "group",
    "group_index",
    "retries",
    "timelimit",
    "root_id",
    "parent_id",
    "argsrepr",
    "kwargsrepr",
    "origin",
    "ignore_result",
    "replaced_task_nesting",
    "stamped_headers",
    "stamps",
];

impl TaskHeaders {
    /// Headers for a new top-level call of `task` with id `id` (root_id = id, origin = this producer).
    pub fn new(task: impl Into<String>, id: impl Into<String>) -> Self {
        let id = id.into();
        TaskHeaders {
            lang: "py".into(),
            task: task.into(),
            root_id: Some(id.clone()),
            id,
            shadow: None,
            eta: None,
            expires: None,
            group: None,
            group_index: None,
            retries: 0,
            timelimit: (None, None),
            parent_id: None,
            argsrepr: None,
            kwargsrepr: None,
            origin: Some(producer_nodename().to_owned()),
            ignore_result: None,
            replaced_task_nesting: 0,
            stamped_headers: Value::Null,
            stamps: Value::Object(Map::new()),
            extra: Map::new(),
        }
    }

    /// Reads headers; `task` and `id` are required, every other key is optional.
    pub fn from_map(h: &Map<String, Value>) -> Result<Self> {
        let f = Fields {
            map: h,
            what: "header",
        };
        let timelimit = match h.get("timelimit") {
            None | Some(Value::Null) => (None, None),
            Some(Value::Array(a)) if a.len() == 2 => {
                let read = |v: &Value| match v {
                    Value::Null => Ok(None),
                    v => number(v).map(Some).ok_or_else(|| {
                        BrokerError::malformed(format_args!(
                            "header `timelimit`: expected numbers, got {}",
                            kind(v)
                        ))
                    }),
                };
                (read(&a[0])?, read(&a[1])?)
            }
            Some(v) => {
                return Err(BrokerError::malformed(format_args!(
                    "header `timelimit`: expected [hard, soft], got {}",
                    kind(v)
                )))
            }
        };
        Ok(TaskHeaders {
            lang: f.opt_str("lang")?.unwrap_or_else(|| "py".into()),
            task: f.required_str("task")?,
            id: f.required_str("id")?,
            shadow: f.opt_str("shadow")?,
            eta: f.opt_time("eta")?,
            expires: f.opt_time("expires")?,
            group: f.opt_str("group")?,
            group_index: f.opt_i64("group_index")?,
            retries: f.u32_or_zero("retries")?,
            timelimit,
            root_id: f.opt_str("root_id")?,
            parent_id: f.opt_str("parent_id")?,
            argsrepr: f.opt_str("argsrepr")?,
            kwargsrepr: f.opt_str("kwargsrepr")?,
            origin: f.opt_str("origin")?,
            ignore_result: f.opt_bool("ignore_result")?,
            replaced_task_nesting: f.u32_or_zero("replaced_task_nesting")?,
            stamped_headers: h.get("stamped_headers").cloned().unwrap_or(Value::Null),
            stamps: h
                .get("stamps")
                .cloned()
                .unwrap_or_else(|| Value::Object(Map::new())),
            extra: h
                .iter()
                .filter(|(k, _)| !KNOWN_HEADERS.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        })
    }

    /// Writes the headers in Celery's key order, `null` where there is no value.
    pub fn to_map(&self) -> Map<String, Value> {
        let s = |o: &Option<String>| o.clone().map_or(Value::Null, Value::String);
        let t = |o: &Option<DateTime<FixedOffset>>| {
            o.as_ref()
                .map_or(Value::Null, |t| Value::String(format_iso(t)))
        };
        let n = |o: Option<f64>| o.map_or(Value::Null, number_value);
        let mut m = Map::with_capacity(KNOWN_HEADERS.len() + self.extra.len());
        m.insert("lang".into(), Value::String(self.lang.clone()));
        m.insert("task".into(), Value::String(self.task.clone()));
        m.insert("id".into(), Value::String(self.id.clone()));
        m.insert("shadow".into(), s(&self.shadow));
        m.insert("eta".into(), t(&self.eta));
        m.insert("expires".into(), t(&self.expires));
        m.insert("group".into(), s(&self.group));
        m.insert(
            "group_index".into(),
            self.group_index.map_or(Value::Null, Value::from),
        );
        m.insert("retries".into(), Value::from(self.retries));
        m.insert(
            "timelimit".into(),
            Value::Array(vec![n(self.timelimit.0), n(self.timelimit.1)]),
        );
        m.insert("root_id".into(), s(&self.root_id));
        m.insert("parent_id".into(), s(&self.parent_id));
        m.insert("argsrepr".into(), s(&self.argsrepr));
        m.insert("kwargsrepr".into(), s(&self.kwargsrepr));
        m.insert("origin".into(), s(&self.origin));
        m.insert(
            "ignore_result".into(),
            self.ignore_result.map_or(Value::Null, Value::Bool),
        );
        m.insert(
            "replaced_task_nesting".into(),
            Value::from(self.replaced_task_nesting),
        );
        m.insert("stamped_headers".into(), self.stamped_headers.clone());
        m.insert("stamps".into(), self.stamps.clone());
        for (k, v) in &self.extra {
            m.insert(k.clone(), v.clone());
        }
        m
    }
}

/// The third element of the body: workflow instructions, kept as Celery sent them.
///
/// Each field is the raw JSON (`null`, a list of signature dicts, or one dict for `chord`), so a message
/// we pass on keeps exactly what the sender wrote. Use [`crate::protocol::Signature`] to read them.
#[derive(Debug, Clone, PartialEq)]
pub struct Embed {
    pub callbacks: Value,
    pub errbacks: Value,
    pub chain: Value,
    pub chord: Value,
    pub extra: Map<String, Value>,
}

impl Default for Embed {
    fn default() -> Self {
        Embed {
            callbacks: Value::Null,
            errbacks: Value::Null,
            chain: Value::Null,
            chord: Value::Null,
            extra: Map::new(),
        }
    }
}

impl Embed {
    fn from_value(v: Value) -> Result<Self> {
        let mut o = match v {
            Value::Null => return Ok(Embed::default()),
            Value::Object(o) => o,
            other => {
                return Err(BrokerError::malformed(format_args!(
                    "body: embed must be an object or null, got {}",
                    kind(&other)
                )))
            }
        };
        let mut take = |k: &str| o.remove(k).unwrap_or(Value::Null);
        let (callbacks, errbacks, chain, chord) = (
            take("callbacks"),
            take("errbacks"),
            take("chain"),
            take("chord"),
        );
        for (name, v) in [
            ("callbacks", &callbacks),
            ("errbacks", &errbacks),
            ("chain", &chain),
        ] {
            if !matches!(v, Value::Null | Value::Array(_)) {
                return Err(BrokerError::malformed(format_args!(
                    "body: embed.{name} must be a list, got {}",
                    kind(v)
                )));
            }
        }
        if !matches!(chord, Value::Null | Value::Object(_)) {
            return Err(BrokerError::malformed(format_args!(
                "body: embed.chord must be an object, got {}",
                kind(&chord)
            )));
        }
        // Every step must read as a signature now: a step found broken only after the job ran
        // could neither be sent nor dropped, and the job would come round for ever.
        for (name, v) in [
            ("callbacks", &callbacks),
            ("errbacks", &errbacks),
            ("chain", &chain),
        ] {
            super::Signature::list_from_value(v).map_err(|e| {
                BrokerError::malformed(format_args!("body: embed.{name}: {}", reason(&e)))
            })?;
        }
        if !chord.is_null() {
            super::Signature::from_value(&chord).map_err(|e| {
                BrokerError::malformed(format_args!("body: embed.chord: {}", reason(&e)))
            })?;
        }
        Ok(Embed {
            callbacks,
            errbacks,
            chain,
            chord,
            extra: o,
        })
    }

    fn to_value(&self) -> Value {
        let mut m = Map::with_capacity(4 + self.extra.len());
        m.insert("callbacks".into(), self.callbacks.clone());
        m.insert("errbacks".into(), self.errbacks.clone());
        m.insert("chain".into(), self.chain.clone());
        m.insert("chord".into(), self.chord.clone());
        for (k, v) in &self.extra {
            m.insert(k.clone(), v.clone());
        }
        Value::Object(m)
    }

    /// True when there is nothing in it.
    pub fn is_empty(&self) -> bool {
        let empty = |v: &Value| match v {
            Value::Null => true,
            Value::Array(a) => a.is_empty(),
            _ => false,
        };
        empty(&self.callbacks)
            && empty(&self.errbacks)
            && empty(&self.chain)
            && self.chord.is_null()
    }
}

/// The text of a decoding error without its "malformed message" preamble.
fn reason(e: &BrokerError) -> String {
    match e {
        BrokerError::Malformed(what) => what.clone(),
        other => other.to_string(),
    }
}

/// A complete task message.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskMessage {
    pub headers: TaskHeaders,
    pub properties: Properties,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    pub embed: Embed,
}

impl TaskMessage {
    /// A new call of `task`, with a fresh id and the properties and headers Celery would set
    /// (`reply_to` = this process's oid, persistent, priority 0, argsrepr/kwargsrepr filled in).
    pub fn new(task: impl Into<String>, args: Vec<Value>, kwargs: Map<String, Value>) -> Self {
        Self::with_id(task, new_task_id(), args, kwargs)
    }

    /// Like [`TaskMessage::new`] with a chosen id.
    pub fn with_id(
        task: impl Into<String>,
        id: impl Into<String>,
        args: Vec<Value>,
        kwargs: Map<String, Value>,
    ) -> Self {
        let mut headers = TaskHeaders::new(task, id);
        headers.argsrepr = Some(args_repr(&args));
        headers.kwargsrepr = Some(kwargs_repr(&kwargs));
        let properties = Properties {
            correlation_id: Some(headers.id.clone()),
            reply_to: Some(process_oid().to_owned()),
            ..Properties::default()
        };
        TaskMessage {
            headers,
            properties,
            args,
            kwargs,
            embed: Embed::default(),
        }
    }

    /// The task id.
    pub fn id(&self) -> &str {
        &self.headers.id
    }

    /// The Python repr of the positional args: the `argsrepr` header, or made from the args.
    pub fn args_repr(&self) -> String {
        self.headers
            .argsrepr
            .clone()
            .unwrap_or_else(|| args_repr(&self.args))
    }

    /// The Python repr of the kwargs: the `kwargsrepr` header, or made from the kwargs.
    pub fn kwargs_repr(&self) -> String {
        self.headers
            .kwargsrepr
            .clone()
            .unwrap_or_else(|| kwargs_repr(&self.kwargs))
    }

    /// The registered task name.
    pub fn task(&self) -> &str {
        &self.headers.task
    }

    /// The body bytes, exactly as Celery would write them: `[args, kwargs, embed]` in Python's JSON style.
    pub fn encode_body(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.push(b'[');
        pyjson::write(&mut out, &self.args);
        out.extend_from_slice(b", ");
        pyjson::write(&mut out, &self.kwargs);
        out.extend_from_slice(b", ");
        pyjson::write(&mut out, &self.embed.to_value());
        out.push(b']');
        out
    }

    /// The message to publish.
    pub fn encode(&self) -> Message {
        Message {
            properties: self.properties.clone(),
            headers: self.headers.to_map(),
            body: self.encode_body(),
        }
    }

    /// Reads a task message (protocol v2, or v1 when the headers have no `task`). Never panics; a message
    /// that is not a valid task is a [`BrokerError::Malformed`] naming what is wrong, and any serializer
    /// but JSON is a [`BrokerError::ContentType`] (pickle is refused, never executed).
    pub fn decode(message: &Message) -> Result<Self> {
        check_content(message)?;
        let body: Value = serde_json::from_slice(&message.body)
            .map_err(|e| BrokerError::malformed(format_args!("body is not valid JSON: {e}")))?;
        if message.headers.contains_key("task") {
            Self::decode_v2(message, body)
        } else {
            Self::decode_v1(message, body)
        }
    }

    fn decode_v2(message: &Message, body: Value) -> Result<Self> {
        let headers = TaskHeaders::from_map(&message.headers)?;
        let Value::Array(parts) = body else {
            return Err(BrokerError::malformed(format_args!(
                "body of task {} ({}): expected [args, kwargs, embed], got {}",
                headers.id,
                headers.task,
                kind(&body)
            )));
        };
        if parts.len() != 3 {
            return Err(BrokerError::malformed(format_args!(
                "body of task {} ({}): expected 3 elements [args, kwargs, embed], got {}",
                headers.id,
                headers.task,
                parts.len()
            )));
        }
        let mut parts = parts.into_iter();
        let (args, kwargs, embed) = (parts.next(), parts.next(), parts.next());
        let args = match args {
            Some(Value::Array(a)) => a,
            Some(Value::Null) => Vec::new(),
            Some(v) => {
                return Err(BrokerError::malformed(format_args!(
                    "body: args must be a list, got {}",
                    kind(&v)
                )))
            }
            None => Vec::new(),
        };
        let kwargs = match kwargs {
            Some(Value::Object(o)) => o,
            Some(Value::Null) => Map::new(),
            Some(v) => {
                return Err(BrokerError::malformed(format_args!(
                    "body: kwargs must be an object, got {}",
                    kind(&v)
                )))
            }
            None => Map::new(),
        };
        let embed = Embed::from_value(embed.unwrap_or(Value::Null))?;
        Ok(TaskMessage {
            headers,
            properties: message.properties.clone(),
            args,
            kwargs,
            embed,
        })
    }

    /// Protocol v1: everything in a body dict (`task`, `id`, `args`, `kwargs`, `eta`, `retries`, …).
    fn decode_v1(message: &Message, body: Value) -> Result<Self> {
        let Value::Object(mut o) = body else {
            return Err(BrokerError::malformed(
                "no `task` header, and the body is not a protocol v1 task dict",
            ));
        };
        if !o.contains_key("task") {
            return Err(BrokerError::malformed(
                "missing header `task` (not a Celery task message)",
            ));
        }
        // v1 keeps the same field names (and `timelimit` is (hard, soft) there too), so the header
        // reader applies to the body dict. A `compression` there is refused as v2's header is: the
        // body in hand is plain JSON, and a retry (sent as v2) would carry it as a header and be
        // refused only then.
        if let Some(c) = o.get("compression").filter(|v| !v.is_null()) {
            return Err(BrokerError::malformed(format_args!(
                "compressed bodies ({}) are not supported; send uncompressed JSON",
                c.as_str().unwrap_or("?")
            )));
        }
        let headers = TaskHeaders::from_map(&o)?;
        let args = match o.remove("args") {
            Some(Value::Array(a)) => a,
            None | Some(Value::Null) => Vec::new(),
            Some(v) => {
                return Err(BrokerError::malformed(format_args!(
                    "v1 body: args must be a list, got {}",
                    kind(&v)
                )))
            }
        };
        let kwargs = match o.remove("kwargs") {
            Some(Value::Object(m)) => m,
            None | Some(Value::Null) => Map::new(),
            Some(v) => {
                return Err(BrokerError::malformed(format_args!(
                    "v1 body: kwargs must be an object, got {}",
                    kind(&v)
                )))
            }
        };
        // The workflow steps are checked as v2's embed is (each must read as a signature now).
        let steps: Map<String, Value> = ["callbacks", "errbacks", "chord"]
            .into_iter()
            .filter_map(|k| o.remove(k).map(|v| (k.to_owned(), v)))
            .collect();
        let embed = Embed::from_value(Value::Object(steps))?;
        let mut headers = headers;
        headers.extra.retain(|k, _| {
            !matches!(
                k.as_str(),
                "args" | "kwargs" | "callbacks" | "errbacks" | "chord"
            )
        });
        if headers.root_id.is_none() {
            headers.root_id = Some(headers.id.clone());
        }
        Ok(TaskMessage {
            headers,
            properties: message.properties.clone(),
            args,
            kwargs,
            embed,
        })
    }
}

/// Refuses anything but JSON in UTF-8, and compressed bodies.
fn check_content(message: &Message) -> Result<()> {
    let ct = message.properties.content_type.trim();
    let base = ct.split(';').next().unwrap_or("").trim();
    if !base.eq_ignore_ascii_case(CONTENT_TYPE_JSON) {
        return Err(BrokerError::ContentType(ct.to_owned()));
    }
    let enc = message.properties.content_encoding.trim();
    if !(enc.is_empty() || enc.eq_ignore_ascii_case("utf-8") || enc.eq_ignore_ascii_case("utf8")) {
        return Err(BrokerError::malformed(format_args!(
            "unsupported content encoding `{enc}` for JSON"
        )));
    }
    if let Some(c) = message.headers.get("compression").filter(|v| !v.is_null()) {
        return Err(BrokerError::malformed(format_args!(
            "compressed bodies ({}) are not supported; send uncompressed JSON",
            c.as_str().unwrap_or("?")
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Workflow steps that are not signatures are refused when the message is read, naming the
    /// field, instead of after the job ran.
    #[test]
    fn an_embed_step_that_is_not_a_signature_is_refused() {
        for (embed, field) in [
            (json!({"errbacks": [{"options": "x"}]}), "embed.errbacks"),
            (json!({"chain": [1, 2, 3]}), "embed.chain"),
            (json!({"chain": [{"task": 5}]}), "embed.chain"),
            (json!({"callbacks": [{"args": 7}]}), "embed.callbacks"),
            (json!({"chord": {"task": null}}), "embed.chord"),
        ] {
            let mut m = TaskMessage::new("demo.add", vec![json!(1)], Map::new()).encode();
            m.body = json!([[1], {}, embed]).to_string().into_bytes();
            let e = TaskMessage::decode(&m).unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        }
    }

    /// Headers and body of a message Celery 5.7 published (`send_task('demo.add', (2, 3),
    /// kwargs={'z': 'héllo ☃'}, countdown=5, expires=60, priority=3, time_limit=10, soft_time_limit=5.5)`).
    fn celery_sample() -> Message {
        let headers = json!({"lang": "py", "task": "demo.add", "id": "85621692-0899-4a99-a3c9-46d0063eef39", "shadow": null,
            "eta": "2026-11-23T11:23:37.319511+00:00", "expires": "2026-11-23T11:24:32.319511+00:00", "group": null,
            "group_index": null, "retries": 0, "timelimit": [10, 5.5], "root_id": "85621692-0899-4a99-a3c9-46d0063eef39",
            "parent_id": null, "argsrepr": "(2, 3)", "kwargsrepr": "{'z': 'héllo ☃'}", "origin": "gen10785@vm",
            "ignore_result": null, "replaced_task_nesting": 0, "stamped_headers": null, "stamps": {}});
        Message {
            properties: Properties {
                correlation_id: Some("85621692-0899-4a99-a3c9-46d0063eef39".into()),
                reply_to: Some("a2c3a804-92fa-3a6c-9aa0-ca9fde3742cc".into()),
                priority: 3,
                expiration: Some("60000".into()),
                ..Properties::default()
            },
            headers: headers.as_object().cloned().unwrap_or_default(),
            body: br#"[[2, 3], {"z": "h\u00e9llo \u2603"}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]"#.to_vec(),
        }
    }

    #[test]
    fn decodes_and_reencodes_celery_bytes_exactly() {
        let m = celery_sample();
        let t = TaskMessage::decode(&m).unwrap();
        assert_eq!(t.task(), "demo.add");
        assert_eq!(t.args, vec![json!(2), json!(3)]);
        assert_eq!(t.kwargs.get("z"), Some(&json!("héllo ☃")));
        assert_eq!(t.headers.timelimit, (Some(10.0), Some(5.5)));
        assert_eq!(t.headers.eta.unwrap().timestamp_subsec_micros(), 319511);
        assert_eq!(t.headers.ignore_result, None);
        assert!(t.embed.is_empty());
        let back = t.encode();
        assert_eq!(
            String::from_utf8(back.body.clone()).unwrap(),
            String::from_utf8(m.body.clone()).unwrap()
        );
        assert_eq!(back.headers, m.headers);
        assert_eq!(
            serde_json::to_string(&back.headers).unwrap(),
            serde_json::to_string(&m.headers).unwrap()
        );
        assert_eq!(back, m);
    }

    #[test]
    fn new_message_has_celery_defaults() {
        let t = TaskMessage::new("demo.add", vec![json!(2), json!(2)], Map::new());
        let m = t.encode();
        assert_eq!(m.properties.correlation_id.as_deref(), Some(t.id()));
        assert_eq!(m.headers["root_id"], json!(t.id()));
        assert_eq!(m.headers["argsrepr"], json!("(2, 2)"));
        assert_eq!(m.headers["kwargsrepr"], json!("{}"));
        assert_eq!(m.headers["timelimit"], json!([null, null]));
        assert!(m.headers["origin"].as_str().unwrap().starts_with("gen"));
        assert_eq!(
            String::from_utf8(m.body).unwrap(),
            r#"[[2, 2], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]"#
        );
        let keys: Vec<&str> = m.headers.keys().map(String::as_str).collect();
        assert_eq!(keys, KNOWN_HEADERS);
    }

    #[test]
    fn refuses_pickle_and_other_serializers() {
        let mut m = celery_sample();
        m.properties.content_type = "application/x-python-serialize".into();
        m.body = b"\x80\x04\x95cos\nsystem\n".to_vec();
        let e = TaskMessage::decode(&m).unwrap_err();
        assert!(
            matches!(e, BrokerError::ContentType(ref c) if c == "application/x-python-serialize"),
            "{e}"
        );
        m.properties.content_type = "application/x-yaml".into();
        assert!(matches!(
            TaskMessage::decode(&m),
            Err(BrokerError::ContentType(_))
        ));
    }

    type Mutation = Box<dyn Fn(&mut Message)>;

    #[test]
    fn malformed_messages_are_named_errors() {
        let cases: Vec<(Mutation, &str)> = vec![
            (
                Box::new(|m| m.body = b"[[1], {}, ".to_vec()),
                "not valid JSON",
            ),
            (
                Box::new(|m| m.body = b"{\"a\": 1}".to_vec()),
                "expected [args, kwargs, embed]",
            ),
            (
                Box::new(|m| m.body = b"[[1], {}]".to_vec()),
                "expected 3 elements",
            ),
            (
                Box::new(|m| m.body = b"[1, {}, {}]".to_vec()),
                "args must be a list",
            ),
            (
                Box::new(|m| m.body = b"[[], [], {}]".to_vec()),
                "kwargs must be an object",
            ),
            (
                Box::new(|m| m.body = b"[[], {}, 5]".to_vec()),
                "embed must be an object",
            ),
            (
                Box::new(|m| m.body = b"[[], {}, {\"chain\": 5}]".to_vec()),
                "embed.chain must be a list",
            ),
            (
                Box::new(|m| {
                    m.headers.remove("id");
                }),
                "missing header `id`",
            ),
            (
                Box::new(|m| {
                    m.headers.insert("retries".into(), json!("x"));
                }),
                "header `retries`",
            ),
            (
                Box::new(|m| {
                    m.headers.insert("eta".into(), json!("tomorrow"));
                }),
                "header `eta`",
            ),
            (
                Box::new(|m| {
                    m.headers.insert("timelimit".into(), json!(5));
                }),
                "header `timelimit`",
            ),
            (
                Box::new(|m| {
                    m.headers.insert("task".into(), json!(7));
                }),
                "header `task`",
            ),
            (
                Box::new(|m| {
                    m.headers
                        .insert("compression".into(), json!("application/x-gzip"));
                }),
                "compressed",
            ),
        ];
        for (mutate, expect) in cases {
            let mut m = celery_sample();
            mutate(&mut m);
            let e = TaskMessage::decode(&m).unwrap_err().to_string();
            assert!(e.contains(expect), "expected `{expect}` in `{e}`");
        }
    }

    #[test]
    fn decodes_protocol_v1() {
        let m = Message {
            properties: Properties::default(),
            headers: Map::new(),
            body: br#"{"task": "demo.add", "id": "i1", "args": [1, 2], "kwargs": {"k": 1}, "retries": 2, "eta": null, "utc": true}"#.to_vec(),
        };
        let t = TaskMessage::decode(&m).unwrap();
        assert_eq!((t.task(), t.id(), t.headers.retries), ("demo.add", "i1", 2));
        assert_eq!(t.args, vec![json!(1), json!(2)]);
        assert_eq!(t.headers.root_id.as_deref(), Some("i1"));
        assert!(!t.headers.extra.contains_key("args"));
    }

    /// Found by fuzzing (a decoded message re-encoded did not decode): protocol v1 workflow steps
    /// are checked as v2's are, so a broken one is refused when read, not after the job ran.
    #[test]
    fn a_v1_workflow_step_that_is_not_a_signature_is_refused() {
        for (steps, field) in [
            (r#""errbacks": "10-0:00""#, "errbacks"),
            (r#""callbacks": [1]"#, "callbacks"),
            (r#""chord": {"args": []}"#, "chord"),
        ] {
            let m = Message {
                body: format!(r#"{{"task": "demo.add", "id": "x", {steps}}}"#).into_bytes(),
                ..Message::default()
            };
            let e = TaskMessage::decode(&m).unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        }
        let good = Message {
            body: br#"{"task": "demo.add", "id": "x", "errbacks": [{"task": "demo.fail"}], "chord": null}"#
                .to_vec(),
            ..Message::default()
        };
        let t = TaskMessage::decode(&good).unwrap();
        assert_eq!(TaskMessage::decode(&t.encode()).unwrap().embed, t.embed);
    }

    /// Found by fuzzing (its round-trip check): a v1 body dict with `compression` decoded, but the
    /// same task encoded again (as a retry is, in v2) carried it as a header and was refused.
    #[test]
    fn a_v1_body_with_compression_is_refused_when_read() {
        let m = Message {
            body: br#"{"task": "demo.add", "id": "x", "compression": "x"}"#.to_vec(),
            ..Message::default()
        };
        let e = TaskMessage::decode(&m).unwrap_err().to_string();
        assert!(e.contains("compressed"), "{e}");
    }

    #[test]
    fn keeps_workflow_embed_intact() {
        let mut m = celery_sample();
        m.body = br#"[[2, 2], {}, {"callbacks": null, "errbacks": null, "chord": null, "chain": [{"task": "mul", "args": [8], "kwargs": {}, "options": {"task_id": "c3"}, "subtask_type": null, "immutable": false}]}]"#.to_vec();
        let t = TaskMessage::decode(&m).unwrap();
        let chain = crate::protocol::Signature::list_from_value(&t.embed.chain).unwrap();
        assert_eq!(chain[0].task_id(), Some("c3"));
        let again = TaskMessage::decode(&t.encode()).unwrap();
        assert_eq!(again.embed, t.embed);
    }
}
