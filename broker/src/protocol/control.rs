//! Remote-control requests, as Celery's pidbox mailbox sends them: a JSON body
//! `{"method", "arguments", "destination", "pattern", "matcher"}` (plus `ticket` and `reply_to` when a
//! reply is wanted) broadcast on the `celery.pidbox` fanout exchange, with headers
//! `{"clock", "expires"}`. Python's `app.control.revoke(...)` and ours are the same message.
//! A request that wants replies carries a `ticket` and `reply_to`; each node answers on the direct
//! exchange `reply.celery.pidbox` ([`reply_message`]).

use serde_json::{Map, Value};

use super::fields::kind;
use crate::error::{BrokerError, Result};
use crate::message::Message;

/// The fanout exchange of Celery's remote control.
pub const PIDBOX_EXCHANGE: &str = "celery.pidbox";

/// The direct exchange replies go to, keyed by the asker's oid.
pub const REPLY_EXCHANGE: &str = "reply.celery.pidbox";

/// The queue a client named by `oid` collects replies on (kombu's `<oid>.reply.celery.pidbox`).
pub fn reply_queue(oid: &str) -> String {
    format!("{oid}.{REPLY_EXCHANGE}")
}

/// A reply to a request that asked for one: published to `reply_to.exchange` with routing key
/// `reply_to.routing_key`, headers `{"ticket", "clock"}`, body `{"<node>": value}`.
pub fn reply_message(node: &str, ticket: &str, clock: u64, value: Value) -> Message {
    let mut body = Map::new();
    body.insert(node.to_owned(), value);
    let mut headers = Map::new();
    headers.insert("ticket".into(), Value::String(ticket.to_owned()));
    headers.insert("clock".into(), Value::from(clock));
    Message::transient_json(headers, &Value::Object(body))
}

/// The queue (AMQP) a worker named `node` receives control requests on.
pub fn pidbox_queue(node: &str) -> String {
    format!("{node}.{PIDBOX_EXCHANGE}")
}

/// One remote-control request.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlRequest {
    /// `revoke`, `ping`, `shutdown`, …
    pub method: String,
    pub arguments: Map<String, Value>,
    /// Node names that should act; `None` means every node (or those `pattern` matches).
    pub destination: Option<Vec<String>>,
    /// With no `destination`: only nodes whose name matches this, read as `matcher` says
    /// (`glob`, fnmatch-style; `pcre` is not supported here and matches no node).
    pub pattern: Option<String>,
    pub matcher: Option<String>,
    /// Set when the sender waits for replies.
    pub ticket: Option<String>,
    pub reply_to: Option<Value>,
}

impl ControlRequest {
    /// A fire-and-forget request (Celery's "cast") to every node.
    pub fn cast(method: impl Into<String>, arguments: Map<String, Value>) -> Self {
        ControlRequest {
            method: method.into(),
            arguments,
            destination: None,
            pattern: None,
            matcher: None,
            ticket: None,
            reply_to: None,
        }
    }

    /// A request that wants replies (Celery's "call"): `ticket` identifies them, and they go to the
    /// reply queue of the client `oid`. `destination` `None` asks every node.
    pub fn call(
        method: impl Into<String>,
        arguments: Map<String, Value>,
        destination: Option<Vec<String>>,
        ticket: impl Into<String>,
        oid: &str,
    ) -> Self {
        let mut reply_to = Map::new();
        reply_to.insert("exchange".into(), Value::String(REPLY_EXCHANGE.into()));
        reply_to.insert("routing_key".into(), Value::String(oid.to_owned()));
        ControlRequest {
            method: method.into(),
            arguments,
            destination,
            pattern: None,
            matcher: None,
            ticket: Some(ticket.into()),
            reply_to: Some(Value::Object(reply_to)),
        }
    }

