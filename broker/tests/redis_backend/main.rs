//! The Redis result backend against a real Redis at 127.0.0.1:6379, one module per behaviour:
//! storing and reading in Celery's key layout (`store`), waiting by pub/sub and the poll fallback
//! (`waiting`), documents shared with real Celery (`celery_compat`), and connecting (`connect`).
//! Each test uses its own `global_keyprefix` and deletes its keys.

#![cfg(feature = "redis")]

use celerity_testsupport::{delete_redis_prefix, PrivateRedis, REDIS};

use std::sync::Arc;
use std::time::Duration;

use celerity_broker::backend::redis::RedisBackend;
use celerity_broker::backend::ExceptionInfo;
use celerity_broker::{BrokerError, BrokerUrl, ResultBackend, State, TaskMeta};
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use serde_json::json;

/// A bound so a broken test fails instead of hanging; never what a test measures.
const LONG: Duration = Duration::from_secs(20);
/// A poll interval longer than [`LONG`]: a wait under that bound can only end by a notification
/// (or by the read it does right after subscribing), never by the poll.
const NO_POLL: &str = "&poll_interval=60";

/// `wait` without a deadline of its own, bounded by [`LONG`] from outside: with [`NO_POLL`], an
/// error here means the notification never came.
async fn wait_notified(b: &RedisBackend, tid: &str) -> TaskMeta {
    tokio::time::timeout(LONG, b.wait(tid, None))
        .await
        .expect("no notification reached the waiter")
        .unwrap()
}

/// A fresh key prefix (as given in the URL, and as it appears in keys).
fn prefix() -> String {
    format!("celerity-backend-test-{}:", uuid::Uuid::new_v4().simple())
}

async fn backend(prefix: &str, options: &str) -> RedisBackend {
    let url = format!("{REDIS}?global_keyprefix={prefix}{options}");
    RedisBackend::connect(&BrokerUrl::parse(&url).unwrap())
        .await
        .unwrap()
}

async fn raw() -> redis::aio::MultiplexedConnection {
    redis::Client::open(REDIS)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

fn key(prefix: &str, id: &str) -> String {
    format!("{prefix}celery-task-meta-{id}")
}

fn id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A date with microsecond precision, so it survives the ISO round trip exactly.
fn done() -> Option<DateTime<Utc>> {
    Some(
        DateTime::parse_from_rfc3339("2024-05-01T12:00:05.412345+00:00")
            .unwrap()
            .with_timezone(&Utc),
    )
}

fn success(id: &str, result: serde_json::Value) -> TaskMeta {
    TaskMeta {
        date_done: done(),
        ..TaskMeta::success(id, result)
    }
}

/// Deletes every key under the prefix.
async fn cleanup(prefix: &str) {
    delete_redis_prefix(prefix).await;
}

async fn numsub(conn: &mut redis::aio::MultiplexedConnection, channel: &str) -> i64 {
    let (_, n): (String, i64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(channel)
        .query_async(conn)
        .await
        .unwrap();
    n
}

/// Waits (bounded) until no connection is subscribed to `channel`; returns the last count seen.
async fn subscribers_settle(channel: &str) -> i64 {
    let mut conn = raw().await;
    let mut n = numsub(&mut conn, channel).await;
    for _ in 0..200 {
        if n == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        n = numsub(&mut conn, channel).await;
    }
    n
}

mod celery_compat;
mod connect;
mod store;
mod waiting;
