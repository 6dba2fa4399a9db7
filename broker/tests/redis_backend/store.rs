//! Storing and reading results: Celery's key layout, a missing result is pending, SUCCESS is never
//! overwritten, expiry, PUBLISH of the document on store, and batches.

use super::*;

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