    /// Where the reply goes (`exchange`, `routing_key`), if one is wanted.
    pub fn reply_target(&self) -> Option<(String, String)> {
        self.ticket.as_ref()?;
        let r = self.reply_to.as_ref()?;
        let exchange = r.get("exchange").and_then(Value::as_str)?;
        let key = r.get("routing_key").and_then(Value::as_str)?;
        Some((exchange.to_owned(), key.to_owned()))
    }

    /// True if the node called `node` should act on it.
    pub fn is_for(&self, node: &str) -> bool {
        if let Some(d) = &self.destination {
            return d.iter().any(|n| n == node);
        }
        match (self.pattern.as_deref(), self.matcher.as_deref()) {
            (Some(p), Some("glob")) => glob_matches(p.as_bytes(), node.as_bytes()),
            (Some(_), Some(_)) => false,
            _ => true,
        }
    }

    /// The message to broadcast on [`PIDBOX_EXCHANGE`].
    pub fn to_message(&self, clock: u64) -> Message {
        let mut body = Map::new();
        body.insert("method".into(), Value::String(self.method.clone()));
        body.insert("arguments".into(), Value::Object(self.arguments.clone()));
        body.insert(
            "destination".into(),
            self.destination.as_ref().map_or(Value::Null, |d| {
                Value::Array(d.iter().cloned().map(Value::String).collect())
            }),
        );
        let text = |v: &Option<String>| v.clone().map_or(Value::Null, Value::String);
        body.insert("pattern".into(), text(&self.pattern));
        body.insert("matcher".into(), text(&self.matcher));
        if let Some(t) = &self.ticket {
            body.insert("ticket".into(), Value::String(t.clone()));
            body.insert(
                "reply_to".into(),
                self.reply_to.clone().unwrap_or(Value::Null),
            );
        }
        let mut headers = Map::new();
        headers.insert("clock".into(), Value::from(clock));
        headers.insert("expires".into(), Value::from(0));
        Message::transient_json(headers, &Value::Object(body))
    }

    /// Reads a request; anything that is not one is an error naming what is wrong.
    pub fn from_message(m: &Message) -> Result<Self> {
        let v: Value = serde_json::from_slice(&m.body).map_err(|e| {
            BrokerError::malformed(format_args!("control request is not JSON: {e}"))
        })?;
        let Value::Object(mut o) = v else {
            return Err(BrokerError::malformed(format_args!(
                "control request: expected an object, got {}",
                kind(&v)
            )));
        };
        let method = match o.remove("method") {
            Some(Value::String(s)) if !s.is_empty() => s,
            _ => return Err(BrokerError::malformed("control request has no `method`")),
        };
        let arguments = match o.remove("arguments") {
            Some(Value::Object(a)) => a,
            None | Some(Value::Null) => Map::new(),
            Some(other) => {
                return Err(BrokerError::malformed(format_args!(
                    "control `arguments`: expected an object, got {}",
                    kind(&other)
                )))
            }
        };
        let destination = match o.remove("destination") {
            Some(Value::Array(a)) => Some(
                a.into_iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect(),
            ),
            Some(Value::String(s)) => Some(vec![s]),
            _ => None,
        };
        let pattern = o
            .remove("pattern")
            .and_then(|v| v.as_str().map(str::to_owned));
        let matcher = o
            .remove("matcher")
            .and_then(|v| v.as_str().map(str::to_owned));
        let ticket = o
            .remove("ticket")
            .and_then(|v| v.as_str().map(str::to_owned));
        let reply_to = o.remove("reply_to").filter(|v| !v.is_null());
        Ok(ControlRequest {
            method,
            arguments,
            destination,
            pattern,
            matcher,
            ticket,
            reply_to,
        })
    }
}

/// Longest glob pattern a node looks at; a longer one matches no node.
pub const MAX_PATTERN: usize = 1024;

/// One element of a compiled glob pattern.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Glob<'p> {
    /// This byte.
    Byte(u8),
    /// `?`: any one byte.
    One,
    /// `[…]` / `[!…]`: one byte in (or not in) the set, with `a-z` ranges.
    Class { negate: bool, set: &'p [u8] },
    /// `*`: any run of bytes.
    Star,
}

