//! Storing, reading, waiting, groups and cleanup.

use super::*;
use celerity_broker::backend::ExceptionInfo;
use celerity_broker::State;
use serde_json::json;
use std::sync::Arc;

#[tokio::test]
async fn stores_reads_and_forgets_in_celery_columns() {
    let (schema, b) = fresh("pg_store", "").await;
    let tid = id();
    assert_eq!(b.get(&tid).await.unwrap().status, State::Pending);
    let mut m = TaskMeta::success(&tid, json!({"a": [1, 2]}));
    m.extra.insert("worker".into(), json!("w1@host"));
    m.extra.insert("args".into(), json!([1, 2]));
    m.extra.insert("group_id".into(), json!("not-a-column"));
    b.store(&m).await.unwrap();
    let row = schema.psql(&format!(
        "SELECT status, encode(result, 'escape'), children IS NULL, worker, \
         encode(args, 'escape'), date_done IS NOT NULL FROM \"{}\".celery_taskmeta WHERE task_id = '{tid}'",
        schema.name
    ));
    assert_eq!(row, "SUCCESS|{\"a\": [1, 2]}|t|w1@host|[1, 2]|t");
    let back = b.get(&tid).await.unwrap();
    assert_eq!(back.status, State::Success);
    assert_eq!(back.result, json!({"a": [1, 2]}));
    assert_eq!(back.extra.get("worker"), Some(&json!("w1@host")));
    assert_eq!(back.extra.get("group_id"), None);
    // Microseconds survive (PostgreSQL keeps them, as Celery's column does).
    let micros = |m: &TaskMeta| m.date_done.map(|d| d.timestamp_micros());
    assert_eq!(micros(&back), micros(&m));

    // A stored SUCCESS is kept: a later state for the id is dropped.
    b.store(&TaskMeta::with_state(&tid, State::Started, json!(null)))
        .await
        .unwrap();
    assert_eq!(b.get(&tid).await.unwrap().status, State::Success);

    let failed = id();
    let exc = ExceptionInfo::new("ValueError", "bad", "builtins");
    b.store(&TaskMeta::failure(
        &failed,
        &exc,
        Some("Traceback …".into()),
    ))
    .await
    .unwrap();
    let got = b
        .get_many(&[failed.clone(), id(), tid.clone()])
        .await
        .unwrap();
    assert_eq!(got[0].exception(), Some(exc));
    assert_eq!(got[0].traceback.as_deref(), Some("Traceback …"));
    assert_eq!(got[1].status, State::Pending);
    assert_eq!(got[2].status, State::Success);

    b.forget(&tid).await.unwrap();
    assert_eq!(b.get(&tid).await.unwrap().status, State::Pending);
    b.close().await.unwrap();
}

