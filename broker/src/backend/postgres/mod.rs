//! The PostgreSQL result backend, in the tables and formats of Celery 5.7's database backend
//! (`db+postgresql://…`): Python's `AsyncResult(id).get()` on a `db+postgresql://` app reads what
//! our workers store, and we read what Celery's workers store.
//!
//! URLs: `db+postgresql://user:pass@host[:port]/db` (Celery's SQLAlchemy spelling),
//! `postgresql://…` and `postgres://…`. Options (query string): `schema` (both tables; Celery's
//! `database_table_schemas`), `task_schema` / `group_schema` (each on its own), `taskmeta_table` /
//! `groupmeta_table` (Celery's `database_table_names`), `result_expires` (seconds, default 86400:
//! what [`PostgresBackend::cleanup`] deletes), `poll_interval` (seconds, default 1: the safety-net
//! read of a waiter), `connect_timeout` (seconds, default 5), `pool_size` (connections, default 8).
//! No TLS: the connection is plain TCP.
//!
//! - Tables: [`schema`] creates what is missing, exactly as SQLAlchemy would for Celery.
//! - Rows: [`codec`] (Celery's bytes; legacy pickled rows read as plain data only, never loaded).
//! - Writes: [`writer`] (one statement per batch, group commit of concurrent `store` calls).
//! - Waiting: [`listener`] (`LISTEN`/`NOTIFY` from the write statement, a slow poll as safety net).
//! - Chords: Celery's database backend has no native join (it polls with `celery.chord_unlock`);
//!   a chord sent with this backend is refused at send time ([`ResultBackend::set_chord_size`]),
//!   naming `redis://`. Header members of a Python-sent chord store their results as usual and
//!   leave the join to `celery.chord_unlock`, as Celery's own workers do.

mod codec;
mod config;
mod listener;
mod schema;
mod writer;

use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use futures_util::future::BoxFuture;
use serde_json::{json, Value};
use tokio::time::Instant;
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

use super::{ChordJoin, ChordPart, ResultBackend, TaskMeta};
use crate::error::{BrokerError, Result};
use crate::pyjson;
use crate::url::BrokerUrl;
use codec::{meta_from_row, TaskRow, SELECT_COLUMNS};
use config::PgSettings;
use schema::Tables;

/// A connection pool to a PostgreSQL result backend.
pub struct PostgresBackend {
    pool: Pool,
    tables: Tables,
    /// The statement of [`writer::upsert_sql`].
    upsert: String,
    channel: String,
    writer: writer::Writer,
    listener: listener::Listener,
    expires: Duration,
    poll_interval: Duration,
    closed: CancellationToken,
}

