//! The `redis://` result backend, in Celery's format: Python's `AsyncResult(id).get()` reads what we
//! store, and we read what Celery stores.
//!
//! Layout (Celery 5.x `celery/backends/redis.py`): each task state is a JSON document
//! ([`TaskMeta::to_json`]) at `celery-task-meta-<id>`, written with `SETEX` (`SET` when
//! `result_expires=0`) and published on the channel of the same name. A write for a task whose stored
//! status is already `SUCCESS` is dropped; here the check, the write and the publish are one Lua
//! script, so the guard has no race. Writes made while one script call is in flight are grouped into
//! the next call ([`store_batch`]), each state still checked and published on its own. `global_keyprefix` goes in front of every key and channel.
//!
//! URL options: `global_keyprefix` (Celery's rule: `_` is appended unless it ends in one of `:_-.`),
//! `result_expires` (whole seconds, default 86400, 0 = never), `poll_interval` (seconds, default 1.0,
//! at most a day: how often a waiter reads the key in case a notification was missed), and on
//! `rediss://` the TLS options of [`crate::tls`] (`ssl_ca_certs`, `ssl_certfile`, `ssl_keyfile`,
//! `ssl_cert_reqs`, as Celery's Redis backend spells them).
//!
//! Waiting uses one shared pub/sub connection ([`listener`]); a waiter subscribes first and reads
//! second, so a result stored in between is never missed.

mod chord;
mod cluster;
mod listener;
mod store_batch;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::BoxFuture;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::redis::cluster::ReplicaAcks;
use crate::redis::{AnyConn, Redial};
use redis::{AsyncConnectionConfig, ErrorKind, Script, ServerErrorKind};
use tokio::time::Instant;

use super::{ChordJoin, ChordPart, ResultBackend, TaskMeta, DEFAULT_RESULT_EXPIRES};
use crate::error::{BrokerError, Result};
use crate::url::BrokerUrl;
use listener::Listener;

/// The options a result backend URL may carry.
const OPTIONS: &[&str] = &["global_keyprefix", "result_expires", "poll_interval"];
/// The longest `poll_interval` (a day): the clock must be able to count it from any now.
const MAX_POLL_INTERVAL: Duration = Duration::from_secs(86_400);
/// Celery's prefix of task result keys.
const TASK_KEYPREFIX: &str = "celery-task-meta-";
/// Time allowed to connect; an unreachable server fails `connect` within it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed for any one command (or pipeline) to be answered.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest document Redis accepts as a string value (Celery refuses larger ones too).
const MAX_VALUE_SIZE: usize = 512 * 1024 * 1024;
/// Most script calls in one pipeline of [`ResultBackend::store_many`].
const STORE_BATCH: usize = 1024;
const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// A connection to a Redis result backend.
pub struct RedisBackend {
    conn: AnyConn,
    /// On `redis+cluster://`: how many replicas each write waits for (see `cluster.rs`).
    cluster: Option<ReplicaAcks>,
    store_script: Script,
    /// `<global_keyprefix>celery-task-meta-`.
    task_prefix: String,
    /// Seconds a stored state lives; 0 = forever.
    expires: u64,
    poll_interval: Duration,
    listener: Listener,
    closed: AtomicBool,
    /// Groups the writes of concurrent `store` calls into one script call.
    writer: store_batch::StoreBatcher,
}

