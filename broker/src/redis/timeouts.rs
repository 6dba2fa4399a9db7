//! How long a Redis connection attempt and a Redis command may take: a leaf, so the sentinel
//! lookup, the redialing connection and the transport's shared parts all read the same bounds
//! without importing each other.

use std::time::Duration;

/// How long a connection attempt may take.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a command may take (generous: a big pipeline or sweep is one command to wait on).
pub(crate) const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