#[tokio::test]
async fn batches_keep_one_row_per_id_and_the_success_rule() {
    let (schema, b) = fresh("pg_batch", "").await;
    let b = Arc::new(b);
    let ids: Vec<String> = (0..500).map(|_| id()).collect();
    // store_many: one statement; a RETRY after a SUCCESS of the same id in one batch is dropped.
    let mut metas: Vec<TaskMeta> = ids[..200]
        .iter()
        .map(|t| TaskMeta::success(t, json!(t.len())))
        .collect();
    metas.push(TaskMeta::with_state(&ids[0], State::Retry, json!(null)));
    b.store_many(&metas).await.unwrap();
    // Concurrent store() calls go through the group-commit writer.
    let mut tasks = Vec::new();
    for t in &ids[200..] {
        let (b, t) = (b.clone(), t.clone());
        tasks.push(tokio::spawn(async move {
            b.store(&TaskMeta::with_state(&t, State::Started, json!(null)))
                .await
                .unwrap();
            b.store(&TaskMeta::success(&t, json!(1))).await.unwrap();
            b.store(&TaskMeta::with_state(&t, State::Retry, json!(null)))
                .await
                .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let counts = schema.psql(&format!(
        "SELECT count(*), count(DISTINCT task_id), count(*) FILTER (WHERE status = 'SUCCESS') \
         FROM \"{}\".celery_taskmeta",
        schema.name
    ));
    assert_eq!(counts, "500|500|500");
    b.close().await.unwrap();
}

#[tokio::test]
async fn waiters_are_woken_by_notify_not_by_the_poll() {
    // poll_interval=60: inside LONG only a notification can wake the waiter.
    let (_schema, b) = fresh("pg_wait", "&poll_interval=60").await;
    let b = Arc::new(b);
    let tid = id();
    let waiter = {
        let (b, tid) = (b.clone(), tid.clone());
        tokio::spawn(async move { wait_bounded(&b, &tid).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    b.store(&TaskMeta::with_state(&tid, State::Started, json!(null)))
        .await
        .unwrap();
    b.store(&TaskMeta::success(&tid, json!("done")))
        .await
        .unwrap();
    let m = waiter.await.unwrap();
    assert_eq!(m.result, json!("done"));

    // wait_after: the result stored by the "publish" itself is seen.
    let tid2 = id();
    let publish = {
        let (b, tid2) = (b.clone(), tid2.clone());
        Box::pin(async move { b.store(&TaskMeta::success(&tid2, json!(2))).await })
    };
    let m = tokio::time::timeout(LONG, b.wait_after(&tid2, None, publish))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.result, json!(2));

    // A timeout is an error, not a hang.
    let e = b
        .wait(&id(), Some(Duration::from_millis(200)))
        .await
        .unwrap_err();
    assert!(matches!(e, celerity_broker::BrokerError::Timeout(_)), "{e}");
    b.close().await.unwrap();
}

#[tokio::test]
async fn groups_and_cleanup_follow_celery() {
    let (schema, b) = fresh("pg_groups", "&result_expires=60").await;
    let members = vec![id(), id()];
    b.save_group("g1", &members).await.unwrap();
    assert_eq!(b.restore_group("g1").await.unwrap(), Some(members.clone()));
    let stored = schema.psql(&format!(
        "SELECT encode(result, 'escape') FROM \"{}\".celery_tasksetmeta WHERE taskset_id = 'g1'",
        schema.name
    ));
    assert_eq!(
        stored,
        format!(
            "[[\"g1\", null], [[[\"{}\", null], null], [[\"{}\", null], null]]]",
            members[0], members[1]
        )
    );
    assert_eq!(b.restore_group("nope").await.unwrap(), None);

    // Cleanup deletes rows done longer ago than result_expires, and nothing else.
    let old = id();
    b.store(&TaskMeta::success(&old, json!(1))).await.unwrap();
    let fresh_id = id();
    b.store(&TaskMeta::success(&fresh_id, json!(1)))
        .await
        .unwrap();
    let started = id();
    b.store(&TaskMeta::with_state(&started, State::Started, json!(null)))
        .await
        .unwrap();
    schema.psql(&format!(
        "UPDATE \"{s}\".celery_taskmeta SET date_done = date_done - interval '2 minutes' \
         WHERE task_id = '{old}'; UPDATE \"{s}\".celery_tasksetmeta SET date_done = \
         date_done - interval '2 minutes'",
        s = schema.name
    ));
    assert_eq!(b.cleanup().await.unwrap(), (1, 1));
    assert_eq!(b.get(&old).await.unwrap().status, State::Pending);
    assert_eq!(b.get(&fresh_id).await.unwrap().status, State::Success);
    assert_eq!(b.get(&started).await.unwrap().status, State::Started);
    assert_eq!(b.restore_group("g1").await.unwrap(), None);
    b.forget_group("g1").await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test]
async fn chords_are_refused_at_send_time_naming_redis() {
    let (_schema, b) = fresh("pg_chord", "").await;
    let e = b.set_chord_size("g", 2).await.unwrap_err().to_string();
    assert!(e.contains("redis://"), "{e}");
    b.close().await.unwrap();
}
