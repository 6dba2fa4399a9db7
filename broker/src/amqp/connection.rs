//! Opening AMQP connections (bounded by `connect_timeout`) and sorting lapin errors into ours. The
//! reconnect pacing is the crate's one [`crate::backoff::Backoff`].
//!
//! lapin's own auto-recovery is left off: the publisher and each consumer notice a dead connection
//! themselves and open a new one, so what happens on a reconnect (re-declare, re-consume, which
//! deliveries are lost) stays visible in this module tree.

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

/// Opens a connection. `role` names it in RabbitMQ's connection list (`celerity-publisher`, …).
pub(crate) async fn connect(config: &AmqpConfig, role: &str) -> Result<Connection, Failure> {
    let props =
        ConnectionProperties::default().with_connection_name(format!("celerity-{role}").into());
    let failed = |reason: String, fatal| Failure {
        error: BrokerError::Connect {
            url: config.redacted.clone(),
            reason,
        },
        fatal,
    };
    // A CA or client certificate that does not parse will not parse next time either.
    let tls = config.tls_config().map_err(|e| failed(e, true))?;
    let runtime = lapin::runtime::default_runtime().map_err(|e| failed(e.to_string(), true))?;
    let attempt = Connection::connect_uri_with_config(config.uri.clone(), props, tls, runtime);
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
