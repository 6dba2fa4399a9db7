//! The Redis result backend against a real Redis at 127.0.0.1:6379: Celery's key layout, the
//! SUCCESS guard, expiry, PUBLISH on store, waiting (pub/sub and the poll fallback), batches, and
//! documents written by real Celery. Each test uses its own `global_keyprefix` and deletes its keys.

#![cfg(feature = "redis")]

mod support;

use celerity_broker::testkit::PrivateRedis;

use std::sync::Arc;
use std::time::Duration;

use celerity_broker::backend::redis::RedisBackend;
use celerity_broker::backend::ExceptionInfo;
use celerity_broker::{BrokerError, BrokerUrl, ResultBackend, State, TaskMeta};
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use serde_json::json;

const REDIS: &str = "redis://127.0.0.1:6379/0";
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
    let mut conn = raw().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    if !keys.is_empty() {
        redis::cmd("DEL")
            .arg(&keys)
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
    }
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

#[tokio::test]
async fn store_then_get_round_trips_in_celery_layout() {
    let p = prefix();
    let b = backend(&p, "").await;
    let tid = id();
    let mut meta = success(
        &tid,
        json!({"sum": 4, "name": "två", "items": [1, null, 2.5]}),
    );
    meta.children = json!([[["child-1", null], null]]);
    meta.extra.insert("parent_id".into(), json!("parent-1"));
    meta.extra.insert("name".into(), json!("tasks.add"));
    b.store(&meta).await.unwrap();

    assert_eq!(b.get(&tid).await.unwrap(), meta);
    let stored: Vec<u8> = redis::cmd("GET")
        .arg(key(&p, &tid))
        .query_async(&mut raw().await)
        .await
        .unwrap();
    assert_eq!(stored, meta.to_json(), "the key holds Celery's exact bytes");

    b.forget(&tid).await.unwrap();
    assert_eq!(b.get(&tid).await.unwrap().status, State::Pending);
    cleanup(&p).await;
}

#[tokio::test]
async fn missing_result_is_pending() {
    let p = prefix();
    let b = backend(&p, "").await;
    let tid = id();
    let meta = b.get(&tid).await.unwrap();
    assert_eq!(meta, TaskMeta::pending(&tid));
    assert_eq!(meta.result, serde_json::Value::Null);
    cleanup(&p).await;
}

#[tokio::test]
async fn success_is_never_overwritten_but_progress_is_kept() {
    let p = prefix();
    let b = backend(&p, "").await;

    let progressing = id();
    b.store(&TaskMeta::with_state(
        &progressing,
        State::Started,
        json!({"pid": 1}),
    ))
    .await
    .unwrap();
    assert_eq!(b.get(&progressing).await.unwrap().status, State::Started);
    b.store(&success(&progressing, json!(7))).await.unwrap();
    let got = b.get(&progressing).await.unwrap();
    assert_eq!((got.status, got.result), (State::Success, json!(7)));

    let exc = ExceptionInfo::new("ValueError", "late duplicate", "builtins");
    b.store(&TaskMeta::failure(&progressing, &exc, None))
        .await
        .unwrap();
    b.store_many(&[TaskMeta::with_state(
        &progressing,
        State::Started,
        json!(null),
    )])
    .await
    .unwrap();
    let got = b.get(&progressing).await.unwrap();
    assert_eq!(
        (got.status, got.result),
        (State::Success, json!(7)),
        "later writes after SUCCESS are dropped"
    );
    cleanup(&p).await;
}

