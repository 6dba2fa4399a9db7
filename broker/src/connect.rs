//! From a URL to a connected transport or result backend: the one place that knows every
//! transport and backend, so none of them has to know the others (or import this back).
//!
//! [`connect_broker`] opens `memory://`, `redis://`/`rediss://` or `amqp://`/`amqps://` (a scheme whose
//! crate feature is off is [`BrokerError::NotCompiled`]); [`connect_backend`] opens `memory://`,
//! `redis://`, `db+postgresql://` (also `postgresql://`, `postgres://`) or `rpc://host…`, and
//! [`connect_backend_for`] also a bare `rpc://`, which uses the broker's RabbitMQ. Parsing the URL
//! itself is [`crate::url`]'s. A failover list (`url1;url2`) is taken by the AMQP transport only;
//! elsewhere it is an error rather than a silent use of its first URL.

use std::sync::Arc;

use crate::backend::ResultBackend;
use crate::error::{BrokerError, Result};
use crate::transport::Broker;
use crate::url::{BrokerUrl, Scheme};

/// Connects to the broker a URL names.
pub async fn connect_broker(raw: &str) -> Result<Arc<dyn Broker>> {
    let url = BrokerUrl::parse(raw)?;
    if url.scheme != Scheme::Amqp {
        url.reject_list()?;
    }
    match url.scheme {
        Scheme::Memory => Ok(Arc::new(crate::memory::MemoryBroker::from_url(&url)?)),
        #[cfg(feature = "redis")]
        Scheme::Redis if url.is_cluster() => Ok(Arc::new(
            crate::redis::RedisClusterBroker::connect(&url).await?,
        )),
        #[cfg(feature = "redis")]
        Scheme::Redis => Ok(Arc::new(crate::redis::RedisBroker::connect(&url).await?)),
        #[cfg(not(feature = "redis"))]
        Scheme::Redis => Err(BrokerError::NotCompiled("redis")),
        #[cfg(feature = "amqp")]
        Scheme::Amqp => Ok(Arc::new(crate::amqp::AmqpBroker::connect(&url).await?)),
        #[cfg(not(feature = "amqp"))]
        Scheme::Amqp => Err(BrokerError::NotCompiled("amqp")),
        Scheme::Postgres => Err(BrokerError::InvalidUrl {
            url: url.redacted(),
            reason: "PostgreSQL is a result backend here, not a broker: give it as the backend \
                     (--backend) and use redis:// or amqp:// as the broker"
                .into(),
        }),
    }
}

/// Connects to the result backend a URL names (`memory://`, `redis://`, `db+postgresql://`, or
/// `rpc://` naming a RabbitMQ host). A bare `rpc://` needs the broker's URL: use
/// [`connect_backend_for`].
pub async fn connect_backend(raw: &str) -> Result<Arc<dyn ResultBackend>> {
    connect_backend_for(raw, None).await
}

/// Connects to the result backend a URL names, for an application whose broker is `broker`: a
/// bare `rpc://` then sends results over that RabbitMQ (as Celery's rpc backend uses the broker).
pub async fn connect_backend_for(
    raw: &str,
    broker: Option<&str>,
) -> Result<Arc<dyn ResultBackend>> {
    #[cfg(feature = "amqp")]
    if crate::backend::rpc::is_rpc_url(raw) {
        let config = crate::backend::rpc::RpcConfig::from_urls(raw, broker)?;
        return Ok(Arc::new(
            crate::backend::rpc::RpcBackend::connect(&config).await?,
        ));
    }
    #[cfg(not(feature = "amqp"))]
    let _ = broker;
    let url = BrokerUrl::parse(raw)?;
    url.reject_list()?;
    match url.scheme {
        Scheme::Memory => Ok(Arc::new(crate::backend::memory::MemoryBackend::from_url(
            &url,
        )?)),
        #[cfg(feature = "redis")]
        Scheme::Redis => Ok(Arc::new(
            crate::backend::redis::RedisBackend::connect(&url).await?,
        )),
        #[cfg(not(feature = "redis"))]
        Scheme::Redis => Err(BrokerError::NotCompiled("redis")),
        Scheme::Amqp => Err(BrokerError::InvalidUrl {
            url: url.redacted(),
            reason: "AMQP is not a result backend; use rpc:// (results as messages, as Celery), \
                     redis://, db+postgresql:// or memory://"
                .into(),
        }),
        #[cfg(feature = "postgres")]
        Scheme::Postgres => Ok(Arc::new(
            crate::backend::postgres::PostgresBackend::connect(&url).await?,
        )),
        #[cfg(not(feature = "postgres"))]
        Scheme::Postgres => Err(BrokerError::NotCompiled("postgres")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::url::tests::HOSTILE_PASSWORDS;

    /// Connecting with a password that does not parse, decode or authenticate fails with an error
    /// that never quotes it (the local Redis has no password and refuses one without a user name;
    /// RabbitMQ refuses the user). Nothing is created on either server.
    #[tokio::test]
    async fn connect_errors_never_show_the_password() {
        for pw in HOSTILE_PASSWORDS {
            let redis = format!("redis://:{pw}@127.0.0.1:6379/0");
            let amqp =
                format!("amqp://celerity-no-such-user:{pw}@127.0.0.1:5672//?connect_timeout=5");
            let errors = [
                connect_broker(&redis).await.err().map(|e| e.to_string()),
                connect_backend(&redis).await.err().map(|e| e.to_string()),
                connect_broker(&amqp).await.err().map(|e| e.to_string()),
            ];
            for (url, e) in [&redis, &redis, &amqp].into_iter().zip(errors) {
                let e = e.unwrap_or_else(|| panic!("{url:?} connected"));
                assert!(!e.contains("Zq9x"), "{url:?}: {e}");
            }
        }
    }
}
