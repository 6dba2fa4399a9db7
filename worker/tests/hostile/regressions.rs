//! The defects the generated runs found, each as a small test of its own on `memory://`.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};

use celerity_broker::backend::memory::MemoryBackend;
use celerity_broker::memory::MemoryBroker;
use celerity_broker::protocol::TaskMessage;
use celerity_broker::{Broker, ResultBackend, State};
use celerity_testsupport::InProcessWorker;

/// A job that fails, carrying workflow steps that are not signatures (`errbacks: [{"options":
/// "x"}]`, `chain: [1, 2, 3]`), is settled once. Before: the FAILURE was stored, the steps failed
/// to parse, the job was given back, and it came round every 2 s for ever (starving later ones).
#[tokio::test]
async fn a_failing_job_with_malformed_workflow_steps_is_settled_once() {
    let name = celerity_testsupport::unique("hostile-embed");
    let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::named(&name));
    let backend: Arc<dyn ResultBackend> = Arc::new(MemoryBackend::named(&name));
    let embeds = [
        json!({"errbacks": [{"options": "x"}]}),
        json!({"chain": [1, 2, 3]}),
        json!({"chain": [{"task": 5}]}),
        json!({"chord": {"task": null}}),
        json!({"callbacks": [{"args": 7}]}),
    ];
    let mut ids = Vec::new();
    for embed in &embeds {
        let t = TaskMessage::new("demo.add", vec![json!("1"), json!(2)], Map::new());
        let mut m = t.encode();
        m.body = json!([["1", 2], {}, embed]).to_string().into_bytes();
        broker.publish("q", &m).await.unwrap();
        ids.push(t.id().to_owned());
    }
    let worker = InProcessWorker::demo(broker.clone(), Some(backend.clone()), "q", 2);
    for id in &ids {
        let meta = backend
            .wait(id, Some(Duration::from_secs(10)))
            .await
            .unwrap();
        assert_eq!(meta.status, State::Failure, "{id}: {meta:?}");
        let exc = meta
            .result
            .get("exc_type")
            .and_then(Value::as_str)
            .unwrap_or("");
        assert!(!exc.is_empty(), "{meta:?}");
    }
    // Longer than the 2 s a job given back waits before it goes back.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let summary = worker.stop().await;
    assert_eq!(broker.queue_len("q").await.unwrap(), 0, "{summary:?}");
    assert_eq!(
        summary.failed + summary.rejected,
        ids.len() as u64,
        "{summary:?}"
    );
}