impl RedisBackend {
    /// Connects, failing within a few seconds with [`BrokerError::Connect`] if the server cannot be
    /// reached (or refuses our credentials).
    pub async fn connect(url: &BrokerUrl) -> Result<Self> {
        let cluster_options = if url.is_cluster() {
            crate::redis::cluster::CONN_OPTIONS
        } else {
            &[]
        };
        url.check_options(&[OPTIONS, crate::tls::OPTIONS, cluster_options].concat())?;
        let global_prefix = url.option::<String>("global_keyprefix")?;
        let expires = url
            .option::<u64>("result_expires")?
            .unwrap_or(DEFAULT_RESULT_EXPIRES.as_secs());
        let poll_interval = match url.option::<f64>("poll_interval")? {
            None => DEFAULT_POLL_INTERVAL,
            Some(s) => Duration::try_from_secs_f64(s)
                .ok()
                .filter(|d| !d.is_zero() && *d <= MAX_POLL_INTERVAL)
                .ok_or_else(|| BrokerError::InvalidUrl {
                    url: url.redacted(),
                    reason: format!(
                        "option `poll_interval={s}`: must be a positive number of seconds, at most {}",
                        MAX_POLL_INTERVAL.as_secs()
                    ),
                })?,
        };
        let store_script = Script::new(include_str!("scripts/store.lua"));
        let (conn, client, cluster) = if url.is_cluster() {
            let acks = ReplicaAcks::from_url(url)?;
            let conn = crate::redis::cluster::connect_cluster(url).await?;
            // The listener subscribes on a seed node (pub/sub spans the cluster), the next live
            // one when that node dies.
            let client = crate::redis::cluster::seed_dialer(url)?;
            (AnyConn::Cluster(conn), client, Some(acks))
        } else {
            let (conn, client) = Self::connect_single(url, &store_script).await?;
            (AnyConn::Single(conn), client, None)
        };
        tracing::debug!(url = %url.redacted(), expires, ?poll_interval, "redis result backend connected");
        Ok(RedisBackend {
            writer: store_batch::StoreBatcher::start(conn.clone(), expires, cluster),
            conn,
            cluster,
            store_script,
            task_prefix: format!(
                "{}{TASK_KEYPREFIX}",
                global_keyprefix(global_prefix.as_deref())
            ),
            expires,
            poll_interval,
            listener: Listener::new(client, url.redacted()),
            closed: AtomicBool::new(false),
        })
    }

