//! Result writes: many rows in one statement, and group commit for concurrent `store` calls.
//!
//! [`upsert_sql`] is one `INSERT … SELECT FROM unnest(…) ON CONFLICT (task_id) DO UPDATE … WHERE
//! status <> 'SUCCESS'` over arrays, so a batch of any size is one round trip, a stored SUCCESS is
//! never written over (Celery's rule, which it keeps with `SELECT … FOR UPDATE`), and each row
//! written sends `pg_notify(<channel>, task_id)` from the same statement: PostgreSQL delivers it at
//! commit, so a waiter is told exactly when the row is visible.
//!
//! [`Writer`] batches `store` calls: a call that finds a free connection is sent at once (alone if
//! need be); calls that arrive while every writing connection is busy go together in the next
//! statement. Nothing waits for a batch to fill, and each call returns only once its row is
//! committed, so a worker acks a job only after its result is durable.

use std::sync::Arc;

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::codec::TaskRow;
use super::schema::{literal, Tables};
use super::{pg_error, same_error};
use crate::error::{BrokerError, Result};

/// Most rows in one statement.
pub(super) const MAX_BATCH: usize = 1024;

/// The statement that writes a batch; `$1`–`$13` are the column arrays, `$14` the channel.
/// Returns the ids it wrote (a SUCCESS already stored drops the row).
pub(super) fn upsert_sql(tables: &Tables) -> String {
    format!(
        "WITH input AS (
            SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::timestamp[], $5::text[],
                                 $6::bytea[], $7::text[], $8::bytea[], $9::bytea[], $10::text[],
                                 $11::int4[], $12::text[], $13::bytea[])
                WITH ORDINALITY AS t(task_id, status, result, date_done, traceback, children,
                                     name, args, kwargs, worker, retries, queue, stamps, ord)
         ),
         -- One row per id: the first SUCCESS if the batch has one (later writes are dropped,
         -- as they would be one by one), else the last state.
         picked AS (
            SELECT DISTINCT ON (task_id) * FROM input
            ORDER BY task_id, (status = 'SUCCESS') DESC,
                     CASE WHEN status = 'SUCCESS' THEN ord ELSE -ord END
         ),
         written AS (
            INSERT INTO {task} AS m (id, task_id, status, result, date_done, traceback, children,
                                     name, args, kwargs, worker, retries, queue, stamps)
            SELECT nextval({seq}), task_id, status, result, date_done, traceback, children,
                   name, args, kwargs, worker, retries, queue, stamps
            FROM picked ORDER BY task_id
            ON CONFLICT (task_id) DO UPDATE SET
                status = EXCLUDED.status, result = EXCLUDED.result,
                date_done = EXCLUDED.date_done, traceback = EXCLUDED.traceback,
                children = EXCLUDED.children, name = EXCLUDED.name, args = EXCLUDED.args,
                kwargs = EXCLUDED.kwargs, worker = EXCLUDED.worker, retries = EXCLUDED.retries,
                queue = EXCLUDED.queue, stamps = EXCLUDED.stamps
            WHERE m.status IS DISTINCT FROM 'SUCCESS'
            RETURNING m.task_id
         )
         SELECT task_id, pg_notify($14, task_id) FROM written",
        task = tables.task,
        seq = literal(&tables.task_seq),
    )
}

