//! A transport-neutral message: the AMQP-style properties, the application headers and the body bytes.
//!
//! Transports move [`Message`]s; they never look inside the body. The Celery task layer
//! ([`crate::protocol`]) turns a task call into a [`Message`] and back.

use serde_json::{Map, Value};

/// MIME type of Celery's JSON serializer, the only one we accept.
pub const CONTENT_TYPE_JSON: &str = "application/json";
/// Encoding that goes with [`CONTENT_TYPE_JSON`].
pub const CONTENT_ENCODING_UTF8: &str = "utf-8";
/// `delivery_mode` of a persistent message (tasks).
pub const PERSISTENT: u8 = 2;
/// `delivery_mode` of a transient message (events, control).
pub const TRANSIENT: u8 = 1;

/// The publish properties Celery sets (AMQP basic properties; on Redis the envelope's `properties`).
#[derive(Debug, Clone, PartialEq)]
pub struct Properties {
    pub content_type: String,
    pub content_encoding: String,
    /// The task id, for task messages.
    pub correlation_id: Option<String>,
    /// The sender's oid (rpc result queue name); Celery always sets it, possibly to "".
    pub reply_to: Option<String>,
    /// 1 = transient, 2 = persistent.
    pub delivery_mode: u8,
    /// 0..=255 on AMQP; Redis clamps to 0..=9 and serves 0 first.
    pub priority: u8,
    /// Milliseconds left before the broker may drop the message (a decimal string, as Celery sends it).
    pub expiration: Option<String>,
}

impl Default for Properties {
    fn default() -> Self {
        Properties {
            content_type: CONTENT_TYPE_JSON.to_owned(),
            content_encoding: CONTENT_ENCODING_UTF8.to_owned(),
            correlation_id: None,
            reply_to: None,
            delivery_mode: PERSISTENT,
            priority: 0,
            expiration: None,
        }
    }
}

/// One message as it travels through a broker.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Message {
    pub properties: Properties,
    /// Application headers. For a protocol v2 task these hold `task`, `id`, `eta`, … (see [`crate::protocol`]).
    pub headers: Map<String, Value>,
    /// The serialized body, exactly as published (JSON text for tasks).
    pub body: Vec<u8>,
}

impl Message {
    /// A transient message (remote control, events) with a JSON body encoded as Python's `json`
    /// encodes it.
    pub fn transient_json(headers: Map<String, Value>, body: &Value) -> Message {
        Message {
            properties: Properties {
                delivery_mode: TRANSIENT,
                ..Properties::default()
            },
            headers,
            body: crate::pyjson::to_vec(body),
        }
    }

    /// The `task` header as a string, if there is one (cheap look without a full decode).
    pub fn task_name(&self) -> Option<&str> {
        self.headers.get("task").and_then(Value::as_str)
    }

    /// The `id` header, falling back to `correlation_id`.
    pub fn task_id(&self) -> Option<&str> {
        self.headers
            .get("id")
            .and_then(Value::as_str)
            .or(self.properties.correlation_id.as_deref())
    }
}
