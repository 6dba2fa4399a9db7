//! The PostgreSQL result backend against the local PostgreSQL (127.0.0.1:5432), one module per
//! behaviour: storing, reading and waiting (`store`), the tables and bytes shared with real Celery
//! 5.7 and SQLAlchemy (`celery_compat`), and what goes wrong (`errors`). Each test works in a
//! schema of its own ([`PgSchema`]), dropped afterwards also when the test fails.

#![cfg(feature = "postgres")]

mod celery_compat;
mod errors;
mod store;

use std::time::Duration;

use celerity_broker::backend::postgres::PostgresBackend;
use celerity_broker::{BrokerUrl, ResultBackend, TaskMeta};
use celerity_testsupport::PgSchema;

/// A bound so a broken test fails instead of hanging; never what a test measures.
const LONG: Duration = Duration::from_secs(20);

async fn backend(url: &str) -> PostgresBackend {
    PostgresBackend::connect(&BrokerUrl::parse(url).unwrap())
        .await
        .unwrap()
}

/// A backend on a fresh schema: the schema guard first, so it outlives the backend.
async fn fresh(tag: &str, options: &str) -> (PgSchema, PostgresBackend) {
    let schema = PgSchema::new(tag);
    let b = backend(&schema.url(options)).await;
    (schema, b)
}

fn id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// `wait` bounded from outside by [`LONG`].
async fn wait_bounded(b: &PostgresBackend, tid: &str) -> TaskMeta {
    tokio::time::timeout(LONG, b.wait(tid, None))
        .await
        .expect("the waiter was never woken")
        .unwrap()
}
