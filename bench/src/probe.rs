//! Looking at the broker from outside the worker: is a worker consuming, is the queue drained, are
//! all results stored (and right)? The same probes serve both systems, so both are timed alike.

use std::time::{Duration, Instant, SystemTime};

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use redis::AsyncCommands as _;
use serde_json::Value;

use celerity_broker::{connect_backend, ResultBackend, State};

use crate::error::{BenchError, Result};
use crate::setup::{BrokerKind, Setup, REDIS_URL};

/// How often a drain or results probe looks.
const POLL: Duration = Duration::from_millis(2);

/// Watches one queue of one setup.
pub struct Probe {
    setup: Setup,
    queue: String,
    redis: redis::aio::MultiplexedConnection,
    amqp: Option<lapin::Connection>,
}

impl Probe {
    pub async fn connect(setup: &Setup, queue: &str) -> Result<Probe> {
        let client = redis::Client::open(REDIS_URL)?;
        let redis = client.get_multiplexed_async_connection().await?;
        let amqp = match setup.broker {
            BrokerKind::Redis => None,
            BrokerKind::Amqp => Some(
                lapin::Connection::connect(
                    crate::setup::AMQP_URL,
                    lapin::ConnectionProperties::default(),
                )
                .await?,
            ),
        };
        Ok(Probe {
            setup: setup.clone(),
            queue: queue.to_owned(),
            redis,
            amqp,
        })
    }

    /// (messages waiting, consumers) on RabbitMQ; `None` while the queue does not exist (or the look
    /// failed: the next look uses a new connection).
    async fn amqp_counts(&mut self) -> Result<Option<(u32, u32)>> {
        let Some(conn) = &self.amqp else {
            return Ok(None);
        };
        // A passive declare of a missing queue closes the channel, so each look gets its own.
        let channel = match conn.create_channel().await {
            Ok(c) => c,
            Err(_) => {
                self.amqp = Some(
                    lapin::Connection::connect(
                        crate::setup::AMQP_URL,
                        lapin::ConnectionProperties::default(),
                    )
                    .await?,
                );
                return Ok(None);
            }
        };
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let out = match channel
            .queue_declare(self.queue.as_str().into(), passive, FieldTable::default())
            .await
        {
            Ok(q) => Some((q.message_count(), q.consumer_count())),
            Err(_) => None,
        };
        let _ = channel.close(200, "".into()).await;
        Ok(out)
    }

    /// Messages not yet finished with: on Redis the queue plus kombu's `unacked` hash (this run's
    /// prefix); on RabbitMQ the ready count (deliveries in flight, at most the prefetch window, are
    /// not visible without the management plugin).
    pub async fn outstanding(&mut self) -> Result<u64> {
        match self.setup.broker {
            BrokerKind::Redis => {
                let p = &self.setup.prefix;
                let queued: u64 = self.redis.llen(format!("{p}{}", self.queue)).await?;
                let unacked: u64 = self.redis.hlen(format!("{p}unacked")).await?;
                Ok(queued + unacked)
            }
            BrokerKind::Amqp => Ok(self.amqp_counts().await?.map_or(0, |(m, _)| u64::from(m))),
        }
    }

