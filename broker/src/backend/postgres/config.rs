//! What a `db+postgresql://` / `postgresql://` / `postgres://` URL says: where to connect, which
//! tables to use (Celery's `database_table_names` / `database_table_schemas`), and the backend's
//! own options. The password never leaves [`tokio_postgres::Config`]; errors quote the URL redacted.

use std::time::Duration;

use super::schema::Tables;
use crate::backend::DEFAULT_RESULT_EXPIRES;
use crate::error::{BrokerError, Result};
use crate::url::{percent_decode, BrokerUrl};

/// The options a PostgreSQL backend URL may carry.
pub(super) const OPTIONS: &[&str] = &[
    "schema",
    "task_schema",
    "group_schema",
    "taskmeta_table",
    "groupmeta_table",
    "result_expires",
    "poll_interval",
    "connect_timeout",
    "pool_size",
];

const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);
const MAX_POLL_INTERVAL: Duration = Duration::from_secs(86_400);
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_POOL_SIZE: usize = 8;

/// Everything the backend needs from its URL.
pub(super) struct PgSettings {
    pub(super) pg: tokio_postgres::Config,
    pub(super) tables: Tables,
    /// Seconds a ready result is kept before [`super::PostgresBackend::cleanup`] deletes it.
    pub(super) expires: Duration,
    pub(super) poll_interval: Duration,
    pub(super) connect_timeout: Duration,
    pub(super) pool_size: usize,
}

impl PgSettings {
    /// Reads a parsed URL; an unknown option or a bad value is [`BrokerError::InvalidUrl`].
    pub(super) fn from_url(url: &BrokerUrl) -> Result<Self> {
        url.check_options(OPTIONS)?;
        let invalid = |reason: String| BrokerError::InvalidUrl {
            url: url.redacted(),
            reason,
        };
        let mut pg = tokio_postgres::Config::new();
        let host = url
            .base
            .host_str()
            .filter(|h| !h.is_empty())
            .unwrap_or("localhost");
        // `[::1]` is how a URL writes an IPv6 address; libpq's host is the bare address.
        pg.host(host.trim_start_matches('[').trim_end_matches(']'));
        pg.port(url.base.port().unwrap_or(5432));
        let user = percent_decode(url.base.username())
            .ok_or_else(|| invalid("the user name has a bad %-escape".into()))?;
        pg.user(if user.is_empty() { "postgres" } else { &user });
        if let Some(pw) = url.base.password() {
            let pw = percent_decode(pw)
                .ok_or_else(|| invalid("the password has a bad %-escape".into()))?;
            pg.password(pw);
        }
        let db = percent_decode(url.base.path().trim_start_matches('/'))
            .ok_or_else(|| invalid("the database name has a bad %-escape".into()))?;
        if !db.is_empty() {
            pg.dbname(&db);
        }
        pg.application_name("celerity");
        let connect_timeout = positive_secs(url, "connect_timeout", DEFAULT_CONNECT_TIMEOUT)?;
        pg.connect_timeout(connect_timeout);

        let schema = url.option::<String>("schema")?;
        let task_schema = url.option::<String>("task_schema")?.or(schema.clone());
        let group_schema = url.option::<String>("group_schema")?.or(schema);
        let tables = Tables::new(
            task_schema,
            url.option::<String>("taskmeta_table")?,
            group_schema,
            url.option::<String>("groupmeta_table")?,
        )
        .map_err(invalid)?;
        let expires = url
            .option::<u64>("result_expires")?
            .map_or(DEFAULT_RESULT_EXPIRES, Duration::from_secs);
        let poll_interval = positive_secs(url, "poll_interval", DEFAULT_POLL_INTERVAL)?;
        let pool_size = match url.option::<usize>("pool_size")? {
            None => DEFAULT_POOL_SIZE,
            Some(n) if (1..=256).contains(&n) => n,
            Some(n) => return Err(invalid(format!("option `pool_size={n}`: must be 1 to 256"))),
        };
        Ok(PgSettings {
            pg,
            tables,
            expires,
            poll_interval,
            connect_timeout,
            pool_size,
        })
    }
}

/// A duration option in (fractional) seconds: positive, at most a day.
fn positive_secs(url: &BrokerUrl, name: &str, default: Duration) -> Result<Duration> {
    match url.option::<f64>(name)? {
        None => Ok(default),
        Some(s) => Duration::try_from_secs_f64(s)
            .ok()
            .filter(|d| !d.is_zero() && *d <= MAX_POLL_INTERVAL)
            .ok_or_else(|| BrokerError::InvalidUrl {
                url: url.redacted(),
                reason: format!(
                    "option `{name}={s}`: must be a positive number of seconds, at most {}",
                    MAX_POLL_INTERVAL.as_secs()
                ),
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_celery_style_urls() {
        let u = BrokerUrl::parse(
            "db+postgresql://alice:s%40cret@db.example:6543/results?schema=app&taskmeta_table=t",
        )
        .unwrap();
        let s = PgSettings::from_url(&u).unwrap();
        assert_eq!(s.pg.get_user(), Some("alice"));
        assert_eq!(s.pg.get_password(), Some(&b"s@cret"[..]));
        assert_eq!(s.pg.get_dbname(), Some("results"));
        assert_eq!(s.pg.get_ports(), &[6543]);
        assert_eq!(s.tables.task, "\"app\".\"t\"");
        assert_eq!(s.tables.group, "\"app\".\"celery_tasksetmeta\"");
        assert!(!u.redacted().contains("cret"));
        let bad = BrokerUrl::parse("postgresql://h/db?sslmode=require").unwrap();
        let e = PgSettings::from_url(&bad).err().unwrap().to_string();
        assert!(e.contains("unknown option `sslmode`"), "{e}");
        let bad = BrokerUrl::parse("postgres://h/db?poll_interval=0").unwrap();
        assert!(PgSettings::from_url(&bad).is_err());
    }
}