#[tokio::test]
async fn stored_results_expire_as_configured() {
    let p = prefix();
    let mut conn = raw().await;

    let b = backend(&p, "&result_expires=120").await;
    let tid = id();
    b.store(&success(&tid, json!(1))).await.unwrap();
    let ttl: i64 = redis::cmd("TTL")
        .arg(key(&p, &tid))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 0 && ttl <= 120, "ttl {ttl}");

    let default = backend(&p, "").await;
    let tid = id();
    default
        .store_many(&[success(&tid, json!(1))])
        .await
        .unwrap();
    let ttl: i64 = redis::cmd("TTL")
        .arg(key(&p, &tid))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 86_000 && ttl <= 86_400, "ttl {ttl}");

    let forever = backend(&p, "&result_expires=0").await;
    let tid = id();
    forever.store(&success(&tid, json!(1))).await.unwrap();
    let ttl: i64 = redis::cmd("TTL")
        .arg(key(&p, &tid))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(ttl, -1, "result_expires=0 stores without expiry");
    cleanup(&p).await;
}

#[tokio::test]
async fn store_publishes_the_document_on_the_key_channel() {
    let p = prefix();
    let b = backend(&p, "").await;
    let tid = id();
    let mut pubsub = redis::Client::open(REDIS)
        .unwrap()
        .get_async_pubsub()
        .await
        .unwrap();
    pubsub.subscribe(key(&p, &tid)).await.unwrap();

    let meta = success(&tid, json!([1, 2, 3]));
    b.store(&meta).await.unwrap();
    let msg = tokio::time::timeout(LONG, pubsub.on_message().next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(msg.get_channel_name(), key(&p, &tid));
    assert_eq!(msg.get_payload_bytes(), meta.to_json().as_slice());

    // A dropped write (after SUCCESS) publishes nothing; the next message is the other task's.
    let other = id();
    pubsub.subscribe(key(&p, &other)).await.unwrap();
    b.store(&TaskMeta::with_state(&tid, State::Started, json!(null)))
        .await
        .unwrap();
    b.store(&success(&other, json!(2))).await.unwrap();
    let msg = tokio::time::timeout(LONG, pubsub.on_message().next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(msg.get_channel_name(), key(&p, &other));
    cleanup(&p).await;
}

#[tokio::test]
async fn wait_returns_when_the_result_is_stored_later() {
    let p = prefix();
    // A poll far longer than the wait: only the notification can resolve it.
    let b = Arc::new(backend(&p, NO_POLL).await);
    let tid = id();
    let writer = {
        let b = b.clone();
        let tid = tid.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            b.store(&TaskMeta::with_state(&tid, State::Started, json!(null)))
                .await
                .unwrap();
            b.store(&success(&tid, json!("done"))).await.unwrap();
        })
    };
    let got = wait_notified(&b, &tid).await;
    assert_eq!((got.status, got.result), (State::Success, json!("done")));
    writer.await.unwrap();
    assert_eq!(subscribers_settle(&key(&p, &tid)).await, 0);
    cleanup(&p).await;
}

#[tokio::test]
async fn wait_on_a_stored_result_returns_it() {
    let p = prefix();
    let b = backend(&p, NO_POLL).await;
    let tid = id();
    let exc = ExceptionInfo::new("KeyError", "x", "builtins");
    b.store(&TaskMeta::failure(&tid, &exc, Some("Traceback...".into())))
        .await
        .unwrap();
    let got = wait_notified(&b, &tid).await;
    assert_eq!(got.status, State::Failure);
    assert_eq!(got.exception(), Some(exc));
    cleanup(&p).await;
}

#[tokio::test]
async fn wait_times_out_and_leaves_no_subscription() {
    let p = prefix();
    let b = backend(&p, "&poll_interval=0.05").await;
    let tid = id();
    b.store(&TaskMeta::with_state(&tid, State::Started, json!(null)))
        .await
        .unwrap();
    let err = b
        .wait(&tid, Some(Duration::from_millis(300)))
        .await
        .unwrap_err();
    assert!(matches!(err, BrokerError::Timeout(_)), "{err:?}");
    assert_eq!(subscribers_settle(&key(&p, &tid)).await, 0);

    // A waiter whose future is dropped unsubscribes too.
    let dropped = id();
    let outer = tokio::time::timeout(Duration::from_millis(300), b.wait(&dropped, None)).await;
    assert!(outer.is_err(), "nothing was stored, the wait cannot finish");
    assert_eq!(subscribers_settle(&key(&p, &dropped)).await, 0);
    cleanup(&p).await;
}