    /// Waits until a worker consumes the queue (RabbitMQ: a consumer is attached; Redis: nothing to
    /// see, the warm-up job tells).
    pub async fn wait_consumer(&mut self, timeout: Duration) -> Result<()> {
        if self.setup.broker == BrokerKind::Redis {
            return Ok(());
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((_, consumers)) = self.amqp_counts().await? {
                if consumers > 0 {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(BenchError::Timeout(format!(
                    "no consumer on {} after {timeout:?}",
                    self.queue
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until nothing is outstanding; returns when that was seen. Fails if no progress is
    /// made for `stall`.
    pub async fn wait_drained(&mut self, stall: Duration) -> Result<SystemTime> {
        let mut last = u64::MAX;
        let mut moved = Instant::now();
        loop {
            let n = self.outstanding().await?;
            if n == 0 {
                return Ok(SystemTime::now());
            }
            if n != last {
                last = n;
                moved = Instant::now();
            } else if moved.elapsed() > stall {
                return Err(BenchError::Timeout(format!(
                    "{} still has {n} messages after {stall:?} without progress",
                    self.queue
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Closes the connection, deleting nothing.
    pub async fn close(self) {
        if let Some(conn) = &self.amqp {
            let _ = conn.close(200, "".into()).await;
        }
    }

    /// Deletes what this queue left on the broker.
    pub async fn cleanup(&self) {
        if let Some(conn) = &self.amqp {
            if let Ok(ch) = conn.create_channel().await {
                let _ = ch
                    .queue_delete(self.queue.as_str().into(), Default::default())
                    .await;
                let _ = ch
                    .exchange_delete(self.queue.as_str().into(), Default::default())
                    .await;
                let _ = ch.close(200, "".into()).await;
            }
            let _ = conn.close(200, "".into()).await;
        }
    }
}

/// Deletes every key of the local Redis (db 0) that starts with `prefix` (a run's own prefix).
pub async fn delete_prefix(prefix: &str) -> Result<()> {
    if prefix.is_empty() {
        return Err(BenchError::Setup("refusing to delete every key".into()));
    }
    let client = redis::Client::open(REDIS_URL)?;
    let mut c = client.get_multiplexed_async_connection().await?;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut c)
        .await?;
    for chunk in keys.chunks(1000) {
        let _: () = redis::cmd("DEL").arg(chunk).query_async(&mut c).await?;
    }
    Ok(())
}

/// Reads results of one setup's backend.
pub struct Results {
    backend: std::sync::Arc<dyn ResultBackend>,
}

impl Results {
    pub async fn connect(setup: &Setup) -> Result<Results> {
        let url = setup
            .backend_url()
            .ok_or_else(|| BenchError::Setup("this setup stores no results".into()))?;
        Ok(Results {
            backend: connect_backend(&url).await?,
        })
    }

    /// Waits until every id has a ready result, then checks each against `expect(i)` and returns the
    /// latest `date_done` (the last finish). Fails if nothing new finishes for `stall`.
    pub async fn wait_all(
        &self,
        ids: &[String],
        expect: impl Fn(usize) -> Value,
        stall: Duration,
    ) -> Result<SystemTime> {
        // Jobs finish roughly in order: walk a cursor forward over the id list.
        let mut cursor = 0;
        let mut moved = Instant::now();
        while cursor < ids.len() {
            let end = (cursor + 500).min(ids.len());
            let metas = self.backend.get_many(&ids[cursor..end]).await?;
            let ready = metas.iter().take_while(|m| m.status.is_ready()).count();
            if ready > 0 {
                cursor += ready;
                moved = Instant::now();
                continue;
            }
            if moved.elapsed() > stall {
                return Err(BenchError::Timeout(format!(
                    "{} of {} results after {stall:?} without progress",
                    cursor,
                    ids.len()
                )));
            }
            tokio::time::sleep(POLL).await;
        }
        let mut last = SystemTime::UNIX_EPOCH;
        for (c, chunk) in ids.chunks(1000).enumerate() {
            let metas = self.backend.get_many(chunk).await?;
            for (j, meta) in metas.into_iter().enumerate() {
                let i = c * 1000 + j;
                let want = expect(i);
                if meta.status != State::Success || meta.result != want {
                    return Err(BenchError::Check(format!(
                        "job {i} ({}): {} {} (expected {want})",
                        meta.task_id, meta.status, meta.result
                    )));
                }
                if let Some(done) = meta.date_done {
                    last = last.max(SystemTime::from(done));
                }
            }
        }
        if last == SystemTime::UNIX_EPOCH {
            last = SystemTime::now();
        }
        Ok(last)
    }

    pub async fn close(&self) {
        let _ = self.backend.close().await;
    }
}
