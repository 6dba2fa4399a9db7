//! Group commit for Redis script calls: requests that arrive while one call is in flight go
//! together in the next one. Nothing waits for a batch to fill (a request that finds the committer
//! idle is sent at once, alone), and each request still returns only once Redis has answered for
//! it. Used for acks (`ack/batch.rs`) and result writes (`backend/redis/store_batch.rs`).

use std::future::Future;

use tokio::sync::{mpsc, oneshot};

use crate::error::{BrokerError, Result};

/// One request and where its answer goes.
struct Pending<T> {
    item: T,
    done: oneshot::Sender<Result<bool>>,
}

/// The sending side; the committing task ends when this is dropped.
pub(crate) struct GroupCommit<T> {
    tx: mpsc::UnboundedSender<Pending<T>>,
    what: &'static str,
}

impl<T: Send + 'static> GroupCommit<T> {
    /// Starts the committing task (needs a Tokio runtime). `commit` makes one Redis call for a
    /// batch of at most `max_batch` items and returns one flag per item, in order (1 = done);
    /// `what` names the task in errors.
    pub(crate) fn start<F, Fut>(max_batch: usize, what: &'static str, mut commit: F) -> Self
    where
        F: FnMut(Vec<T>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Vec<i64>>> + Send,
    {
        let (tx, mut rx) = mpsc::unbounded_channel::<Pending<T>>();
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(max_batch);
            while rx.recv_many(&mut batch, max_batch).await > 0 {
                let (items, dones): (Vec<T>, Vec<_>) =
                    batch.drain(..).map(|p| (p.item, p.done)).unzip();
                match commit(items).await {
                    Ok(flags) => {
                        for (done, ok) in dones
                            .into_iter()
                            .zip(flags.into_iter().chain(std::iter::repeat(0)))
                        {
                            let _ = done.send(Ok(ok == 1));
                        }
                    }
                    // Every waiter gets the error, keeping whether it was the connection's.
                    Err(e) => {
                        for done in dones {
                            let _ = done.send(Err(copy(&e)));
                        }
                    }
                }
            }
        });
        GroupCommit { tx, what }
    }

    /// Sends `item` with the next call; `true` if Redis reported it done.
    pub(crate) async fn submit(&self, item: T) -> Result<bool> {
        let (done, answer) = oneshot::channel();
        let stopped = || BrokerError::Transport {
            transport: "redis",
            message: format!("the {} stopped", self.what),
        };
        self.tx
            .send(Pending { item, done })
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// The same error again, for another waiter (`BrokerError` is not `Clone`).
fn copy(e: &BrokerError) -> BrokerError {
    match e {
        BrokerError::ConnectionLost(m) => BrokerError::ConnectionLost(m.clone()),
        BrokerError::Transport { transport, message } => BrokerError::Transport {
            transport,
            message: message.clone(),
        },
        other if other.is_connection() => BrokerError::ConnectionLost(other.to_string()),
        other => BrokerError::Transport {
            transport: "redis",
            message: other.to_string(),
        },
    }
}
