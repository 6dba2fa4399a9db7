//! Remote-control requests, as Celery's pidbox mailbox sends them: a JSON body
//! `{"method", "arguments", "destination", "pattern", "matcher"}` (plus `ticket` and `reply_to` when a
//! reply is wanted) broadcast on the `celery.pidbox` fanout exchange, with headers
//! `{"clock", "expires"}`. Python's `app.control.revoke(...)` and ours are the same message.

use serde_json::{Map, Value};

use super::fields::kind;
use crate::error::{BrokerError, Result};
use crate::message::{Message, Properties, TRANSIENT};
use crate::pyjson;

/// The fanout exchange of Celery's remote control.
pub const PIDBOX_EXCHANGE: &str = "celery.pidbox";

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
    /// Node names that should act; `None` means every node.
    pub destination: Option<Vec<String>>,
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
            ticket: None,
            reply_to: None,
        }
    }

    /// True if the node called `node` should act on it.
    pub fn is_for(&self, node: &str) -> bool {
        self.destination
            .as_ref()
            .is_none_or(|d| d.iter().any(|n| n == node))
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
        body.insert("pattern".into(), Value::Null);
        body.insert("matcher".into(), Value::Null);
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
        Message {
            properties: Properties {
                delivery_mode: TRANSIENT,
                ..Properties::default()
            },
            headers,
            body: pyjson::to_vec(&Value::Object(body)),
        }
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
        let ticket = o
            .remove("ticket")
            .and_then(|v| v.as_str().map(str::to_owned));
        let reply_to = o.remove("reply_to").filter(|v| !v.is_null());
        Ok(ControlRequest {
            method,
            arguments,
            destination,
            ticket,
            reply_to,
        })
    }
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
        assert_eq!(m.properties.delivery_mode, TRANSIENT);
        assert_eq!(ControlRequest::from_message(&m).unwrap(), r);
        assert!(r.is_for("celerity@a"));
        let only_b = ControlRequest {
            destination: Some(vec!["celerity@b".into()]),
            ..r
        };
        assert!(!only_b.is_for("celerity@a") && only_b.is_for("celerity@b"));
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