    /// Connects to one server (probing it first), for [`RedisBackend::connect`].
    async fn connect_single(
        url: &BrokerUrl,
        store_script: &Script,
    ) -> Result<(Redial, crate::redis::sentinel::Dialer)> {
        let client = crate::redis::sentinel::Dialer::open(url, &client_url(url))?;
        let connect_error = |reason: String| BrokerError::Connect {
            url: url.redacted(),
            reason,
        };

        // Probe once, quickly: the connection manager below retries for a while before giving up.
        // Loading the script also checks the credentials and the database number.
        let probe = async {
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(CONNECT_TIMEOUT))
                .set_response_timeout(Some(CONNECT_TIMEOUT));
            let mut probe = client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            store_script.load_async(&mut probe).await
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, probe).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(connect_error(e.to_string())),
            Err(_) => {
                return Err(connect_error(format!(
                    "no answer within {CONNECT_TIMEOUT:?}"
                )))
            }
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_max_delay(Duration::from_secs(2));
        let master = client
            .client()
            .await
            .map_err(|e| connect_error(e.to_string()))?;
        let conn = match tokio::time::timeout(
            CONNECT_TIMEOUT,
            ConnectionManager::new_with_config(master.clone(), config.clone()),
        )
        .await
        {
            Ok(Ok(conn)) => Redial::new(client.clone(), &master, config, conn),
            Ok(Err(e)) => return Err(connect_error(e.to_string())),
            Err(_) => {
                return Err(connect_error(format!(
                    "no answer within {CONNECT_TIMEOUT:?}"
                )))
            }
        };
        Ok((conn, client))
    }

    /// The current states of many tasks in one round trip (`MGET`), in the order asked;
    /// `PENDING` for those with nothing stored.
    pub async fn get_many<S: AsRef<str>>(&self, task_ids: &[S]) -> Result<Vec<TaskMeta>> {
        self.check_open()?;
        if task_ids.is_empty() {
            return Ok(Vec::new());
        }
        if self.cluster.is_some() {
            // One GET per key, sent together: a multi-slot MGET fails whole while one master is
            // failing over, where single-key reads of the other masters still answer.
            let reads = task_ids.iter().map(|id| self.get(id.as_ref()));
            return futures_util::future::join_all(reads)
                .await
                .into_iter()
                .collect();
        }
        let keys: Vec<String> = task_ids
            .iter()
            .map(|id| self.task_key(id.as_ref()))
            .collect();
        let values: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut self.conn.clone())
            .await?;
        task_ids
            .iter()
            .zip(values)
            .map(|(id, value)| decode(id.as_ref(), value))
            .collect()
    }

    fn task_key(&self, task_id: &str) -> String {
        format!("{}{task_id}", self.task_prefix)
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            Err(BrokerError::Closed)
        } else {
            Ok(())
        }
    }

    /// The document to store for `meta`, refused if Redis could not hold it.
    fn encode(meta: &TaskMeta) -> Result<Vec<u8>> {
        let json = meta.to_json();
        if json.len() > MAX_VALUE_SIZE {
            return Err(BrokerError::Transport {
                transport: "redis",
                message: format!(
                    "result of task {} is {} bytes, more than Redis stores in one value",
                    meta.task_id,
                    json.len()
                ),
            });
        }
        Ok(json)
    }

    /// [`ResultBackend::wait`] once `sub` (the task key's channel) is registered with the listener.
    async fn wait_subscribed(
        &self,
        task_id: &str,
        timeout: Option<Duration>,
        mut sub: listener::Subscription,
    ) -> Result<TaskMeta> {
        // A timeout past what the clock can count is no deadline at all.
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        // Subscribed before the first read: whatever is stored after the read is pushed to us.
        // If the listener cannot subscribe in time, polling still finds the result.
        let _ = tokio::time::timeout_at(self.next_poll(deadline), sub.confirmed()).await;
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
            let poll_at = self.next_poll(deadline);
            let closed = sub.closed();
            tokio::pin!(closed);
            loop {
                tokio::select! {
                    payload = sub.next() => match payload {
                        Some(bytes) => match TaskMeta::from_json(task_id, &bytes) {
                            Ok(meta) if meta.status.is_ready() => return Ok(meta),
                            Ok(_) => {}
                            Err(e) => {
                                tracing::debug!(task_id, error = %e, "unreadable result notification, reading the key");
                                break;
                            }
                        },
                        None => break,
                    },
                    _ = tokio::time::sleep_until(poll_at) => break,
                    _ = &mut closed => return Err(BrokerError::Closed),
                }
            }
        }
    }

    /// When the waiter should next read the key itself: one poll interval from now, or the deadline.
    fn next_poll(&self, deadline: Option<Instant>) -> Instant {
        let at = Instant::now() + self.poll_interval;
        deadline.map_or(at, |d| d.min(at))
    }
}

