//! [`Seeds`]: the seed nodes of a `redis+cluster://` URL as servers for connections that are not
//! cluster connections — the pub/sub of broadcasts, remote-control replies and result
//! notifications. Redis Cluster forwards a `PUBLISH` to every node, so any node will do; a dial goes
//! to the node that answered last, else to the next seeds in turn (each `PING`ed within the
//! connect timeout), so a subscription whose node died moves to a live one when it reconnects.

use std::sync::atomic::{AtomicUsize, Ordering};

use redis::{AsyncConnectionConfig, ErrorKind, RedisError, RedisResult};

use super::timeouts::CONNECT_TIMEOUT;

/// The seed nodes in the URL's order and the one that answered last.
pub(crate) struct Seeds {
    nodes: Vec<redis::Client>,
    last_good: AtomicUsize,
}

impl Seeds {
    /// The seeds; `None` when the list is empty.
    pub(crate) fn new(nodes: Vec<redis::Client>) -> Option<Seeds> {
        (!nodes.is_empty()).then(|| Seeds {
            nodes,
            last_good: AtomicUsize::new(0),
        })
    }

    /// The first seed, for what is only read from a client (its database, its credentials).
    pub(crate) fn first(&self) -> &redis::Client {
        // `new` refuses an empty list.
        &self.nodes[0]
    }

    /// A client for a seed that answers a `PING` now: the one that answered last, else the next
    /// ones in turn. The error names every node tried when none answers.
    pub(crate) async fn client(&self) -> RedisResult<redis::Client> {
        let start = self.last_good.load(Ordering::Relaxed);
        let mut failures = Vec::with_capacity(self.nodes.len());
        for step in 0..self.nodes.len() {
            let i = (start + step) % self.nodes.len();
            let node = &self.nodes[i];
            match ping(node).await {
                Ok(()) => {
                    self.last_good.store(i, Ordering::Relaxed);
                    return Ok(node.clone());
                }
                Err(e) => failures.push(format!("{}: {e}", node.get_connection_info().addr())),
            }
        }
        Err(RedisError::from((
            ErrorKind::Io,
            "no cluster seed node answered",
            failures.join("; "),
        )))
    }
}

/// One `PING` on a fresh connection to `node`, within the connect timeout.
async fn ping(node: &redis::Client) -> RedisResult<()> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(CONNECT_TIMEOUT));
    let mut conn = node
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    redis::cmd("PING").query_async::<()>(&mut conn).await
}
