//! Group commit for Redis acks: acks that arrive while one `settle_many.lua` call is in flight are
//! sent together in the next one (see [`GroupCommit`]). Each ack still returns only once Redis has
//! answered for it, with the same per-delivery "is it still ours" check as a single ack, so acks
//! stay late and exact.

use std::sync::Arc;

use crate::backoff::retry_idempotent;
use crate::error::Result;
use crate::redis::group_commit::GroupCommit;
use crate::redis::scripts::SETTLE_MANY;
use crate::redis::shared::Shared;

/// Most acks in one script call.
const MAX_BATCH: usize = 512;

/// One ack: its tag and the scores that prove it is ours.
type Request = (String, Vec<String>);

/// The ack sender; its task ends when this is dropped.
pub(crate) struct AckBatcher(GroupCommit<Request>);

impl AckBatcher {
    /// Starts the batching task (needs a Tokio runtime).
    pub(crate) fn start(shared: Arc<Shared>) -> AckBatcher {
        AckBatcher(GroupCommit::start(
            MAX_BATCH,
            "ack batcher",
            move |batch: Vec<Request>| {
                let shared = shared.clone();
                async move { retry_idempotent(|| settle_many(&shared, &batch)).await }
            },
        ))
    }

    /// Forgets `tag` if one of `scores` is still its score; true if it did.
    pub(crate) async fn ack(&self, tag: &str, scores: Vec<String>) -> Result<bool> {
        self.0.submit((tag.to_owned(), scores)).await
    }
}

async fn settle_many(shared: &Shared, batch: &[Request]) -> Result<Vec<i64>> {
    let mut conn = shared.conn.clone();
    let mut inv = SETTLE_MANY.prepare_invoke();
    inv.key(shared.keys.unacked())
        .key(shared.keys.unacked_index());
    for (tag, scores) in batch {
        inv.arg(tag).arg(scores.len());
        for s in scores {
            inv.arg(s);
        }
    }
    Ok(inv.invoke_async(&mut conn).await?)
}