impl Glob<'_> {
    fn accepts(self, c: u8) -> bool {
        match self {
            Glob::Byte(b) => b == c,
            Glob::One => true,
            Glob::Class { negate, set } => class_has(set, c) != negate,
            Glob::Star => false,
        }
    }
}

fn class_has(set: &[u8], c: u8) -> bool {
    let mut i = 0;
    while i < set.len() {
        if i + 2 < set.len() && set[i + 1] == b'-' {
            if (set[i]..=set[i + 2]).contains(&c) {
                return true;
            }
            i += 3;
        } else {
            if set[i] == c {
                return true;
            }
            i += 1;
        }
    }
    false
}

/// Splits a pattern into its elements (fnmatch's: a `[` without a closing `]` is a plain byte).
fn compile(p: &[u8]) -> Vec<Glob<'_>> {
    let mut out = Vec::with_capacity(p.len());
    let mut i = 0;
    while let Some(&c) = p.get(i) {
        let (glob, len) = match c {
            b'*' => (Glob::Star, 1),
            b'?' => (Glob::One, 1),
            b'[' => match p.iter().skip(i + 2).position(|&b| b == b']') {
                Some(at) => {
                    let close = i + 2 + at;
                    let negate = p.get(i + 1) == Some(&b'!');
                    let from = if negate { i + 2 } else { i + 1 };
                    let set = p.get(from..close).unwrap_or_default();
                    (Glob::Class { negate, set }, close + 1 - i)
                }
                None => (Glob::Byte(b'['), 1),
            },
            c => (Glob::Byte(c), 1),
        };
        out.push(glob);
        i += len;
    }
    out
}

