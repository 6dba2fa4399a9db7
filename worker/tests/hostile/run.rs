//! One hostile run on one broker: publish the cases with good jobs between them, let the worker
//! take them all, then account for every case and print the table.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde_json::{json, Map, Value};

use celerity_broker::{Broker, ResultBackend, State};
use celerity_client::{Client, SendOptions};
use celerity_testsupport::{demo_registry, InProcessWorker};
use celerity_worker::WorkerConfig;

use crate::gen::{Case, Expect, Gen, Payload, KINDS};

/// How the transport's raw cases are published.
pub enum Raw {
    None,
    Redis {
        conn: ::redis::aio::MultiplexedConnection,
        prefix: String,
    },
    Amqp(Box<crate::amqp::Raw>),
}

/// The worker's `max_message_size` (1 MiB): the huge bodies (5 MiB) are over it.
pub const WORKER_MAX_MESSAGE_SIZE: usize = 1024 * 1024;

/// `url` with the worker's `max_message_size` added to its options.
pub fn bounded(url: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}max_message_size={WORKER_MAX_MESSAGE_SIZE}")
}

pub struct Run {
    name: &'static str,
    /// Publishes the cases (no size limit of its own beyond the default).
    broker: Arc<dyn Broker>,
    /// The worker's: the same queues, with [`WORKER_MAX_MESSAGE_SIZE`].
    worker_broker: Arc<dyn Broker>,
    backend: Arc<dyn ResultBackend>,
    raw: Raw,
    queue: String,
    /// The worker's own dead-letter queue.
    dead: String,
    node: String,
}

/// How one case ended.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum End {
    DeadLettered,
    Failure(String),
    Success,
    Revoked,
    Lost,
}

impl Run {
    pub fn new(
        name: &'static str,
        [broker, worker_broker]: [Arc<dyn Broker>; 2],
        backend: Arc<dyn ResultBackend>,
        raw: Raw,
    ) -> Run {
        let queue = celerity_testsupport::unique("hostile");
        Run {
            name,
            broker,
            worker_broker,
            backend,
            raw,
            dead: format!("{queue}.dead"),
            queue,
            node: format!("{}@hostile", celerity_testsupport::unique("w")),
        }
    }

