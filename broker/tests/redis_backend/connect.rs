//! Connecting: an unreachable server is a connect error, bad options are refused, and a key prefix
//! without a separator gets an underscore.

use super::*;

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
