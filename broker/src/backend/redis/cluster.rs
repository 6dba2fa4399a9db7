//! The result backend on `redis+cluster://`: what differs from one server.
//!
//! Result keys stay Celery's (`celery-task-meta-<id>`, untagged), so results spread over the
//! masters by task id. A grouped write (`store_many.lua`) can only touch one slot, so a batch is split
//! by slot and the parts are sent concurrently; each part is followed by `WAIT` for the replicas, so a
//! job is acked only after its result would survive the loss of its master. Chord join keys are
//! tagged by group id (`celery-taskset-meta-{<gid>}.j`, see `chord.rs`).
//!
//! Waiting for a result subscribes on the first seed node (pub/sub reaches every node of a cluster);
//! while that node is down, waiters fall back to reading the key every `poll_interval`.

use std::collections::HashMap;

use futures_util::future::join_all;
use redis::cluster_routing::Slot;
use redis::Script;

use crate::error::Result;
use crate::redis::cluster::{from_redis, wait_replicas, ClusterRedial, ReplicaAcks};

/// Stores `batch` (key, document) with `script` (`store_many.lua`), one call per hash slot, and
/// returns one flag per item in the order given.
pub(super) async fn store_by_slot(
    conn: ClusterRedial,
    script: &Script,
    batch: Vec<(String, Vec<u8>)>,
    expires: u64,
    acks: ReplicaAcks,
) -> Result<Vec<i64>> {
    let mut groups: HashMap<Slot, Vec<usize>> = HashMap::new();
    for (i, (key, _)) in batch.iter().enumerate() {
        groups.entry(Slot::for_key(key)).or_default().push(i);
    }
    let calls = groups.into_values().map(|idx| {
        let mut conn = conn.clone();
        let mut inv = script.prepare_invoke();
        inv.arg(expires);
        for &i in &idx {
            inv.key(&batch[i].0).arg(&batch[i].1[..]);
        }
        let first = batch[idx[0]].0.clone();
        async move {
            let flags: Vec<i64> = inv.invoke_async(&mut conn).await.map_err(from_redis)?;
            wait_replicas(&mut conn, &first, acks).await?;
            Ok::<_, crate::error::BrokerError>((idx, flags))
        }
    });
    let mut out = vec![0; batch.len()];
    for part in join_all(calls).await {
        let (idx, flags) = part?;
        for (i, flag) in idx.into_iter().zip(flags) {
            if let Some(slot) = out.get_mut(i) {
                *slot = flag;
            }
        }
    }
    Ok(out)
}
