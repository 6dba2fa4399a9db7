//! The `memory://` result backend: store/get, the SUCCESS guard, waiting.

use std::time::Duration;

use celerity_broker::backend::memory::MemoryBackend;
use celerity_broker::backend::ExceptionInfo;
use celerity_broker::{BrokerError, ResultBackend, State, TaskMeta};
use serde_json::json;

fn unique() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[tokio::test]
async fn store_get_forget() {
    let b = MemoryBackend::named(&unique());
    assert_eq!(b.get("x").await.unwrap().status, State::Pending);
    b.store(&TaskMeta::success("x", json!(5))).await.unwrap();
    let m = b.get("x").await.unwrap();
    assert_eq!((m.status, m.result), (State::Success, json!(5)));
    b.forget("x").await.unwrap();
    assert_eq!(b.get("x").await.unwrap().status, State::Pending);
}

#[tokio::test]
async fn success_is_final() {
    let b = MemoryBackend::named(&unique());
    b.store(&TaskMeta::with_state("x", State::Started, json!(null)))
        .await
        .unwrap();
    b.store(&TaskMeta::success("x", json!(1))).await.unwrap();
    b.store(&TaskMeta::failure(
        "x",
        &ExceptionInfo::new("E", "late duplicate", "builtins"),
        None,
    ))
    .await
    .unwrap();
    assert_eq!(b.get("x").await.unwrap().status, State::Success);
}

#[tokio::test]
async fn wait_wakes_on_store_and_times_out() {
    let b = MemoryBackend::named(&unique());
    let b2 = b.clone();
    let waiter = tokio::spawn(async move { b2.wait("x", Some(Duration::from_secs(5))).await });
    tokio::time::sleep(Duration::from_millis(20)).await;
    b.store(&TaskMeta::with_state("x", State::Started, json!(null)))
        .await
        .unwrap();
    b.store(&TaskMeta::success("x", json!("done")))
        .await
        .unwrap();
    let m = waiter.await.unwrap().unwrap();
    assert_eq!(m.result, json!("done"));
    let e = b
        .wait("never", Some(Duration::from_millis(30)))
        .await
        .unwrap_err();
    assert!(matches!(e, BrokerError::Timeout(_)));
}
