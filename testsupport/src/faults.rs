//! Fault injection around the real services: [`OutageBackend`] wraps a real result backend and
//! fails its writes and reads while a test says it is down, the way a result backend outage (a
//! restart, a failover, OOM) looks to a worker — without the client library's own reconnect
//! timing deciding how long the outage lasts.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use celerity_broker::backend::{ChordJoin, ChordPart};
use celerity_broker::{BrokerError, ResultBackend, TaskMeta};

/// A result backend that can be taken down and brought back by the test.
pub struct OutageBackend {
    inner: Arc<dyn ResultBackend>,
    down: AtomicBool,
    /// Calls refused while down.
    refused: AtomicU64,
    /// Task ids whose reads fail even while it is up (a partial outage, as a cluster slot sees).
    unreadable: Mutex<HashSet<String>>,
}

impl OutageBackend {
    /// Wraps `inner`, up.
    pub fn new(inner: Arc<dyn ResultBackend>) -> Arc<OutageBackend> {
        Arc::new(OutageBackend {
            inner,
            down: AtomicBool::new(false),
            refused: AtomicU64::new(0),
            unreadable: Mutex::new(HashSet::new()),
        })
    }

    /// Takes it down (`true`) or brings it back.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Calls refused while it was down.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::SeqCst)
    }

    /// Makes reads of `task_id` fail (`true`) or work again.
    pub fn set_unreadable(&self, task_id: &str, unreadable: bool) {
        let mut ids = self.unreadable.lock().unwrap_or_else(|e| e.into_inner());
        if unreadable {
            ids.insert(task_id.to_owned());
        } else {
            ids.remove(task_id);
        }
    }

    fn check_read(&self, task_id: &str) -> celerity_broker::Result<()> {
        self.check()?;
        let ids = self.unreadable.lock().unwrap_or_else(|e| e.into_inner());
        if ids.contains(task_id) {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(BrokerError::ConnectionLost(format!(
                "reading {task_id} failed (injected)"
            )));
        }
        Ok(())
    }

    fn check(&self) -> celerity_broker::Result<()> {
        if self.down.load(Ordering::SeqCst) {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(BrokerError::ConnectionLost(
                "result backend down (injected)".into(),
            ));
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl ResultBackend for OutageBackend {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    async fn store(&self, meta: &TaskMeta) -> celerity_broker::Result<()> {
        self.check()?;
        self.inner.store(meta).await
    }
    async fn get(&self, task_id: &str) -> celerity_broker::Result<TaskMeta> {
        self.check_read(task_id)?;
        self.inner.get(task_id).await
    }
    async fn wait(
        &self,
        task_id: &str,
        timeout: Option<Duration>,
    ) -> celerity_broker::Result<TaskMeta> {
        self.check()?;
        self.inner.wait(task_id, timeout).await
    }
    async fn forget(&self, task_id: &str) -> celerity_broker::Result<()> {
        self.check()?;
        self.inner.forget(task_id).await
    }
    async fn close(&self) -> celerity_broker::Result<()> {
        self.inner.close().await
    }
    async fn set_chord_size(&self, group_id: &str, size: usize) -> celerity_broker::Result<()> {
        self.check()?;
        self.inner.set_chord_size(group_id, size).await
    }
    async fn chord_part_return(&self, part: &ChordPart) -> celerity_broker::Result<ChordJoin> {
        self.check()?;
        self.inner.chord_part_return(part).await
    }
    async fn chord_done(&self, group_id: &str, claim: &str) -> celerity_broker::Result<()> {
        self.check()?;
        self.inner.chord_done(group_id, claim).await
    }
    async fn save_group(&self, group_id: &str, task_ids: &[String]) -> celerity_broker::Result<()> {
        self.check()?;
        self.inner.save_group(group_id, task_ids).await
    }
    async fn restore_group(&self, group_id: &str) -> celerity_broker::Result<Option<Vec<String>>> {
        self.check()?;
        self.inner.restore_group(group_id).await
    }
    async fn forget_group(&self, group_id: &str) -> celerity_broker::Result<()> {
        self.check()?;
        self.inner.forget_group(group_id).await
    }
}