impl PostgresBackend {
    /// Connects, creating Celery's tables if they are missing; fails within `connect_timeout` with
    /// [`BrokerError::Connect`] if the server cannot be reached or refuses us.
    pub async fn connect(url: &BrokerUrl) -> Result<Self> {
        let settings = PgSettings::from_url(url)?;
        let connect_error = |reason: String| BrokerError::Connect {
            url: url.redacted(),
            reason,
        };
        let manager = Manager::from_config(
            settings.pg.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(settings.pool_size)
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(settings.connect_timeout))
            .build()
            .map_err(|e| connect_error(e.to_string()))?;
        let mut client = match tokio::time::timeout(settings.connect_timeout, pool.get()).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => return Err(connect_error(pool_error(e).to_string())),
            Err(_) => {
                return Err(connect_error(format!(
                    "no answer within {:?}",
                    settings.connect_timeout
                )))
            }
        };
        settings
            .tables
            .ensure(&mut client)
            .await
            .map_err(|e| connect_error(e.to_string()))?;
        drop(client);
        let channel = settings.tables.channel();
        let upsert = writer::upsert_sql(&settings.tables);
        tracing::debug!(url = %url.redacted(), tables = ?settings.tables, "postgresql result backend connected");
        Ok(PostgresBackend {
            writer: writer::Writer::start(
                pool.clone(),
                upsert.clone(),
                channel.clone(),
                (settings.pool_size / 2).max(1),
            ),
            listener: listener::Listener::new(settings.pg, channel.clone()),
            pool,
            tables: settings.tables,
            upsert,
            channel,
            expires: settings.expires,
            poll_interval: settings.poll_interval,
            closed: CancellationToken::new(),
        })
    }

    /// Celery's `backend_cleanup`: deletes task and group rows whose `date_done` is older than
    /// `result_expires` (nothing when it is 0). Returns how many task and group rows went.
    /// Every worker process runs it once an hour (the worker's janitor, `worker/src/janitor.rs`).
    pub async fn cleanup(&self) -> Result<(u64, u64)> {
        self.check_open()?;
        if self.expires.is_zero() {
            return Ok((0, 0));
        }
        let expires = chrono::Duration::from_std(self.expires).map_err(|_| {
            BrokerError::malformed("result_expires is too large to subtract from now")
        })?;
        let before = Utc::now()
            .naive_utc()
            .checked_sub_signed(expires)
            .unwrap_or(chrono::NaiveDateTime::MIN);
        let client = self.pool.get().await.map_err(pool_error)?;
        let tasks = client
            .execute(
                &format!("DELETE FROM {} WHERE date_done < $1", self.tables.task),
                &[&before],
            )
            .await
            .map_err(pg_error)?;
        let groups = client
            .execute(
                &format!("DELETE FROM {} WHERE date_done < $1", self.tables.group),
                &[&before],
            )
            .await
            .map_err(pg_error)?;
        Ok((tasks, groups))
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.is_cancelled() {
            Err(BrokerError::Closed)
        } else {
            Ok(())
        }
    }

    /// [`ResultBackend::wait`] once `watch` (the task's notifications) is registered.
    async fn wait_watched(
        &self,
        task_id: &str,
        timeout: Option<Duration>,
        mut watch: listener::Watch,
    ) -> Result<TaskMeta> {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        // Listening before the first read: whatever commits after the read wakes us. If the
        // listener cannot connect in time, the poll still finds the result.
        self.listener
            .ready(self.poll_interval.min(Duration::from_secs(1)))
            .await;
        loop {
            match self.get(task_id).await {
                Ok(meta) if meta.status.is_ready() => return Ok(meta),
                Ok(_) => {}
                Err(e) if e.is_connection() => {
                    tracing::warn!(task_id, error = %e, "waiting for a result: read failed, will retry");
                }
                Err(e) => return Err(e),
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(BrokerError::Timeout(timeout.unwrap_or_default()));
            }
            let at = Instant::now() + self.poll_interval;
            let poll_at = deadline.map_or(at, |d| d.min(at));
            tokio::select! {
                _ = watch.changed() => {}
                _ = tokio::time::sleep_until(poll_at) => {}
                _ = self.closed.cancelled() => return Err(BrokerError::Closed),
            }
        }
    }
}

