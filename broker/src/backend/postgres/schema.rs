//! The tables of Celery 5.7's database backend, created as SQLAlchemy's `create_all` creates them on
//! PostgreSQL (same column types, sequences, constraints and index names), so Celery can use tables
//! we made and we can use tables Celery made.
//!
//! `celery_taskmeta` always has the `result_extended` columns (`name`, `args`, `kwargs`, `worker`,
//! `retries`, `queue`, `stamps`): Celery's models share one table definition. `id` has no default;
//! every insert takes `nextval` of `task_id_sequence` (`taskset_id_sequence` for groups), which
//! lives in the table's schema and keeps its name whatever the table is called — as do the index
//! names `ix_celery_taskmeta_date_done` / `ix_celery_tasksetmeta_date_done`.

use tokio_postgres::Client;

use super::pg_error;
use crate::error::{BrokerError, Result};

/// Celery's default table names.
const TASK_TABLE: &str = "celery_taskmeta";
const GROUP_TABLE: &str = "celery_tasksetmeta";
/// Columns every task table must have (all but `id` are nullable).
pub(super) const TASK_COLUMNS: &[&str] = &[
    "id",
    "task_id",
    "status",
    "result",
    "date_done",
    "traceback",
    "children",
    "name",
    "args",
    "kwargs",
    "worker",
    "retries",
    "queue",
    "stamps",
];
const GROUP_COLUMNS: &[&str] = &["id", "taskset_id", "result", "date_done"];
/// Serializes our own table creation across processes (an arbitrary constant).
const CREATE_LOCK: i64 = 0x6365_6c65_7279_7462;

/// The qualified, quoted names of the two tables and their sequences.
#[derive(Debug, Clone)]
pub(super) struct Tables {
    /// `"schema"."celery_taskmeta"` (or just `"celery_taskmeta"` without a schema).
    pub(super) task: String,
    pub(super) group: String,
    /// `"schema"."task_id_sequence"`: `nextval` of it numbers task rows.
    pub(super) task_seq: String,
    pub(super) group_seq: String,
    task_schema: Option<String>,
    task_name: String,
}

impl Tables {
    /// Names from the URL options; `None` for Celery's defaults. An empty or over-long name is an
    /// error message.
    pub(super) fn new(
        task_schema: Option<String>,
        task_name: Option<String>,
        group_schema: Option<String>,
        group_name: Option<String>,
    ) -> std::result::Result<Tables, String> {
        let task_name = task_name.unwrap_or_else(|| TASK_TABLE.into());
        let group_name = group_name.unwrap_or_else(|| GROUP_TABLE.into());
        for name in [
            Some(&task_name),
            Some(&group_name),
            task_schema.as_ref(),
            group_schema.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            // PostgreSQL truncates identifiers to 63 bytes; a truncated name would be another table.
            if name.is_empty() || name.len() > 63 || name.contains('\0') {
                return Err(format!(
                    "table and schema names must be 1 to 63 bytes without NUL, not {name:?}"
                ));
            }
        }
        let qualify = |schema: &Option<String>, name: &str| match schema {
            Some(s) => format!("{}.{}", ident(s), ident(name)),
            None => ident(name),
        };
        Ok(Tables {
            task: qualify(&task_schema, &task_name),
            group: qualify(&group_schema, &group_name),
            task_seq: qualify(&task_schema, "task_id_sequence"),
            group_seq: qualify(&group_schema, "taskset_id_sequence"),
            task_schema,
            task_name,
        })
    }

    /// The NOTIFY channel of the task table: the same for every process using the same table, and
    /// a valid channel name whatever the table is called.
    pub(super) fn channel(&self) -> String {
        let key = format!(
            "{}.{}",
            self.task_schema.as_deref().unwrap_or(""),
            self.task_name
        );
        let id = uuid::Uuid::new_v3(&uuid::Uuid::NAMESPACE_OID, key.as_bytes());
        format!("celerity_{}", id.simple())
    }

