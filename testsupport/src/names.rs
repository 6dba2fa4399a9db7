//! Where the local brokers are and how a test names what it makes on them.

/// The local Redis, database 0.
pub const REDIS: &str = "redis://127.0.0.1:6379/0";
/// Our spelling of the local RabbitMQ (vhost `/` percent-encoded).
pub const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// kombu's spelling of the same.
pub const PY_AMQP: &str = "amqp://guest:guest@127.0.0.1:5672//";

/// `<tag>-<uuid>`: a queue name or key prefix no other test (or run) uses.
pub fn unique(tag: &str) -> String {
    format!("{tag}-{}", uuid::Uuid::new_v4().simple())
}

/// The broker a test runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Redis,
    Amqp,
}
