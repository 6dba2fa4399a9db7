//! Opening AMQP connections (bounded by `connect_timeout`) and sorting lapin errors into ours. The
//! reconnect pacing is the crate's one [`crate::backoff::Backoff`].
//!
//! With several nodes (kombu's failover list `amqp://h1//;amqp://h2//`, a RabbitMQ cluster) a
//! connection is opened to the node that answered last, else to the next ones in turn (kombu's
//! round-robin), each within `connect_timeout`. Every role (publisher, consumer, broadcaster,
//! subscriptions) reconnects through here, so a lost node moves all of them to another.
//!
//! lapin's own auto-recovery is left off: the publisher and each consumer notice a dead connection
//! themselves and open a new one, so what happens on a reconnect (re-declare, re-consume, which
//! deliveries are lost) stays visible in this module tree.

use std::sync::atomic::Ordering;

use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::{Connection, ConnectionProperties, ErrorKind};

use super::config::AmqpConfig;
use crate::error::BrokerError;

/// A failed attempt to connect or to set up a channel, and whether trying again can help.
#[derive(Debug)]
pub(crate) struct Failure {
    pub error: BrokerError,
    /// Refused credentials, a missing vhost, a queue declared with other arguments: retrying the same
    /// thing will fail the same way.
    pub fatal: bool,
}

impl From<lapin::Error> for Failure {
    fn from(e: lapin::Error) -> Self {
        Failure {
            fatal: is_fatal(&e),
            error: lapin_err(e),
        }
    }
}

/// Opens a connection to the first node that answers, starting at the one that answered last.
/// `role` names it in RabbitMQ's connection list (`celerity-publisher`, …). A refusal that will be
/// refused again (credentials, vhost) ends the search; when no node answers, the error names each.
pub(crate) async fn connect(config: &AmqpConfig, role: &str) -> Result<Connection, Failure> {
    let count = config.nodes.len();
    let start = config.cursor.load(Ordering::Relaxed);
    let mut reasons = Vec::new();
    for step in 0..count {
        let index = (start + step) % count;
        match connect_node(config, index, role).await {
            Ok(conn) => {
                if step > 0 {
                    tracing::info!(role, node = %config.nodes[index].redacted, "amqp: connected to another node");
                }
                config.cursor.store(index, Ordering::Relaxed);
                return Ok(conn);
            }
            Err(f) if f.fatal || count == 1 => return Err(f),
            Err(f) => {
                tracing::warn!(role, error = %f.error, "amqp: node unavailable; trying the next");
                reasons.push(f.error.to_string());
            }
        }
    }
    Err(Failure {
        error: BrokerError::Connect {
            url: config.redacted.clone(),
            reason: format!("no node of the list answered: {}", reasons.join("; ")),
        },
        fatal: false,
    })
}

/// Opens a connection to node `index` of the list, within `connect_timeout`.
async fn connect_node(
    config: &AmqpConfig,
    index: usize,
    role: &str,
) -> Result<Connection, Failure> {
    let props =
        ConnectionProperties::default().with_connection_name(format!("celerity-{role}").into());
    let node = &config.nodes[index];
    let failed = |reason: String, fatal| Failure {
        error: BrokerError::Connect {
            url: node.redacted.clone(),
            reason,
        },
        fatal,
    };
    // A CA or client certificate that does not parse will not parse next time either.
    let tls = config.tls_config().map_err(|e| failed(e, true))?;
    let runtime = lapin::runtime::default_runtime().map_err(|e| failed(e.to_string(), true))?;
    let attempt = Connection::connect_uri_with_config(node.uri.clone(), props, tls, runtime);
    match tokio::time::timeout(config.connect_timeout, attempt).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(failed(e.to_string(), is_fatal(&e))),
        Err(_) => Err(failed(
            format!(
                "no AMQP handshake within {:?} (connect_timeout)",
                config.connect_timeout
            ),
            false,
        )),
    }
}

/// Maps a lapin error: a dead socket, connection or channel is [`BrokerError::ConnectionLost`] (worth a
/// reconnect and a retry); anything the broker refused is [`BrokerError::Transport`].
pub(crate) fn lapin_err(e: lapin::Error) -> BrokerError {
    let lost = match e.kind() {
        ErrorKind::IOError(_)
        | ErrorKind::InvalidConnectionState(_)
        | ErrorKind::InvalidChannelState(..)
        | ErrorKind::InvalidChannel(_)
        | ErrorKind::MissingHeartbeatError => true,
        ErrorKind::ProtocolError(p) => matches!(
            p.kind(),
            AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED)
        ),
        _ => false,
    };
    if lost {
        BrokerError::ConnectionLost(format!("amqp: {e}"))
    } else {
        BrokerError::from(e)
    }
}

/// True when the broker refused something that will be refused again.
pub(crate) fn is_fatal(e: &lapin::Error) -> bool {
    match e.kind() {
        ErrorKind::ProtocolError(p) => matches!(
            p.kind(),
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED | AMQPSoftError::PRECONDITIONFAILED)
                | AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED | AMQPHardError::NOTIMPLEMENTED)
        ),
        ErrorKind::InvalidProtocolVersion(_) | ErrorKind::AuthProviderError(_) => true,
        _ => false,
    }
}
