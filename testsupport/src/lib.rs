//! The harness the workspace's integration suites share (a dev-dependency only, never published):
//!
//! - [`names`]: where the local Redis and RabbitMQ are, each test's unique names, [`Transport`];
//! - [`cleanup`]: deleting what a test left on the brokers, also from `Drop` when it panics;
//! - [`faults`]: fault injection around the real services ([`OutageBackend`]);
//! - [`netcut`]: a TCP proxy a test cuts (black hole or reset) between one client and a server;
//! - [`postgres`]: a PostgreSQL schema (and roles) of the test's own on the local server;
//! - [`process`]: child processes killed and reaped on drop, the `celerity` binary's command line;
//! - [`rabbit`]: a RabbitMQ node of the test's own, with settings the shared one must not get, that a
//!   test can crash and restart;
//! - [`sentinel`]: a Redis Sentinel set (master, two replicas, three sentinels) of the test's own;
//! - [`rabbit_cluster`]: a three-node RabbitMQ cluster of the test's own, on ports it chooses, one
//!   node of which it can kill;
//! - [`tls`]: a throwaway test CA (`openssl`) and a TLS-only `redis-server` of the test's own;
//! - `worker` (feature `worker`): our worker running in the test's own process.
//!
//! The broker-level helpers that need no other crate stay in `celerity_broker::testkit` (the bench
//! binary uses `celery_python` at run time) and are re-exported here, so a suite imports one place.

pub mod cleanup;
pub mod faults;
pub mod names;
pub mod netcut;
pub mod postgres;
pub mod process;
pub mod rabbit;
pub mod rabbit_cluster;
pub mod sentinel;
pub mod tls;
#[cfg(feature = "worker")]
pub mod worker;

pub use celerity_broker::testkit::{
    celery_python, delete_amqp_queue, delete_redis_prefix, PrivateRedis, TcpProxy,
};
pub use cleanup::{delete_amqp_exchange, Cleanup};
pub use faults::OutageBackend;
pub use names::{unique, Transport, AMQP, PY_AMQP, REDIS};
pub use netcut::{Cut, CutProxy};
pub use postgres::{PgSchema, POSTGRES, PY_POSTGRES};
pub use process::{celerity_command, text, ChildGuard};
pub use rabbit::PrivateRabbit;
pub use sentinel::SentinelSet;
pub use tls::{TestPki, TlsRedis};
#[cfg(feature = "worker")]
pub use worker::{demo_registry, InProcessWorker};
