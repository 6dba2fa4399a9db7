//! The in-process `memory://` result backend, shared by every handle on the same URL name.
//!
//! Results live as long as the process; there is no expiry.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;

use super::memory_chord::MemoryChords;
use super::{ChordJoin, ChordPart, ResultBackend, State, TaskMeta};
use crate::error::{BrokerError, Result};
use crate::url::BrokerUrl;

/// A handle on one named in-process result store.
#[derive(Clone)]
pub struct MemoryBackend {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    results: Mutex<HashMap<String, TaskMeta>>,
    changed: Notify,
    chords: MemoryChords,
}

fn registry() -> &'static Mutex<HashMap<String, Arc<Shared>>> {
    static REGISTRY: OnceLock<Mutex<HashMap<String, Arc<Shared>>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

impl MemoryBackend {
    /// The backend named by a `memory://NAME` URL.
    pub fn from_url(url: &BrokerUrl) -> Result<Self> {
        url.check_options(&[])?;
        Ok(Self::named(url.base.host_str().unwrap_or("")))
    }

    /// The in-process backend called `name`, created on first use.
    pub fn named(name: &str) -> Self {
        let shared = registry()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name.to_owned())
            .or_default()
            .clone();
        MemoryBackend { shared }
    }

    fn results(&self) -> std::sync::MutexGuard<'_, HashMap<String, TaskMeta>> {
        self.shared
            .results
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl ResultBackend for MemoryBackend {
    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn store(&self, meta: &TaskMeta) -> Result<()> {
        {
            let mut results = self.results();
            if results
                .get(&meta.task_id)
                .is_some_and(|m| m.status == State::Success)
            {
                return Ok(());
            }
            results.insert(meta.task_id.clone(), meta.clone());
        }
        self.shared.changed.notify_waiters();
        Ok(())
    }

    async fn get(&self, task_id: &str) -> Result<TaskMeta> {
        Ok(self
            .results()
            .get(task_id)
            .cloned()
            .unwrap_or_else(|| TaskMeta::pending(task_id)))
    }

    async fn wait(&self, task_id: &str, timeout: Option<Duration>) -> Result<TaskMeta> {
        // A timeout past what the clock can count is no deadline at all.
        let deadline = timeout.and_then(|t| tokio::time::Instant::now().checked_add(t));
        loop {
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let meta = self.get(task_id).await?;
            if meta.status.is_ready() {
                return Ok(meta);
            }
            match deadline {
                None => changed.await,
                Some(d) => {
                    if tokio::time::timeout_at(d, changed).await.is_err() {
                        return Err(BrokerError::Timeout(timeout.unwrap_or_default()));
                    }
                }
            }
        }
    }

    async fn forget(&self, task_id: &str) -> Result<()> {
        self.results().remove(task_id);
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        Ok(())
    }

    async fn set_chord_size(&self, group_id: &str, size: usize) -> Result<()> {
        self.shared.chords.set_size(group_id, size);
        Ok(())
    }

    async fn chord_part_return(&self, part: &ChordPart) -> Result<ChordJoin> {
        self.shared.chords.part_return(part)
    }

    async fn chord_done(&self, group_id: &str, claim: &str) -> Result<()> {
        self.shared.chords.done(group_id, claim);
        Ok(())
    }

    async fn save_group(&self, group_id: &str, task_ids: &[String]) -> Result<()> {
        self.shared.chords.save_group(group_id, task_ids);
        Ok(())
    }

    async fn restore_group(&self, group_id: &str) -> Result<Option<Vec<String>>> {
        Ok(self.shared.chords.restore_group(group_id))
    }

    async fn forget_group(&self, group_id: &str) -> Result<()> {
        self.shared.chords.forget_group(group_id);
        Ok(())
    }
}
