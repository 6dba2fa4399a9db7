//! [`GroupResult`]: the results of a group's members, read and waited on together, in member order,
//! and saved / restored by group id in Celery's format (`celery-taskset-meta-<gid>`), so Python's
//! `GroupResult.restore(gid)` reads what we save and the other way round.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

use celerity_broker::backend::ExceptionInfo;
use celerity_broker::{ResultBackend, State, TaskMeta};

use crate::client::Client;
use crate::error::{ClientError, MemberFailure, Result};
use crate::result::AsyncResult;

/// Handles on every member of one group.
#[derive(Clone)]
pub struct GroupResult {
    id: String,
    results: Vec<AsyncResult<Value>>,
    backend: Option<Arc<dyn ResultBackend>>,
}

impl std::fmt::Debug for GroupResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupResult")
            .field("id", &self.id)
            .field("members", &self.results.len())
            .finish()
    }
}

impl Client {
    /// A handle on the group `group_id` whose members are `task_ids` (in order).
    pub fn group_result(&self, group_id: &str, task_ids: Vec<String>) -> GroupResult {
        GroupResult {
            id: group_id.to_owned(),
            results: task_ids.iter().map(|id| self.result(id)).collect(),
            backend: self.backend().cloned(),
        }
    }

    /// The group saved under `group_id` (by us or by Python's `GroupResult.save()`), if any.
    pub async fn restore_group(&self, group_id: &str) -> Result<Option<GroupResult>> {
        let backend = self.backend().ok_or(ClientError::NoBackend)?;
        Ok(backend
            .restore_group(group_id)
            .await?
            .map(|ids| self.group_result(group_id, ids)))
    }
}

impl GroupResult {
    /// The group id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The members' handles, in order.
    pub fn results(&self) -> &[AsyncResult<Value>] {
        &self.results
    }

    /// The members' ids, in order.
    pub fn ids(&self) -> Vec<String> {
        self.results.iter().map(|r| r.id().to_owned()).collect()
    }

    fn backend(&self) -> Result<&Arc<dyn ResultBackend>> {
        self.backend.as_ref().ok_or(ClientError::NoBackend)
    }

    /// The members' current metas, in order, in one read where the backend allows.
    pub async fn metas(&self) -> Result<Vec<TaskMeta>> {
        Ok(self.backend()?.get_many(&self.ids()).await?)
    }

    /// How many members are finished (succeeded, failed or revoked).
    pub async fn completed_count(&self) -> Result<usize> {
        Ok(self
            .metas()
            .await?
            .iter()
            .filter(|m| m.status.is_ready())
            .count())
    }

    /// Waits until every member is finished and returns their metas, in order.
    pub async fn wait_metas(&self, timeout: Option<Duration>) -> Result<Vec<TaskMeta>> {
        let backend = self.backend()?;
        // A timeout past what the clock can count is no deadline at all.
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut metas = self.metas().await?;
        for (meta, handle) in metas.iter_mut().zip(&self.results) {
            if meta.status.is_ready() {
                continue;
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            *meta = match backend.wait(handle.id(), left).await {
                Ok(m) => m,
                Err(celerity_broker::BrokerError::Timeout(_)) => {
                    return Err(ClientError::Timeout(timeout.unwrap_or_default()))
                }
                Err(e) => return Err(e.into()),
            };
        }
        Ok(metas)
    }

    /// Waits for every member and returns their results in order. If any member failed or was
    /// revoked, the error is [`ClientError::GroupFailed`], naming each failed member.
    pub async fn get(&self, timeout: Option<Duration>) -> Result<Vec<Value>> {
        let metas = self.wait_metas(timeout).await?;
        let total = metas.len();
        let mut values = Vec::with_capacity(total);
        let mut failed = Vec::new();
        for (index, meta) in metas.into_iter().enumerate() {
            match meta.status {
                State::Success => values.push(meta.result),
                _ => failed.push(MemberFailure {
                    index,
                    exception: meta.exception().unwrap_or_else(|| {
                        ExceptionInfo::new(
                            "UnknownError",
                            format!("ended in state {}", meta.status),
                            "celery.exceptions",
                        )
                    }),
                    task_id: meta.task_id,
                    state: meta.status,
                }),
            }
        }
        if failed.is_empty() {
            Ok(values)
        } else {
            Err(ClientError::GroupFailed {
                group_id: self.id.clone(),
                total,
                failed,
            })
        }
    }

    /// Saves the group under its id (Celery's `GroupResult.save()`).
    pub async fn save(&self) -> Result<()> {
        Ok(self.backend()?.save_group(&self.id, &self.ids()).await?)
    }

    /// Deletes the saved group (not the members' results).
    pub async fn forget(&self) -> Result<()> {
        Ok(self.backend()?.forget_group(&self.id).await?)
    }
}

#[cfg(test)]
mod tests {
    use celerity_broker::backend::memory::MemoryBackend;
    use celerity_broker::memory::MemoryBroker;
    use serde_json::json;

    use super::*;

    /// A timeout no clock can count waits for as long as it takes; it used to panic ("overflow when
    /// adding duration to instant") in the group's and in the backend's wait.
    #[tokio::test]
    async fn a_timeout_past_what_the_clock_can_count_does_not_panic() {
        let name = celerity_broker::protocol::node::new_task_id();
        let backend: Arc<dyn ResultBackend> = Arc::new(MemoryBackend::named(&name));
        let client = Client::new(Arc::new(MemoryBroker::named(&name)), Some(backend.clone()));
        backend
            .store(&TaskMeta::success("a", json!(1)))
            .await
            .unwrap();
        let group = client.group_result("g", vec!["a".into()]);
        for timeout in [Duration::MAX, Duration::from_secs(u64::MAX / 2)] {
            assert_eq!(group.get(Some(timeout)).await.unwrap(), [json!(1)]);
            let meta = backend.wait("a", Some(timeout)).await.unwrap();
            assert_eq!(meta.status, State::Success);
        }
    }
}