#[async_trait]
impl ResultBackend for PostgresBackend {
    fn backend(&self) -> &'static str {
        "postgresql"
    }

    async fn cleanup(&self) -> Result<u64> {
        let (tasks, groups) = PostgresBackend::cleanup(self).await?;
        Ok(tasks.saturating_add(groups))
    }

    async fn store(&self, meta: &TaskMeta) -> Result<()> {
        self.check_open()?;
        let row = TaskRow::from_meta(meta)?;
        if !self.writer.store(row).await? {
            tracing::debug!(task_id = %meta.task_id, status = %meta.status, "result dropped: task already SUCCESS");
        }
        Ok(())
    }

    async fn store_many(&self, metas: &[TaskMeta]) -> Result<()> {
        self.check_open()?;
        let rows = metas
            .iter()
            .map(TaskRow::from_meta)
            .collect::<Result<Vec<_>>>()?;
        for chunk in rows.chunks(writer::MAX_BATCH) {
            writer::write_rows(&self.pool, &self.upsert, &self.channel, chunk).await?;
        }
        Ok(())
    }

    async fn get(&self, task_id: &str) -> Result<TaskMeta> {
        self.check_open()?;
        let client = self.pool.get().await.map_err(pool_error)?;
        let sql = format!(
            "SELECT {SELECT_COLUMNS} FROM {} WHERE task_id = $1",
            self.tables.task
        );
        let stmt = client.prepare_cached(&sql).await.map_err(pg_error)?;
        match client
            .query_opt(&stmt, &[&task_id])
            .await
            .map_err(pg_error)?
        {
            None => Ok(TaskMeta::pending(task_id)),
            Some(row) => meta_from_row(task_id, &row),
        }
    }

    async fn get_many(&self, task_ids: &[String]) -> Result<Vec<TaskMeta>> {
        self.check_open()?;
        if task_ids.is_empty() {
            return Ok(Vec::new());
        }
        let client = self.pool.get().await.map_err(pool_error)?;
        let sql = format!(
            "SELECT {SELECT_COLUMNS} FROM {} WHERE task_id = ANY($1)",
            self.tables.task
        );
        let stmt = client.prepare_cached(&sql).await.map_err(pg_error)?;
        let rows = client.query(&stmt, &[&task_ids]).await.map_err(pg_error)?;
        let mut found = std::collections::HashMap::with_capacity(rows.len());
        for row in &rows {
            let id: String = row.try_get(0).map_err(pg_error)?;
            found.insert(id, row);
        }
        task_ids
            .iter()
            .map(|id| match found.get(id) {
                Some(row) => meta_from_row(id, row),
                None => Ok(TaskMeta::pending(id.as_str())),
            })
            .collect()
    }

    async fn wait(&self, task_id: &str, timeout: Option<Duration>) -> Result<TaskMeta> {
        self.check_open()?;
        let watch = self.listener.watch(task_id);
        self.wait_watched(task_id, timeout, watch).await
    }

    async fn wait_after(
        &self,
        task_id: &str,
        timeout: Option<Duration>,
        publish: BoxFuture<'_, Result<()>>,
    ) -> Result<TaskMeta> {
        self.check_open()?;
        let watch = self.listener.watch(task_id);
        let wait = self.wait_watched(task_id, timeout, watch);
        tokio::pin!(wait, publish);
        let mut published = false;
        loop {
            tokio::select! {
                biased;
                sent = &mut publish, if !published => {
                    sent?;
                    published = true;
                }
                meta = &mut wait => return meta,
            }
        }
    }

    async fn forget(&self, task_id: &str) -> Result<()> {
        self.check_open()?;
        let client = self.pool.get().await.map_err(pool_error)?;
        client
            .execute(
                &format!("DELETE FROM {} WHERE task_id = $1", self.tables.task),
                &[&task_id],
            )
            .await
            .map_err(pg_error)?;
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        self.closed.cancel();
        self.listener.close();
        self.pool.close();
        Ok(())
    }

    async fn set_chord_size(&self, group_id: &str, _size: usize) -> Result<()> {
        Err(BrokerError::Transport {
            transport: "postgresql",
            message: format!(
                "chord {group_id} refused before sending: the PostgreSQL result backend has no \
                 chord join (Celery's polls with celery.chord_unlock); use a redis:// result \
                 backend for chords"
            ),
        })
    }

    async fn chord_part_return(&self, part: &ChordPart) -> Result<ChordJoin> {
        // A Python-sent chord on Celery's database backend is joined by `celery.chord_unlock`,
        // which reads the members' rows; nothing to count here (Celery's `on_chord_part_return`
        // is a no-op on this backend too).
        tracing::debug!(group_id = %part.group_id, task_id = %part.task_id, "chord member stored; the join is celery.chord_unlock's");
        Ok(ChordJoin::Waiting { ready: 0 })
    }

    async fn chord_done(&self, _group_id: &str, _claim: &str) -> Result<()> {
        Ok(())
    }

    async fn save_group(&self, group_id: &str, task_ids: &[String]) -> Result<()> {
        self.check_open()?;
        let children: Vec<Value> = task_ids
            .iter()
            .map(|id| json!([[id, null], null]))
            .collect();
        let value = pyjson::to_vec(&json!([[group_id, null], children]));
        let client = self.pool.get().await.map_err(pool_error)?;
        client
            .execute(
                &format!(
                    "INSERT INTO {} (id, taskset_id, result, date_done) \
                     VALUES (nextval({}), $1, $2, $3) \
                     ON CONFLICT (taskset_id) DO UPDATE SET result = EXCLUDED.result, \
                     date_done = EXCLUDED.date_done",
                    self.tables.group,
                    schema::literal(&self.tables.group_seq)
                ),
                &[&group_id, &value, &Utc::now().naive_utc()],
            )
            .await
            .map_err(pg_error)?;
        Ok(())
    }

    async fn restore_group(&self, group_id: &str) -> Result<Option<Vec<String>>> {
        self.check_open()?;
        let client = self.pool.get().await.map_err(pool_error)?;
        let row = client
            .query_opt(
                &format!(
                    "SELECT result FROM {} WHERE taskset_id = $1",
                    self.tables.group
                ),
                &[&group_id],
            )
            .await
            .map_err(pg_error)?;
        let Some(row) = row else { return Ok(None) };
        let Some(bytes) = row.try_get::<_, Option<Vec<u8>>>(0).map_err(pg_error)? else {
            return Ok(None);
        };
        let value = codec::decode_column(group_id, "result", &bytes)?;
        let doc = pyjson::to_vec(&json!({ "result": value }));
        super::chord::parse_group_document(group_id, &doc).map(Some)
    }

    async fn forget_group(&self, group_id: &str) -> Result<()> {
        self.check_open()?;
        let client = self.pool.get().await.map_err(pool_error)?;
        client
            .execute(
                &format!("DELETE FROM {} WHERE taskset_id = $1", self.tables.group),
                &[&group_id],
            )
            .await
            .map_err(pg_error)?;
        Ok(())
    }
}

