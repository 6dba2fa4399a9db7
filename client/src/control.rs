//! Remote control from the producer side, as Celery's `app.control` does it: broadcast a request on
//! the `celery.pidbox` fanout and, for inspect-style calls, collect the replies every node sends to
//! this caller's reply queue (`<oid>.reply.celery.pidbox`, bound to the direct exchange
//! `reply.celery.pidbox` with routing key `<oid>`) until the timeout, or until every named
//! destination has answered. Works with Celerity workers and Python Celery workers alike.
//!
//! Each call uses a fresh oid, so concurrent calls in one process never share a reply queue; replies
//! carrying another ticket (late answers to an earlier call) are skipped.

use std::time::Duration;

use serde_json::{Map, Value};

use celerity_broker::protocol::control::{
    reply_queue, ControlRequest, PIDBOX_EXCHANGE, REPLY_EXCHANGE,
};
use celerity_broker::protocol::event::timestamp;
use celerity_broker::protocol::node::new_task_id;
use celerity_broker::transport::Subscription;

use crate::client::{next_clock, Client};
use crate::error::Result;

/// One node's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// The node name, e.g. `celerity@host` or `celery@host`.
    pub node: String,
    /// What its handler returned (`{"ok": "pong"}`, a list of jobs, `{"error": …}`, …).
    pub value: Value,
}

/// Who should act, and how long to wait for answers.
#[derive(Debug, Clone)]
pub struct Target {
    /// Node names; empty means every node.
    pub destination: Vec<String>,
    /// How long to collect replies.
    pub timeout: Duration,
}

impl Default for Target {
    fn default() -> Self {
        Target {
            destination: Vec::new(),
            timeout: Duration::from_secs(1),
        }
    }
}

impl Client {
    /// Sends `method` with `arguments` to the nodes of `target` and returns their replies, in the
    /// order they came (Celery's `mailbox._broadcast(..., reply=True)`).
    pub async fn control_call(
        &self,
        method: &str,
        arguments: Map<String, Value>,
        target: &Target,
    ) -> Result<Vec<Reply>> {
        let oid = new_task_id();
        let ticket = new_task_id();
        let destination = (!target.destination.is_empty()).then(|| target.destination.clone());
        let limit = destination.as_ref().map(Vec::len);
        let request = ControlRequest::call(method, arguments, destination, ticket.clone(), &oid);
        // Bound before asking, so no reply can come before anyone listens.
        let mut replies = self
            .broker()
            .subscribe(REPLY_EXCHANGE, &oid, &reply_queue(&oid))
            .await?;
        let mut message = request.to_message(next_clock());
        message.headers.insert(
            "expires".into(),
            Value::from(timestamp() + target.timeout.as_secs_f64()),
        );
        self.broker()
            .broadcast(PIDBOX_EXCHANGE, "", &message)
            .await?;
        let collected = collect(&mut *replies, &ticket, limit, target.timeout).await;
        replies.close().await;
        collected
    }

    /// Sends `method` to the nodes of `destination` (empty: all) without waiting for replies
    /// (Celery's "cast").
    pub async fn control_cast(
        &self,
        method: &str,
        arguments: Map<String, Value>,
        destination: &[String],
    ) -> Result<()> {
        let mut request = ControlRequest::cast(method, arguments);
        request.destination = (!destination.is_empty()).then(|| destination.to_vec());
        self.broker()
            .broadcast(PIDBOX_EXCHANGE, "", &request.to_message(next_clock()))
            .await?;
        Ok(())
    }
}

/// Replies carrying `ticket` until `timeout`, or until `limit` nodes answered.
async fn collect(
    replies: &mut dyn Subscription,
    ticket: &str,
    limit: Option<usize>,
    timeout: Duration,
) -> Result<Vec<Reply>> {
    let mut out = Vec::new();
    // A timeout past what the clock can count is no deadline at all.
    let deadline = tokio::time::Instant::now().checked_add(timeout);
    while limit.is_none_or(|l| out.len() < l) {
        let next = match deadline {
            Some(d) => match tokio::time::timeout_at(d, replies.next()).await {
                Err(_) => break,
                Ok(r) => r?,
            },
            None => replies.next().await?,
        };
        let Some(m) = next else { break };
        if m.headers.get("ticket").and_then(Value::as_str) != Some(ticket) {
            continue;
        }
        match serde_json::from_slice::<Value>(&m.body) {
            Ok(Value::Object(body)) => {
                out.extend(body.into_iter().map(|(node, value)| Reply { node, value }))
            }
            _ => tracing::warn!("skipping a control reply that is not a JSON object"),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use celerity_broker::memory::MemoryBroker;
    use celerity_broker::transport::Broker;
    use celerity_broker::Message;
    use serde_json::json;

    /// A timeout no clock can count (`celerity inspect ping -t 1e19` panicked: "overflow when adding
    /// duration to instant") means waiting for as long as it takes.
    #[tokio::test]
    async fn a_timeout_past_what_the_clock_can_count_does_not_panic() {
        let broker = MemoryBroker::named(&new_task_id());
        let mut sub = broker
            .subscribe(REPLY_EXCHANGE, "oid", &reply_queue("oid"))
            .await
            .unwrap();
        let mut headers = Map::new();
        headers.insert("ticket".into(), json!("t"));
        let reply = Message::transient_json(headers, &json!({"n@h": {"ok": "pong"}}));
        broker
            .broadcast(REPLY_EXCHANGE, "oid", &reply)
            .await
            .unwrap();
        for timeout in [Duration::MAX, Duration::from_secs(u64::MAX / 2)] {
            let limit = if timeout == Duration::MAX { 1 } else { 0 };
            let got = collect(&mut *sub, "t", Some(limit), timeout).await.unwrap();
            assert_eq!(got.len(), limit);
        }
    }
}
