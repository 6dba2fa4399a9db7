//! What the Redis broker, its consumers, ack handles and subscribers share ([`Shared`]), and how
//! connections to a Redis broker are opened ([`connect_manager`], bounded in time, `redis+socket://`
//! spelled as the redis crate wants it), and sending a command once more when it met a dropped
//! connection ([`once_more_if_dropped`]). A leaf under the rest of the transport, so the transport's
//! parts import it rather than `redis/mod.rs`.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio_util::sync::CancellationToken;

use super::keys::Keys;
use super::redial::Redial;
use super::sentinel::Dialer;
use crate::error::{BrokerError, Result};
use crate::limits::Limits;
use crate::url::BrokerUrl;

pub(crate) use super::timeouts::{CONNECT_TIMEOUT, RESPONSE_TIMEOUT};
/// Pause before a command is sent once more after it met a dropped connection.
const DROPPED_RETRY_DELAY: Duration = Duration::from_millis(100);
/// What the broker, its consumers and their ack handles share.
pub(crate) struct Shared {
    /// Auto-reconnecting multiplexed connection for every non-blocking command.
    pub(crate) conn: Redial,
    /// For the dedicated connections of blocking waits (through the sentinels on `sentinel://`).
    pub(crate) client: Dialer,
    pub(crate) keys: Keys,
    /// Seconds after which an unacked delivery is restored.
    pub(crate) visibility_timeout: f64,
    pub(crate) restore_interval: Duration,
    /// Cancelled by [`crate::transport::Broker::close`]; consumers hold child tokens.
    pub(crate) closed: CancellationToken,
    /// Queues whose binding was already stored (declaring is cached).
    pub(crate) declared: Mutex<HashSet<String>>,
    /// The URL's `max_message_size` and `max_dead_letters`.
    pub(crate) limits: Limits,
}

/// The URL for the redis crate: no query string, and kombu's `redis+socket://` spelled `redis+unix://`.
pub(crate) fn client_url(url: &BrokerUrl) -> String {
    let base = url.base.as_str();
    match base.strip_prefix("redis+socket:") {
        Some(rest) => format!("redis+unix:{rest}"),
        None => base.to_owned(),
    }
}

/// Opens a reconnecting connection ([`Redial`]) to the Redis that `url` names, bounded in time, as
/// the broker opens its own: for the other state kept on that Redis (shared rate limits, beat's lease).
pub async fn connect_manager(url: &BrokerUrl) -> Result<Redial> {
    let connect_error = |reason: String| BrokerError::Connect {
        url: url.redacted(),
        reason,
    };
    let client = Dialer::open(url, &client_url(url))?;
    first_connection(client, url.tls)
        .await
        .map_err(connect_error)
}

/// Opens the shared connection, bounded in time. TLS setup runs in its own task: rustls panics when no
/// crypto provider is compiled in, and that must be an error here, not a crash.
pub(crate) async fn first_connection(
    dialer: Dialer,
    tls: bool,
) -> std::result::Result<Redial, String> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_secs(5));
    let limit = CONNECT_TIMEOUT + Duration::from_secs(1);
    // On `sentinel://` the sentinels name the server first (bounded by their own timeout).
    let client = dialer.client().await.map_err(|e| e.to_string())?;
    let attempt = tokio::time::timeout(
        limit,
        ConnectionManager::new_with_config(client.clone(), config.clone()),
    );
    let outcome = if tls {
        match tokio::spawn(attempt).await {
            Ok(r) => r,
            Err(e) if e.is_panic() => {
                return Err("TLS setup failed (is a rustls crypto provider compiled in?)".into())
            }
            Err(e) => return Err(e.to_string()),
        }
    } else {
        attempt.await
    };
    match outcome {
        Err(_) => Err(format!("no answer within {limit:?}")),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(conn)) => Ok(Redial::new(dialer, &client, config, conn)),
    }
}

/// Sends a command (`send` builds and sends it) once more if it failed on a connection found dropped
/// (reset, closed, broken pipe, refused): after a broker restart or a network reset the first
/// command over the shared connection meets the dead one, and the manager has dialed again by the
/// second. A command that timed out is not sent again. The command must be safe to repeat in the
/// rare case that the server ran it and only the reply was lost.
pub(crate) async fn once_more_if_dropped<T, F, Fut>(
    what: &str,
    mut send: F,
) -> redis::RedisResult<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = redis::RedisResult<T>>,
{
    match send().await {
        Err(e) if e.is_connection_dropped() => {
            tracing::warn!(error = %e, "redis: {what} met a dropped connection; sending it once more");
            tokio::time::sleep(DROPPED_RETRY_DELAY).await;
            send().await
        }
        out => out,
    }
}