    /// `count` generated cases plus `extra` (the transport's raw ones), `count / 5` good jobs.
    pub async fn go(self, count: usize, seed: u64, extra: Vec<Case>) {
        let started = Instant::now();
        let mut g = Gen::new(
            seed,
            &format!("{}{}", self.name, &self.queue[self.queue.len() - 6..]),
        );
        let mut cases: Vec<Case> = g.huge();
        cases.push(g.one("deep-chain"));
        cases.push(g.one("deep-chain"));
        // `CELERITY_HOSTILE_KINDS=a,b` narrows a run to some kinds (`raw`: the transport's own).
        let only = std::env::var("CELERITY_HOSTILE_KINDS").unwrap_or_default();
        let wanted = |k: &str| only.is_empty() || only.split(',').any(|o| o == k);
        let plain: Vec<&'static str> = KINDS
            .iter()
            .copied()
            .filter(|k| *k != "deep-chain" && wanted(k))
            .collect();
        if !only.is_empty() {
            cases.clear();
        }
        while !plain.is_empty() && cases.len() + extra.len() < count {
            let kind = *g.rng.pick(&plain);
            cases.push(g.one(kind));
        }
        if wanted("raw") {
            cases.extend(extra);
        }
        // Shuffle (Fisher–Yates) so the huge and raw ones sit among the rest.
        for i in (1..cases.len()).rev() {
            let j = g.rng.below(i as u64 + 1) as usize;
            cases.swap(i, j);
        }

        self.broker.declare_queue(&self.queue).await.unwrap();
        let config = WorkerConfig {
            queues: vec![self.queue.clone()],
            concurrency: 8,
            hostname: self.node.clone(),
            grace: Duration::from_secs(10),
            dead_letter_queue: self.dead.clone(),
            ..WorkerConfig::default()
        };
        let worker = InProcessWorker::spawn(
            demo_registry(),
            self.worker_broker.clone(),
            Some(self.backend.clone()),
            config,
        );
        // Let it subscribe to pidbox before the control messages go out.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let client = Client::new(self.broker.clone(), Some(self.backend.clone()));
        let options = SendOptions::new().queue(&self.queue);
        let controls = crate::control::messages(&mut g.rng, &self.node, 64);
        let mut goods = Vec::new();
        for (i, case) in cases.iter().enumerate() {
            self.publish(case).await;
            if i % 5 == 0 {
                let good = g.good();
                let id = client
                    .send_task(
                        "demo.add",
                        vec![json!(good.a), json!(good.b)],
                        Map::new(),
                        &options,
                    )
                    .await
                    .unwrap()
                    .id()
                    .to_owned();
                goods.push((id, good.a + good.b));
            }
            if i % 16 == 0 {
                if let Some(c) = controls.get(i / 16) {
                    self.broker.broadcast("celery.pidbox", "", c).await.unwrap();
                }
            }
        }
        let published = started.elapsed();

        // Every good job returns its sum: the worker kept serving through all of it.
        let waits = goods
            .iter()
            .map(|(id, _)| self.backend.wait(id, Some(Duration::from_secs(40))));
        let metas = join_all(waits).await;
        for ((id, sum), meta) in goods.iter().zip(metas) {
            let meta = meta.unwrap_or_else(|e| panic!("good job {id} got no result: {e}"));
            assert_eq!(
                (meta.status, &meta.result),
                (State::Success, &json!(sum)),
                "good job {id}"
            );
        }
        // Then the queue drains: every hostile message was taken and settled (on Redis also the
        // envelopes taken but still on their way to the dead-letter list: stopping the worker
        // before that would leave them in `unacked` until a sweep, which is not lost but not
        // accounted for here either).
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut left = self.left().await;
        while left > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            left = self.left().await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let summary = worker.stop_within(Duration::from_secs(60)).await;
        assert!(summary.succeeded >= goods.len() as u64, "{summary:?}");

        // Account for every case.
        let dead = self.dead_letters().await;
        let mut table: BTreeMap<(&'static str, String), usize> = BTreeMap::new();
        let mut bad = Vec::new();
        let mut ids = Vec::new();
        for case in &cases {
            let end = self.end_of(case, &dead).await;
            if let Some(id) = &case.id {
                ids.push(id.clone());
            }
            let ok = match (&end, case.expect) {
                (End::Lost, _) => false,
                (End::DeadLettered, Expect::Refused | Expect::Tolerated) => true,
                (End::Failure(reason), Expect::Refused | Expect::Tolerated) => !reason.is_empty(),
                (End::Failure(reason), Expect::NotRegistered) => {
                    reason.starts_with("NotRegistered")
                }
                (End::Success | End::Revoked, Expect::Tolerated) => true,
                _ => false,
            };
            if !ok {
                let seen = self.where_is(&case.tag).await;
                bad.push(format!(
                    "{} {} {:?}: ended {end:?}{seen}",
                    case.kind, case.tag, case.id
                ));
            }
            let label = match &end {
                End::Failure(reason) => {
                    format!("FAILURE {}", reason.split(':').next().unwrap_or(""))
                }
                other => format!("{other:?}"),
            };
            *table.entry((case.kind, label)).or_default() += 1;
        }
        eprintln!(
            "\nhostile input on {} (seed {seed}): {} hostile messages, {} good jobs, {} control messages; published in {:.1?}, all done in {:.1?}; panics: {}",
            self.name,
            cases.len(),
            goods.len(),
            controls.len().min(cases.len() / 16 + 1),
            published,
            started.elapsed(),
            crate::panics()
        );
        eprintln!("{:<20} {:>6}  outcome", "kind", "count");
        for ((kind, end), n) in &table {
            eprintln!("{kind:<20} {n:>6}  {end}");
        }
        eprintln!("summary: {summary:?}");
        self.cleanup(&ids, &goods).await;
        eprintln!("left in the queue after 30 s: {left}");
        assert!(
            bad.is_empty(),
            "{} cases ended wrong:\n{}",
            bad.len(),
            bad.join("\n")
        );
        assert_eq!(crate::panics(), 0, "something panicked");
    }

    async fn publish(&self, case: &Case) {
        match (&case.payload, &self.raw) {
            (Payload::Message(m), _) => self.broker.publish(&self.queue, m).await.unwrap(),
            (Payload::RedisRaw(bytes), Raw::Redis { conn, prefix }) => {
                let mut conn = conn.clone();
                let key = format!("{prefix}{}", self.queue);
                let _: i64 = ::redis::cmd("LPUSH")
                    .arg(&key)
                    .arg(bytes)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
            }
            (Payload::Amqp(raw), Raw::Amqp(publisher)) => publisher.publish(&self.queue, raw).await,
            _ => panic!("{}: a raw case for another transport", case.kind),
        }
    }

    /// Tags found in the dead-letter queue (with the reason header) and, on Redis, the raw
    /// dead-letter list of the queue.
    async fn dead_letters(&self) -> HashMap<String, String> {
        let mut found = HashMap::new();
        match &self.raw {
            Raw::Amqp(publisher) => {
                for (tag, reason) in publisher.take_dead_letters(&self.dead).await {
                    found.insert(tag, reason);
                }
            }
            Raw::Redis { conn, prefix } => {
                // Read as it lies in Redis rather than consumed: a copy whose envelope our own
                // consumer cannot decode (a `body_encoding` of rot13 is kept as it came) would be
                // moved to yet another list by a consumer, and missed here.
                let items: Vec<Vec<u8>> = ::redis::cmd("LRANGE")
                    .arg(format!("{prefix}{}", self.dead))
                    .arg(0)
                    .arg(-1)
                    .query_async(&mut conn.clone())
                    .await
                    .unwrap();
                for item in items {
                    let envelope: Value = serde_json::from_slice(&item).unwrap_or_default();
                    let text = |k: &str| {
                        envelope["headers"]
                            .get(k)
                            .and_then(Value::as_str)
                            .map(str::to_owned)
                    };
                    if let (Some(tag), Some(reason)) =
                        (text("x-hostile"), text("x-celerity-dead-reason"))
                    {
                        found.insert(tag, reason);
                    }
                }
            }
            Raw::None => {
                let mut consumer = self
                    .broker
                    .consume(std::slice::from_ref(&self.dead), 64)
                    .await
                    .unwrap();
                while let Ok(Ok(Some(d))) =
                    tokio::time::timeout(Duration::from_secs(1), consumer.next()).await
                {
                    let text = |k: &str| {
                        d.message
                            .headers
                            .get(k)
                            .and_then(Value::as_str)
                            .map(str::to_owned)
                    };
                    if let (Some(tag), Some(reason)) =
                        (text("x-hostile"), text("x-celerity-dead-reason"))
                    {
                        found.insert(tag, reason);
                    }
                    d.ack().await.unwrap();
                }
                let _ = consumer.close().await;
            }
        }
        if let Raw::Redis { conn, prefix } = &self.raw {
            let mut conn = conn.clone();
            let key = format!("{prefix}{}.celerity.dead", self.queue);
            let items: Vec<Vec<u8>> = ::redis::cmd("LRANGE")
                .arg(&key)
                .arg(0)
                .arg(-1)
                .query_async(&mut conn)
                .await
                .unwrap();
            for item in items {
                let text = String::from_utf8_lossy(&item);
                // Tags are `<run>-h<n>.`; find each one in the raw bytes.
                let mut rest = &text[..];
                while let Some(at) = rest.find("-h") {
                    let start = text.len() - rest.len() + at;
                    let head = text[..start]
                        .rsplit(|c: char| !c.is_ascii_alphanumeric())
                        .next()
                        .unwrap_or("");
                    let tail = &text[start + 2..];
                    let digits: String = tail.chars().take_while(char::is_ascii_digit).collect();
                    if !digits.is_empty() && tail[digits.len()..].starts_with('.') {
                        found.insert(
                            format!("{head}-h{digits}."),
                            "redis dead-letter list (not a kombu envelope)".into(),
                        );
                    }
                    rest = &rest[at + 2..];
                }
            }
        }
        found
    }

    /// Where a case's tag still lies on Redis (for the failure message of a case that ended
    /// nowhere it should): the keys of the run's prefix whose contents hold it.
    async fn where_is(&self, tag: &str) -> String {
        let Raw::Redis { conn, prefix } = &self.raw else {
            return String::new();
        };
        let mut conn = conn.clone();
        let keys: Vec<String> = ::redis::cmd("KEYS")
            .arg(format!("{prefix}*"))
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        let mut found = Vec::new();
        for key in keys {
            let kind: String = ::redis::cmd("TYPE")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap_or_default();
            let mut cmd = match kind.as_str() {
                "list" => ::redis::cmd("LRANGE"),
                "hash" => ::redis::cmd("HGETALL"),
                "zset" => ::redis::cmd("ZRANGE"),
                "set" => ::redis::cmd("SMEMBERS"),
                _ => ::redis::cmd("GET"),
            };
            cmd.arg(&key);
            if kind == "list" || kind == "zset" {
                cmd.arg(0).arg(-1);
            }
            let values: Vec<Vec<u8>> = cmd.query_async(&mut conn).await.unwrap_or_default();
            let needle = tag.as_bytes();
            if values
                .iter()
                .any(|v| v.windows(needle.len()).any(|w| w == needle))
            {
                found.push(key);
            }
        }
        format!(" (on Redis in: {found:?})")
    }

    /// Messages still waiting in the queue or, on Redis, taken and not settled yet.
    async fn left(&self) -> u64 {
        let queued = self.broker.queue_len(&self.queue).await.unwrap();
        let held = match &self.raw {
            Raw::Redis { conn, prefix } => ::redis::cmd("HLEN")
                .arg(format!("{prefix}unacked"))
                .query_async::<u64>(&mut conn.clone())
                .await
                .unwrap(),
            _ => 0,
        };
        queued + held
    }

    async fn end_of(&self, case: &Case, dead: &HashMap<String, String>) -> End {
        // Over the worker's max_message_size: dead-lettered unparsed (its FAILURE, stored too,
        // only names the limit).
        if dead
            .get(&case.tag)
            .is_some_and(|reason| reason.contains("max_message_size"))
        {
            return End::DeadLettered;
        }
        if let Some(id) = &case.id {
            if let Ok(meta) = self.backend.get(id).await {
                match meta.status {
                    State::Failure => {
                        let exc = meta
                            .result
                            .get("exc_type")
                            .and_then(Value::as_str)
                            .unwrap_or("");
                        let msg = meta
                            .result
                            .get("exc_message")
                            .map(|m| m.to_string())
                            .unwrap_or_default();
                        return End::Failure(format!("{exc}: {msg}"));
                    }
                    State::Success => return End::Success,
                    State::Revoked => return End::Revoked,
                    _ => {}
                }
            }
        }
        match dead.get(&case.tag) {
            Some(reason) if !reason.is_empty() => End::DeadLettered,
            _ => End::Lost,
        }
    }

    async fn cleanup(&self, ids: &[String], goods: &[(String, i64)]) {
        for id in ids.iter().chain(goods.iter().map(|(id, _)| id)) {
            let _ = self.backend.forget(id).await;
        }
        let _ = self.broker.purge(&self.queue).await;
        let _ = self.broker.purge(&self.dead).await;
        if let Raw::Amqp(_) = self.raw {
            celerity_testsupport::delete_amqp_queue(&self.queue).await;
            celerity_testsupport::delete_amqp_queue(&self.dead).await;
        }
    }
}