#[tokio::test]
async fn a_channel_left_and_joined_at_once_stays_subscribed() {
    // The listener sends the UNSUBSCRIBE of the waiter that leaves and the SUBSCRIBE of the one
    // that joins in one go, without waiting between them: the server must still see them in order.
    let p = prefix();
    let b = backend(&p, NO_POLL).await;
    let mut admin = raw().await;
    let tid = id();
    let channel = key(&p, &tid);
    let mut leaving = Box::pin(b.wait(&tid, None));
    tokio::select! {
        r = &mut leaving => panic!("nothing was stored, the wait cannot finish: {r:?}"),
        n = subscribers_reach(&mut admin, &channel, 1) => assert_eq!(n, 1),
    }
    // Leave and join with no await in between, so both commands reach the listener together.
    drop(leaving);
    let mut joining = Box::pin(tokio::time::timeout(LONG, b.wait(&tid, None)));
    tokio::select! {
        r = &mut joining => panic!("nothing was stored, the wait cannot finish: {r:?}"),
        () = tokio::time::sleep(Duration::from_millis(300)) => {}
    }
    assert_eq!(
        numsub(&mut admin, &channel).await,
        1,
        "the channel was left"
    );
    let writer = backend(&p, "").await;
    writer.store(&success(&tid, json!("again"))).await.unwrap();
    let got = joining
        .await
        .expect("no notification reached the waiter")
        .unwrap();
    assert_eq!(got.result, json!("again"));
    assert_eq!(subscribers_settle(&channel).await, 0);
    writer.close().await.unwrap();
    cleanup(&p).await;
}

