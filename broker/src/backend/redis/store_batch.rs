//! Group commit for result writes: states stored while one `store_many.lua` call is in flight go
//! together in the next one (see [`GroupCommit`]). Each `store` still returns only once Redis has
//! answered for it, so a worker acks a job only after its result is really stored.

use std::sync::LazyLock;

use crate::redis::cluster::ReplicaAcks;
use crate::redis::AnyConn;
use redis::Script;

use crate::error::Result;
use crate::redis::group_commit::GroupCommit;

/// Most states in one script call.
const MAX_BATCH: usize = 256;

static STORE_MANY: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/store_many.lua")));

/// The result writer; its task ends when this is dropped.
pub(super) struct StoreBatcher(GroupCommit<(String, Vec<u8>)>);

impl StoreBatcher {
    /// Starts the batching task (needs a Tokio runtime).
    /// On a cluster (`acks` given) a batch is split by hash slot (see [`super::cluster`]).
    pub(super) fn start(conn: AnyConn, expires: u64, acks: Option<ReplicaAcks>) -> StoreBatcher {
        StoreBatcher(GroupCommit::start(
            MAX_BATCH,
            "result writer",
            move |batch: Vec<(String, Vec<u8>)>| {
                if let (Some(acks), AnyConn::Cluster(c)) = (acks, &conn) {
                    let c = c.clone();
                    return futures_util::FutureExt::boxed(async move {
                        super::cluster::store_by_slot(c, &STORE_MANY, batch, expires, acks).await
                    });
                }
                let mut inv = STORE_MANY.prepare_invoke();
                inv.arg(expires);
                for (key, json) in &batch {
                    inv.key(key).arg(&json[..]);
                }
                let mut conn = conn.clone();
                // Not retried here: the caller retries its own write (a state stored twice is
                // harmless).
                futures_util::FutureExt::boxed(async move {
                    Ok(inv.invoke_async::<Vec<i64>>(&mut conn).await?)
                })
            },
        ))
    }

    /// Stores `json` at `key` (and publishes it) unless the stored state is SUCCESS; true if stored.
    pub(super) async fn store(&self, key: String, json: Vec<u8>) -> Result<bool> {
        self.0.submit((key, json)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same task twice in one call, SUCCESS first: the second state must not replace it (the
    /// script reads every key once up front, so a key it wrote itself is read again).
    #[tokio::test]
    async fn a_state_after_success_in_the_same_call_is_dropped() {
        let prefix = format!("celtest:{}:", uuid::Uuid::new_v4().simple());
        let client = redis::Client::open("redis://127.0.0.1:6379/0").unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let (key, other) = (format!("{prefix}meta-1"), format!("{prefix}meta-2"));
        let success = r#"{"status": "SUCCESS", "result": 3}"#;
        let failure = r#"{"status": "FAILURE", "result": null}"#;
        let mut inv = STORE_MANY.prepare_invoke();
        inv.arg(60)
            .key(&key)
            .arg(success)
            .key(&other)
            .arg(failure)
            .key(&key)
            .arg(failure);
        let stored: redis::RedisResult<Vec<i64>> = inv.invoke_async(&mut c).await;
        let kept: redis::RedisResult<Option<String>> =
            redis::cmd("GET").arg(&key).query_async(&mut c).await;
        let _: redis::RedisResult<()> = redis::cmd("DEL")
            .arg(&key)
            .arg(&other)
            .query_async(&mut c)
            .await;
        assert_eq!(stored.unwrap(), vec![1, 1, 0]);
        assert_eq!(kept.unwrap().as_deref(), Some(success));
    }
}
