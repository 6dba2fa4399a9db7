//! [`Message`] ↔ AMQP basic properties and body.
//!
//! Publishing sets what Celery sets: content type and encoding, correlation id, reply-to, delivery mode,
//! priority, expiration (only when given) and the application headers. Reading a property that is
//! absent gives an empty string (content type/encoding), `None`, delivery mode 1 (AMQP's default,
//! transient) or priority 0.

use lapin::BasicProperties;

use crate::error::Result;
use crate::message::{Message, Properties, TRANSIENT};

use super::table::{from_table, short_string, to_table};

/// The AMQP properties for publishing `message`.
pub(crate) fn to_properties(message: &Message) -> Result<BasicProperties> {
    let p = &message.properties;
    let mut props = BasicProperties::default()
        .with_content_type(short_string(&p.content_type, "content_type")?)
        .with_content_encoding(short_string(&p.content_encoding, "content_encoding")?)
        .with_delivery_mode(p.delivery_mode)
        .with_priority(p.priority)
        .with_headers(to_table(&message.headers)?);
    if let Some(id) = &p.correlation_id {
        props = props.with_correlation_id(short_string(id, "correlation_id")?);
    }
    if let Some(reply_to) = &p.reply_to {
        props = props.with_reply_to(short_string(reply_to, "reply_to")?);
    }
    if let Some(expiration) = &p.expiration {
        props = props.with_expiration(short_string(expiration, "expiration")?);
    }
    Ok(props)
}

/// Rebuilds the message a consumer received.
pub(crate) fn to_message(props: &BasicProperties, body: Vec<u8>) -> Message {
    let text = |s: &Option<lapin::types::ShortString>| s.as_ref().map(|s| s.as_str().to_owned());
    Message {
        properties: Properties {
            content_type: text(props.content_type()).unwrap_or_default(),
            content_encoding: text(props.content_encoding()).unwrap_or_default(),
            correlation_id: text(props.correlation_id()),
            reply_to: text(props.reply_to()),
            delivery_mode: props.delivery_mode().unwrap_or(TRANSIENT),
            priority: props.priority().unwrap_or(0),
            expiration: text(props.expiration()),
        },
        headers: props.headers().as_ref().map(from_table).unwrap_or_default(),
        body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn properties_round_trip() {
        let mut m = Message::default();
        m.properties.correlation_id = Some("id-1".into());
        m.properties.reply_to = Some(String::new());
        m.properties.priority = 7;
        m.properties.expiration = Some("1500".into());
        m.headers = json!({"task": "t", "id": "id-1"})
            .as_object()
            .unwrap()
            .clone();
        m.body = b"[[], {}, {}]".to_vec();
        let props = to_properties(&m).unwrap();
        assert_eq!(to_message(&props, m.body.clone()), m);
    }

    #[test]
    fn absent_properties_have_defaults() {
        let m = to_message(&BasicProperties::default(), vec![1]);
        assert_eq!(m.properties.content_type, "");
        assert_eq!(m.properties.delivery_mode, TRANSIENT);
        assert_eq!(m.properties.correlation_id, None);
        assert!(m.headers.is_empty());
    }
}