#[tokio::test]
async fn hundreds_of_concurrent_waiters_are_all_resolved() {
    let p = prefix();
    let b = Arc::new(backend(&p, NO_POLL).await);
    let ids: Vec<String> = (0..250).map(|_| id()).collect();
    let shared = id();
    let mut waiters = Vec::new();
    for (i, tid) in ids.iter().enumerate() {
        let (b, tid) = (b.clone(), tid.clone());
        waiters.push(tokio::spawn(async move {
            let m = wait_notified(&b, &tid).await;
            assert_eq!(m.result, json!(i));
        }));
    }
    for _ in 0..50 {
        let (b, tid) = (b.clone(), shared.clone());
        waiters.push(tokio::spawn(async move {
            let m = wait_notified(&b, &tid).await;
            assert_eq!(m.result, json!("shared"));
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut metas: Vec<TaskMeta> = ids
        .iter()
        .enumerate()
        .map(|(i, tid)| success(tid, json!(i)))
        .collect();
    metas.push(success(&shared, json!("shared")));
    b.store_many(&metas).await.unwrap();
    for w in waiters {
        tokio::time::timeout(LONG, w).await.unwrap().unwrap();
    }
    for tid in [&ids[0], &ids[249], &shared] {
        assert_eq!(subscribers_settle(&key(&p, tid)).await, 0);
    }
    cleanup(&p).await;
}

#[tokio::test]
async fn poll_finds_a_result_stored_without_publish() {
    let p = prefix();
    let b = Arc::new(backend(&p, "&poll_interval=0.05").await);
    let tid = id();
    let meta = success(&tid, json!({"via": "poll"}));
    let writer = {
        let (k, doc) = (key(&p, &tid), meta.to_json());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            redis::cmd("SET")
                .arg(k)
                .arg(doc)
                .query_async::<()>(&mut raw().await)
                .await
                .unwrap();
        })
    };
    let got = b.wait(&tid, Some(LONG)).await.unwrap();
    assert_eq!(got, meta);
    writer.await.unwrap();
    cleanup(&p).await;
}

#[tokio::test]
async fn store_many_then_get_many() {
    let p = prefix();
    let b = backend(&p, "").await;
    let metas: Vec<TaskMeta> = (0..1000).map(|i| success(&id(), json!({"n": i}))).collect();
    b.store_many(&metas).await.unwrap();
    let mut ids: Vec<&str> = metas.iter().map(|m| m.task_id.as_str()).collect();
    let missing = id();
    ids.push(&missing);
    let got = b.get_many(&ids).await.unwrap();
    assert_eq!(got.len(), 1001);
    assert_eq!(&got[..1000], metas.as_slice());
    assert_eq!(got[1000], TaskMeta::pending(&missing));
    assert!(b.get_many::<&str>(&[]).await.unwrap().is_empty());
    cleanup(&p).await;
}

/// Documents written by Celery 5.7.0's Redis backend (`store_result`, `mark_as_failure`).
const CELERY_SUCCESS: &str = r#"{"status": "SUCCESS", "result": {"sum": 4, "items": [1, "tv\u00e5", null, 2.5]}, "traceback": null, "children": null, "date_done": "2026-11-23T11:33:45.817524+00:00", "task_id": "f3a1c1de-6b8e-4e8e-9d4c-0a2b7c1e5d11"}"#;
const CELERY_FAILURE: &str = r#"{"status": "FAILURE", "result": {"exc_type": "ValueError", "exc_message": ["bad input", 42], "exc_module": "builtins"}, "traceback": "Traceback (most recent call last):\n  File \"/tmp/capture_meta.py\", line 11, in <module>\n    raise ValueError('bad input', 42)\nValueError: ('bad input', 42)\n", "children": null, "date_done": "2026-11-23T11:33:45.822278+00:00", "task_id": "0b6d2c4e-1f3a-4c5b-8e7d-9a1b2c3d4e5f"}"#;

#[tokio::test]
async fn reads_documents_written_by_celery() {
    let p = prefix();
    let b = backend(&p, "").await;
    let mut conn = raw().await;
    let ok = "f3a1c1de-6b8e-4e8e-9d4c-0a2b7c1e5d11";
    let bad = "0b6d2c4e-1f3a-4c5b-8e7d-9a1b2c3d4e5f";
    for (tid, doc) in [(ok, CELERY_SUCCESS), (bad, CELERY_FAILURE)] {
        redis::cmd("SET")
            .arg(key(&p, tid))
            .arg(doc)
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
    }

    let m = b.get(ok).await.unwrap();
    assert_eq!(
        String::from_utf8(m.to_json()).unwrap(),
        CELERY_SUCCESS,
        "re-encoding gives Celery's bytes back"
    );
    assert_eq!(m.status, State::Success);
    assert_eq!(m.result, json!({"sum": 4, "items": [1, "två", null, 2.5]}));
    assert!(m.exception().is_none() && m.traceback.is_none());
    assert_eq!(
        m.date_done.unwrap().to_rfc3339(),
        "2026-11-23T11:33:45.817524+00:00"
    );

    let m = wait_notified(&b, bad).await;
    assert_eq!(String::from_utf8(m.to_json()).unwrap(), CELERY_FAILURE);
    assert_eq!(m.status, State::Failure);
    let exc = m.exception().unwrap();
    assert_eq!(exc.exc_type, "ValueError");
    assert_eq!(exc.exc_module, "builtins");
    assert_eq!(exc.exc_message, vec![json!("bad input"), json!(42)]);
    assert!(m
        .traceback
        .unwrap()
        .ends_with("ValueError: ('bad input', 42)\n"));

    // Celery's SUCCESS document is guarded like ours.
    b.store(&TaskMeta::with_state(ok, State::Started, json!(null)))
        .await
        .unwrap();
    assert_eq!(b.get(ok).await.unwrap().status, State::Success);
    cleanup(&p).await;
}

/// Real Celery reads (and waits through pub/sub for) what we store. `CELERITY_NO_PYTHON=1` skips it.
#[tokio::test]
async fn python_celery_reads_what_we_store() {
    let Some(python) = support::celery_python() else {
        return;
    };
    let p = prefix();
    let b = Arc::new(backend(&p, "").await);
    let tid = id();
    // Failures stored before Python asks: `get()` must raise them, Celery's way.
    let failed = id();
    let exc = ExceptionInfo::new("ValueError", "bad value", "builtins");
    b.store(&TaskMeta::failure(
        &failed,
        &exc,
        Some("Traceback ...".into()),
    ))
    .await
    .unwrap();
    let custom = id();
    let exc = ExceptionInfo::new("FlakyError", "run 1 of 3", "celerity.tasks");
    b.store(&TaskMeta::failure(&custom, &exc, None))
        .await
        .unwrap();
    let script = format!(
        "from celery import Celery\n\
         app = Celery(backend='{REDIS}', broker='memory://')\n\
         app.conf.result_backend_transport_options = {{'global_keyprefix': '{p}'}}\n\
         print(repr(app.AsyncResult('{tid}').get(timeout=20)))\n\
         try:\n    app.AsyncResult('{failed}').get(timeout=20)\nexcept ValueError as e:\n    print('raised', type(e).__name__, e)\n\
         try:\n    app.AsyncResult('{custom}').get(timeout=20)\nexcept Exception as e:\n    print('raised', type(e).__name__, e)\n"
    );
    let child = tokio::process::Command::new(&python)
        .env("PYTHONIOENCODING", "utf-8")
        .arg("-c")
        .arg(script)
        .output();
    let writer = {
        let (b, tid) = (b.clone(), tid.clone());
        tokio::spawn(async move {
            // Give Python time to import and subscribe; it reads the key first either way.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            b.store(&TaskMeta::success(&tid, json!({"answer": [42, "två"]})))
                .await
                .unwrap();
        })
    };
    let out = tokio::time::timeout(Duration::from_secs(60), child)
        .await
        .unwrap()
        .unwrap();
    writer.await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "{'answer': [42, 'två']}");
    assert_eq!(lines[1], "raised ValueError bad value");
    // An exception class Python cannot import comes back as Celery's stand-in of the same name.
    assert_eq!(lines[2], "raised FlakyError run 1 of 3");
    cleanup(&p).await;
}

#[tokio::test]
async fn close_stops_waiters_and_refuses_work() {
    let p = prefix();
    let b = Arc::new(backend(&p, NO_POLL).await);
    let tid = id();
    let waiter = {
        let (b, tid) = (b.clone(), tid.clone());
        tokio::spawn(async move { b.wait(&tid, None).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    b.close().await.unwrap();
    let res = tokio::time::timeout(LONG, waiter).await.unwrap().unwrap();
    assert!(matches!(res, Err(BrokerError::Closed)), "{res:?}");
    assert!(matches!(b.get(&tid).await, Err(BrokerError::Closed)));
    assert!(matches!(
        b.store(&success(&tid, json!(1))).await,
        Err(BrokerError::Closed)
    ));
    assert_eq!(subscribers_settle(&key(&p, &tid)).await, 0);
    cleanup(&p).await;
}

#[tokio::test]
async fn unreachable_server_is_a_connect_error() {
    let url = BrokerUrl::parse("redis://127.0.0.1:1/0").unwrap();
    match RedisBackend::connect(&url).await {
        Err(BrokerError::Connect { url, reason }) => {
            assert!(url.contains("127.0.0.1:1"));
            assert!(!reason.is_empty());
        }
        Err(other) => panic!("expected Connect, got {other:?}"),
        Ok(_) => panic!("connected to nothing"),
    }
}

#[tokio::test]
async fn bad_options_are_rejected() {
    for url in [
        "redis://127.0.0.1:6379/0?result_expire=5",
        "redis://127.0.0.1:6379/0?poll_interval=0",
        "redis://127.0.0.1:6379/0?poll_interval=-1",
        "redis://127.0.0.1:6379/0?result_expires=1.5",
    ] {
        let res = RedisBackend::connect(&BrokerUrl::parse(url).unwrap()).await;
        assert!(
            matches!(res, Err(BrokerError::InvalidUrl { .. })),
            "{url} must be refused"
        );
    }
}

#[tokio::test]
async fn keyprefix_without_separator_gets_an_underscore() {
    let raw_prefix = format!("celerity-backend-test-{}", uuid::Uuid::new_v4().simple());
    let b = backend(&raw_prefix, "").await;
    let tid = id();
    b.store(&success(&tid, json!(1))).await.unwrap();
    let exists: i64 = redis::cmd("EXISTS")
        .arg(format!("{raw_prefix}_celery-task-meta-{tid}"))
        .query_async(&mut raw().await)
        .await
        .unwrap();
    assert_eq!(exists, 1);
    cleanup(&raw_prefix).await;
}

/// Waits (bounded) until `channel` has `want` subscribers; returns the last count seen.
async fn subscribers_reach(
    conn: &mut redis::aio::MultiplexedConnection,
    channel: &str,
    want: i64,
) -> i64 {
    let mut n = numsub(conn, channel).await;
    for _ in 0..400 {
        if n == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        n = numsub(conn, channel).await;
    }
    n
}

/// The ids of the server's pub/sub connections.
async fn pubsub_clients(conn: &mut redis::aio::MultiplexedConnection) -> Vec<String> {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(conn)
        .await
        .unwrap();
    list.lines()
        .filter_map(|line| line.split(' ').next())
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn waiters_survive_a_lost_pubsub_connection() {
    let Some(server) = PrivateRedis::start().await else {
        eprintln!("skipped: cannot start a private redis-server");
        return;
    };
    let url = format!("{}?global_keyprefix=t:{NO_POLL}", server.url());
    let b = Arc::new(
        RedisBackend::connect(&BrokerUrl::parse(&url).unwrap())
            .await
            .unwrap(),
    );
    let mut admin = redis::Client::open(server.url().as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let kill_pubsub = || {
        redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .clone()
    };

    // Killed, then stored at once: the result may be published before the listener is back,
    // so the reconnect must make waiters read again.
    let first = id();
    let waiter = {
        let (b, tid) = (b.clone(), first.clone());
        tokio::spawn(async move { wait_notified(&b, &tid).await })
    };
    assert_eq!(
        subscribers_reach(&mut admin, &key("t:", &first), 1).await,
        1
    );
    let killed: i64 = kill_pubsub().query_async(&mut admin).await.unwrap();
    assert_eq!(killed, 1);
    b.store(&success(&first, json!(1))).await.unwrap();
    assert_eq!(waiter.await.unwrap().result, json!(1));

    // Killed, resubscribed, then stored: the notification arrives on the new connection.
    let second = id();
    let waiter = {
        let (b, tid) = (b.clone(), second.clone());
        tokio::spawn(async move { wait_notified(&b, &tid).await })
    };
    assert_eq!(
        subscribers_reach(&mut admin, &key("t:", &second), 1).await,
        1
    );
    let old = pubsub_clients(&mut admin).await;
    assert_eq!(old.len(), 1);
    let killed: i64 = kill_pubsub().query_async(&mut admin).await.unwrap();
    assert_eq!(killed, 1);
    // Wait (bounded) for a new pub/sub connection subscribed to the channel.
    let before = old;
    let mut resubscribed = false;
    for _ in 0..400 {
        let now = pubsub_clients(&mut admin).await;
        if now.iter().any(|id| !before.contains(id))
            && numsub(&mut admin, &key("t:", &second)).await == 1
        {
            resubscribed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(resubscribed, "the listener did not come back");
    b.store(&success(&second, json!(2))).await.unwrap();
    assert_eq!(waiter.await.unwrap().result, json!(2));
    b.close().await.unwrap();
}