    /// Creates whatever is missing, as Celery would; checks that existing tables have every column
    /// Celery 5.7 writes. Tables that exist are never touched, so a role with only row privileges
    /// can use tables made by someone else.
    pub(super) async fn ensure(&self, client: &mut Client) -> Result<()> {
        if self.missing(client).await? {
            let tx = client.transaction().await.map_err(pg_error)?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&CREATE_LOCK])
                .await
                .map_err(pg_error)?;
            tx.batch_execute(&self.ddl()).await.map_err(pg_error)?;
            tx.commit().await.map_err(pg_error)?;
        }
        self.check_columns(client, &self.task, TASK_COLUMNS).await?;
        self.check_columns(client, &self.group, GROUP_COLUMNS).await
    }

    /// True if either table (or sequence) is missing.
    async fn missing(&self, client: &Client) -> Result<bool> {
        let row = client
            .query_one(
                "SELECT to_regclass($1) IS NULL OR to_regclass($2) IS NULL \
                 OR to_regclass($3) IS NULL OR to_regclass($4) IS NULL",
                &[&self.task, &self.group, &self.task_seq, &self.group_seq],
            )
            .await
            .map_err(pg_error)?;
        Ok(row.get(0))
    }

    /// SQLAlchemy's DDL for the two models on PostgreSQL, made idempotent.
    fn ddl(&self) -> String {
        // The index keeps the default table's name (SQLAlchemy names it when the model is defined);
        // it lands in the table's schema.
        let index_on = |table: &str, celery_name: &str| {
            format!(
                "CREATE INDEX IF NOT EXISTS {} ON {table} (date_done);",
                ident(&format!("ix_{celery_name}_date_done"))
            )
        };
        format!(
            "CREATE SEQUENCE IF NOT EXISTS {task_seq};
             CREATE TABLE IF NOT EXISTS {task} (
                id INTEGER NOT NULL,
                task_id VARCHAR(155),
                status VARCHAR(50),
                result BYTEA,
                date_done TIMESTAMP WITHOUT TIME ZONE,
                traceback TEXT,
                children BYTEA,
                name VARCHAR(155),
                args BYTEA,
                kwargs BYTEA,
                worker VARCHAR(155),
                retries INTEGER,
                queue VARCHAR(155),
                stamps BYTEA,
                PRIMARY KEY (id),
                UNIQUE (task_id)
             );
             {task_index}
             CREATE SEQUENCE IF NOT EXISTS {group_seq};
             CREATE TABLE IF NOT EXISTS {group} (
                id INTEGER NOT NULL,
                taskset_id VARCHAR(155),
                result BYTEA,
                date_done TIMESTAMP WITHOUT TIME ZONE,
                PRIMARY KEY (id),
                UNIQUE (taskset_id)
             );
             {group_index}",
            task_seq = self.task_seq,
            group_seq = self.group_seq,
            task = self.task,
            group = self.group,
            task_index = index_on(&self.task, TASK_TABLE),
            group_index = index_on(&self.group, GROUP_TABLE),
        )
    }

    /// Fails, naming them, if columns we write are missing (a table from an older Celery). Reads
    /// `pg_attribute`, which shows the columns whatever the role's privileges on the table.
    async fn check_columns(&self, client: &Client, table: &str, wanted: &[&str]) -> Result<()> {
        let rows = client
            .query(
                "SELECT attname::text FROM pg_catalog.pg_attribute \
                 WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped",
                &[&table],
            )
            .await
            .map_err(pg_error)?;
        let have: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        let missing: Vec<&str> = wanted
            .iter()
            .copied()
            .filter(|c| !have.iter().any(|h| h == c))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        Err(BrokerError::Transport {
            transport: "postgresql",
            message: format!(
                "table {table} lacks the column(s) {} that Celery 5.7 writes \
                 (a table from an older Celery: add them, nullable, or let Celery 5.7 migrate it)",
                missing.join(", ")
            ),
        })
    }
}

/// A quoted SQL identifier.
pub(super) fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// A quoted SQL string literal (`standard_conforming_strings` is on since PostgreSQL 9.1).
pub(super) fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_quoted_and_channels_stable() {
        let t = Tables::new(Some("a\"b".into()), None, None, Some("g's".into())).unwrap();
        assert_eq!(t.task, "\"a\"\"b\".\"celery_taskmeta\"");
        assert_eq!(t.group, "\"g's\"");
        assert_eq!(t.task_seq, "\"a\"\"b\".\"task_id_sequence\"");
        assert_eq!(literal("x'y"), "'x''y'");
        let again = Tables::new(Some("a\"b".into()), None, None, None).unwrap();
        assert_eq!(t.channel(), again.channel());
        assert!(t.channel().len() < 63);
        assert!(Tables::new(Some(String::new()), None, None, None).is_err());
    }
}