/// fnmatch-style matching (`*`, `?`, `[set]`, `[!set]`), as Celery's `glob` matcher does it, in
/// O(pattern × name) steps and no recursion, whatever the pattern: the last `*` seen is the only
/// backtracking point, which is enough because a later `*` can absorb whatever an earlier one
/// would have.
fn glob_matches(p: &[u8], s: &[u8]) -> bool {
    if p.len() > MAX_PATTERN {
        return false;
    }
    let globs = compile(p);
    let (mut g, mut i) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        match globs.get(g) {
            Some(Glob::Star) => {
                star = Some((g, i));
                g += 1;
            }
            Some(glob) if glob.accepts(s[i]) => {
                g += 1;
                i += 1;
            }
            _ => match star {
                // Let the last `*` take one byte more and try again after it.
                Some((sg, si)) => {
                    star = Some((sg, si + 1));
                    g = sg + 1;
                    i = si + 1;
                }
                None => return false,
            },
        }
    }
    globs[g.min(globs.len())..].iter().all(|x| *x == Glob::Star)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn revoke_round_trips_in_celerys_shape() {
        let args = json!({"task_id": "t1", "terminate": true, "signal": "SIGTERM"});
        let r = ControlRequest::cast("revoke", args.as_object().cloned().unwrap());
        let m = r.to_message(7);
        assert_eq!(
            String::from_utf8(m.body.clone()).unwrap(),
            r#"{"method": "revoke", "arguments": {"task_id": "t1", "terminate": true, "signal": "SIGTERM"}, "destination": null, "pattern": null, "matcher": null}"#
        );
        assert_eq!(m.properties.delivery_mode, crate::message::TRANSIENT);
        assert_eq!(ControlRequest::from_message(&m).unwrap(), r);
        assert!(r.is_for("celerity@a"));
        let only_b = ControlRequest {
            destination: Some(vec!["celerity@b".into()]),
            ..r
        };
        assert!(!only_b.is_for("celerity@a") && only_b.is_for("celerity@b"));
    }

    #[test]
    fn calls_carry_a_ticket_and_get_celerys_reply() {
        let r = ControlRequest::call("ping", Map::new(), Some(vec!["a@h".into()]), "t-1", "oid-9");
        let back = ControlRequest::from_message(&r.to_message(1)).unwrap();
        assert_eq!(back, r);
        assert_eq!(
            back.reply_target(),
            Some(("reply.celery.pidbox".into(), "oid-9".into()))
        );
        assert_eq!(
            ControlRequest::cast("ping", Map::new()).reply_target(),
            None
        );
        let m = reply_message("a@h", "t-1", 5, json!({"ok": "pong"}));
        assert_eq!(m.headers["ticket"], json!("t-1"));
        assert_eq!(m.headers["clock"], json!(5));
        let body: Value = serde_json::from_slice(&m.body).unwrap();
        assert_eq!(body, json!({"a@h": {"ok": "pong"}}));
        assert_eq!(reply_queue("oid-9"), "oid-9.reply.celery.pidbox");
    }

    #[test]
    fn patterns_select_nodes_like_fnmatch() {
        let mut r = ControlRequest::cast("ping", Map::new());
        r.pattern = Some("celerity-*@h[0-9]".into());
        r.matcher = Some("glob".into());
        let back = ControlRequest::from_message(&r.to_message(1)).unwrap();
        assert_eq!(back, r);
        assert!(back.is_for("celerity-1@h3"));
        assert!(!back.is_for("celery@h3") && !back.is_for("celerity-1@hx"));
        r.pattern = Some("a?c@[!x]".into());
        assert!(r.is_for("abc@y") && !r.is_for("abc@x") && !r.is_for("ac@y"));
        r.matcher = Some("pcre".into());
        assert!(!r.is_for("abc@y"), "pcre is not supported: no node acts");
        r.destination = Some(vec!["abc@x".into()]);
        assert!(r.is_for("abc@x"), "destination wins");
    }

    #[test]
    fn hostile_patterns_match_quickly_and_do_not_overflow_the_stack() {
        let node = "celerity-1@".to_owned() + &"h".repeat(200);
        // Exponential for a backtracking matcher: hung the worker before.
        let stars = "*".repeat(60) + "x";
        assert!(!glob_matches(stars.as_bytes(), node.as_bytes()));
        let many = "*a".repeat(500) + "!";
        assert!(!glob_matches(many.as_bytes(), "a".repeat(300).as_bytes()));
        // Deep enough to overflow the stack of a recursive matcher.
        let long = "?".repeat(MAX_PATTERN);
        assert!(!glob_matches(long.as_bytes(), node.as_bytes()));
        assert!(!glob_matches("*".repeat(MAX_PATTERN + 1).as_bytes(), b"a"));
        assert!(glob_matches(
            "*".repeat(MAX_PATTERN).as_bytes(),
            node.as_bytes()
        ));
    }

    #[test]
    fn globs_follow_fnmatch() {
        let m = |p: &str, s: &str| glob_matches(p.as_bytes(), s.as_bytes());
        assert!(m("*", "") && m("*", "abc") && m("a*c", "abbbc") && m("a*c*", "ac"));
        assert!(!m("a*c", "abcd") && !m("?", "") && m("??", "ab"));
        assert!(m("[abc]x", "bx") && !m("[!abc]x", "bx") && m("[a-c]", "b"));
        assert!(m("[]]", "]") && m("[", "[") && m("a[", "a[") && !m("[", "a"));
        assert!(m("*@h[0-9]", "w-1@h3") && !m("*@h[0-9]", "w-1@hx"));
    }

    #[test]
    fn junk_is_an_error() {
        let mut m = Message {
            body: b"[1]".to_vec(),
            ..Message::default()
        };
        assert!(ControlRequest::from_message(&m).is_err());
        m.body = b"{\"arguments\": {}}".to_vec();
        assert!(ControlRequest::from_message(&m).is_err());
        m.body = b"nope".to_vec();
        assert!(ControlRequest::from_message(&m).is_err());
    }
}