/// Writes `rows` in one statement; the ids actually written (not dropped by a stored SUCCESS).
pub(super) async fn write_rows(
    pool: &Pool,
    sql: &str,
    channel: &str,
    rows: &[TaskRow],
) -> Result<Vec<String>> {
    let client = pool.get().await.map_err(super::pool_error)?;
    let stmt = client.prepare_cached(sql).await.map_err(pg_error)?;
    let task_id: Vec<&str> = rows.iter().map(|r| r.task_id.as_str()).collect();
    let status: Vec<&str> = rows.iter().map(|r| r.status.as_str()).collect();
    let result: Vec<&[u8]> = rows.iter().map(|r| r.result.as_slice()).collect();
    let date_done: Vec<_> = rows.iter().map(|r| r.date_done).collect();
    let traceback: Vec<Option<&str>> = rows.iter().map(|r| r.traceback.as_deref()).collect();
    let children: Vec<Option<&[u8]>> = rows.iter().map(|r| r.children.as_deref()).collect();
    let name: Vec<Option<&str>> = rows.iter().map(|r| r.name.as_deref()).collect();
    let args: Vec<Option<&[u8]>> = rows.iter().map(|r| r.args.as_deref()).collect();
    let kwargs: Vec<Option<&[u8]>> = rows.iter().map(|r| r.kwargs.as_deref()).collect();
    let worker: Vec<Option<&str>> = rows.iter().map(|r| r.worker.as_deref()).collect();
    let retries: Vec<Option<i32>> = rows.iter().map(|r| r.retries).collect();
    let queue: Vec<Option<&str>> = rows.iter().map(|r| r.queue.as_deref()).collect();
    let stamps: Vec<Option<&[u8]>> = rows.iter().map(|r| r.stamps.as_deref()).collect();
    let written = client
        .query(
            &stmt,
            &[
                &task_id, &status, &result, &date_done, &traceback, &children, &name, &args,
                &kwargs, &worker, &retries, &queue, &stamps, &channel,
            ],
        )
        .await
        .map_err(pg_error)?;
    written
        .iter()
        .map(|r| r.try_get::<_, String>(0).map_err(pg_error))
        .collect()
}

/// One `store` waiting for its batch.
struct Pending {
    row: TaskRow,
    done: oneshot::Sender<Result<bool>>,
}

/// The group-commit writer; its task ends when this is dropped.
pub(super) struct Writer {
    tx: mpsc::UnboundedSender<Pending>,
}

impl Writer {
    /// Starts the batching task (needs a Tokio runtime); at most `connections` statements are in
    /// flight at once.
    pub(super) fn start(pool: Pool, sql: String, channel: String, connections: usize) -> Writer {
        let (tx, mut rx) = mpsc::unbounded_channel::<Pending>();
        let slots = Arc::new(Semaphore::new(connections.max(1)));
        let (sql, channel) = (Arc::new(sql), Arc::new(channel));
        tokio::spawn(async move {
            loop {
                // A free slot first, then whatever is waiting: calls that came while every slot
                // was busy go out together.
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let mut batch = Vec::new();
                if rx.recv_many(&mut batch, MAX_BATCH).await == 0 {
                    return;
                }
                let (pool, sql, channel) = (pool.clone(), sql.clone(), channel.clone());
                tokio::spawn(async move {
                    let (rows, dones): (Vec<TaskRow>, Vec<_>) =
                        batch.into_iter().map(|p| (p.row, p.done)).unzip();
                    let outcome = write_rows(&pool, &sql, &channel, &rows).await;
                    match outcome {
                        // A server error may be one row's: write them one by one, so that row
                        // alone fails and the others are stored.
                        Err(BrokerError::Transport { .. }) if rows.len() > 1 => {
                            for (row, done) in rows.into_iter().zip(dones) {
                                let one = std::slice::from_ref(&row);
                                let outcome = write_rows(&pool, &sql, &channel, one).await;
                                answer(vec![row], vec![done], outcome);
                            }
                            drop(slot);
                        }
                        outcome => {
                            drop(slot);
                            answer(rows, dones, outcome);
                        }
                    }
                });
            }
        });
        Writer { tx }
    }

    /// Stores `row` with the next statement; true if written, false if a SUCCESS was already there.
    pub(super) async fn store(&self, row: TaskRow) -> Result<bool> {
        let stopped = || BrokerError::Transport {
            transport: "postgresql",
            message: "the result writer stopped".into(),
        };
        let (done, answer) = oneshot::channel();
        self.tx.send(Pending { row, done }).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// Tells each caller of a batch how its row fared.
fn answer(
    rows: Vec<TaskRow>,
    dones: Vec<oneshot::Sender<Result<bool>>>,
    outcome: Result<Vec<String>>,
) {
    match outcome {
        Ok(written) => {
            let written: std::collections::HashSet<String> = written.into_iter().collect();
            for (row, done) in rows.iter().zip(dones) {
                let _ = done.send(Ok(written.contains(&row.task_id)));
            }
        }
        Err(e) => {
            for done in dones {
                let _ = done.send(Err(same_error(&e)));
            }
        }
    }
}