#[async_trait]
impl ResultBackend for RedisBackend {
    fn backend(&self) -> &'static str {
        "redis"
    }

    async fn store(&self, meta: &TaskMeta) -> Result<()> {
        self.check_open()?;
        let json = Self::encode(meta)?;
        let stored = self
            .writer
            .store(self.task_key(&meta.task_id), json)
            .await?;
        if !stored {
            tracing::debug!(task_id = %meta.task_id, status = %meta.status, "result dropped: task already SUCCESS");
        }
        Ok(())
    }

    async fn store_many(&self, metas: &[TaskMeta]) -> Result<()> {
        self.check_open()?;
        if self.cluster.is_some() {
            // One pipeline may not cross slots: concurrent grouped writes instead.
            let stores = metas.iter().map(|m| self.store(m));
            for r in futures_util::future::join_all(stores).await {
                r?;
            }
            return Ok(());
        }
        let mut conn = self.conn.clone();
        for chunk in metas.chunks(STORE_BATCH) {
            let mut pipe = redis::pipe();
            for meta in chunk {
                pipe.cmd("EVALSHA")
                    .arg(self.store_script.get_hash())
                    .arg(1)
                    .arg(self.task_key(&meta.task_id))
                    .arg(self.expires)
                    .arg(Self::encode(meta)?);
            }
            match pipe.query_async::<Vec<i64>>(&mut conn).await {
                Ok(_) => {}
                // The server lost its script cache (restart, SCRIPT FLUSH): load it and run again.
                // Storing the same states twice is harmless.
                Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                    self.store_script.load_async(&mut conn).await?;
                    pipe.query_async::<Vec<i64>>(&mut conn).await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    async fn get(&self, task_id: &str) -> Result<TaskMeta> {
        self.check_open()?;
        let value: Option<Vec<u8>> = redis::cmd("GET")
            .arg(self.task_key(task_id))
            .query_async(&mut self.conn.clone())
            .await?;
        decode(task_id, value)
    }

    async fn get_many(&self, task_ids: &[String]) -> Result<Vec<TaskMeta>> {
        RedisBackend::get_many(self, task_ids).await
    }

    async fn wait(&self, task_id: &str, timeout: Option<Duration>) -> Result<TaskMeta> {
        self.check_open()?;
        let sub = self.listener.subscribe(&self.task_key(task_id))?;
        self.wait_subscribed(task_id, timeout, sub).await
    }

    async fn wait_after(
        &self,
        task_id: &str,
        timeout: Option<Duration>,
        publish: BoxFuture<'_, Result<()>>,
    ) -> Result<TaskMeta> {
        self.check_open()?;
        // Subscribed before the job is sent; the publish and the wait then run side by side.
        let sub = self.listener.subscribe(&self.task_key(task_id))?;
        let wait = self.wait_subscribed(task_id, timeout, sub);
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
        redis::cmd("DEL")
            .arg(self.task_key(task_id))
            .query_async::<()>(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        self.listener.close();
        Ok(())
    }

    async fn set_chord_size(&self, group_id: &str, size: usize) -> Result<()> {
        self.chord_set_size(group_id, size).await
    }

    async fn chord_part_return(&self, part: &ChordPart) -> Result<ChordJoin> {
        self.chord_part(part).await
    }

    async fn chord_done(&self, group_id: &str, claim: &str) -> Result<()> {
        self.chord_clear(group_id, claim).await
    }

    async fn save_group(&self, group_id: &str, task_ids: &[String]) -> Result<()> {
        self.group_save(group_id, task_ids).await
    }

    async fn restore_group(&self, group_id: &str) -> Result<Option<Vec<String>>> {
        self.group_restore(group_id).await
    }

    async fn forget_group(&self, group_id: &str) -> Result<()> {
        self.group_forget(group_id).await
    }
}

/// A stored value, or its absence, as a meta.
fn decode(task_id: &str, value: Option<Vec<u8>>) -> Result<TaskMeta> {
    match value {
        None => Ok(TaskMeta::pending(task_id)),
        Some(bytes) => TaskMeta::from_json(task_id, &bytes),
    }
}

/// Celery's `global_keyprefix` rule: `_` is appended unless the prefix ends in one of `:_-.`.
fn global_keyprefix(prefix: Option<&str>) -> String {
    match prefix {
        None | Some("") => String::new(),
        Some(p) if p.ends_with([':', '_', '-', '.']) => p.to_owned(),
        Some(p) => format!("{p}_"),
    }
}

/// The URL the `redis` crate understands: kombu's `redis+socket://` is its `unix://`.
fn client_url(url: &BrokerUrl) -> String {
    let raw = url.base.as_str();
    match raw.strip_prefix("redis+socket://") {
        Some(rest) => format!("unix://{rest}"),
        None => raw.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_keyprefix_follows_celery() {
        assert_eq!(global_keyprefix(None), "");
        assert_eq!(global_keyprefix(Some("")), "");
        assert_eq!(global_keyprefix(Some("app")), "app_");
        for p in ["app:", "app_", "app-", "app."] {
            assert_eq!(global_keyprefix(Some(p)), p);
        }
    }

    #[test]
    fn socket_urls_are_translated() {
        let u = BrokerUrl::parse("redis+socket:///tmp/redis.sock").unwrap();
        assert_eq!(client_url(&u), "unix:///tmp/redis.sock");
        let u = BrokerUrl::parse("redis://:pw@h:6380/2?result_expires=5").unwrap();
        assert_eq!(client_url(&u), "redis://:pw@h:6380/2");
    }
}