/// A PostgreSQL error in words: the server's severity, code, message and hint when it has them.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
            if let Some(detail) = db.detail() {
                s.push_str(&format!(" ({detail})"));
            }
            if db.code() == &SqlState::INSUFFICIENT_PRIVILEGE {
                s.push_str(
                    " — the role needs SELECT, INSERT, UPDATE, DELETE on the result tables, \
                     USAGE on their sequences and on their schema",
                );
            }
            s
        }
        None => {
            let mut s = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(inner) = source {
                s.push_str(&format!(": {inner}"));
                source = inner.source();
            }
            s
        }
    }
}

/// A [`tokio_postgres::Error`] as ours: connection trouble is [`BrokerError::ConnectionLost`]
/// (worth retrying), a server error [`BrokerError::Transport`].
fn pg_error(e: tokio_postgres::Error) -> BrokerError {
    let retry = e.is_closed()
        || match e.code() {
            None => e.as_db_error().is_none(),
            Some(code) => {
                code.code().starts_with("08")
                    || *code == SqlState::ADMIN_SHUTDOWN
                    || *code == SqlState::CRASH_SHUTDOWN
                    || *code == SqlState::CANNOT_CONNECT_NOW
                    || *code == SqlState::T_R_DEADLOCK_DETECTED
                    || *code == SqlState::T_R_SERIALIZATION_FAILURE
            }
        };
    if retry {
        BrokerError::ConnectionLost(format!("postgresql: {}", describe(&e)))
    } else {
        BrokerError::Transport {
            transport: "postgresql",
            message: describe(&e),
        }
    }
}

/// A pool error as ours (no connection within the timeout is a connection error).
fn pool_error(e: PoolError) -> BrokerError {
    match e {
        PoolError::Backend(e) => match pg_error(e) {
            BrokerError::Transport { message, .. } => {
                BrokerError::ConnectionLost(format!("postgresql: {message}"))
            }
            other => other,
        },
        PoolError::Closed => BrokerError::Closed,
        other => BrokerError::ConnectionLost(format!("postgresql: {other}")),
    }
}

/// The same error again, for another caller of a batch (`BrokerError` is not `Clone`).
fn same_error(e: &BrokerError) -> BrokerError {
    match e {
        BrokerError::ConnectionLost(m) => BrokerError::ConnectionLost(m.clone()),
        BrokerError::Closed => BrokerError::Closed,
        BrokerError::Transport { transport, message } => BrokerError::Transport {
            transport,
            message: message.clone(),
        },
        other if other.is_connection() => BrokerError::ConnectionLost(other.to_string()),
        other => BrokerError::Transport {
            transport: "postgresql",
            message: other.to_string(),
        },
    }
}
