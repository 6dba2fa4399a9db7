//! Beat against the real local Redis: firing, one leader among several, handover, restart and
//! catch-up, fencing, and clear errors. Each test has its own `global_keyprefix` and cleans up.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use chrono::{Datelike, TimeZone, Utc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use celerity_beat::state::{Recorded, Store};
use celerity_beat::{check, run_beat, BeatArgs, BeatError};
use celerity_broker::testkit::delete_redis_prefix;
use celerity_client::cli::ConnectionArgs;

const QUEUE: &str = "beatq";

struct Env {
    prefix: String,
    url: String,
    file: PathBuf,
    redis: redis::aio::MultiplexedConnection,
}

impl Env {
    async fn new(schedule: &str) -> Env {
        let id = uuid::Uuid::new_v4();
        let prefix = format!("beat-test-{id}:");
        let file = std::env::temp_dir().join(format!("celerity-beat-{id}.toml"));
        std::fs::write(&file, schedule).unwrap();
        let redis = redis::Client::open("redis://127.0.0.1:6379/0")
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        Env {
            url: format!("redis://127.0.0.1:6379/0?global_keyprefix={prefix}"),
            prefix,
            file,
            redis,
        }
    }

    fn start(&self, lease: f64) -> (JoinHandle<Result<(), BeatError>>, CancellationToken) {
        let args = BeatArgs {
            schedule: Some(self.file.clone()),
            check: None,
            lease,
        };
        let conn = ConnectionArgs {
            broker: self.url.clone(),
            backend: None,
        };
        let token = CancellationToken::new();
        let t = token.clone();
        (
            tokio::spawn(async move { run_beat(&args, &conn, t).await }),
            token,
        )
    }

    /// Task ids of the messages waiting in the queue.
    async fn sent_ids(&self) -> Vec<String> {
        let raw: Vec<String> = redis::cmd("LRANGE")
            .arg(format!("{}{QUEUE}", self.prefix))
            .arg(0)
            .arg(-1)
            .query_async(&mut self.redis.clone())
            .await
            .unwrap();
        raw.iter()
            .map(|m| {
                let v: serde_json::Value = serde_json::from_str(m).unwrap();
                v["headers"]["id"].as_str().unwrap().to_owned()
            })
            .collect()
    }

    async fn get(&self, key: &str) -> Option<String> {
        redis::cmd("GET")
            .arg(format!("{}{key}", self.prefix))
            .query_async(&mut self.redis.clone())
            .await
            .unwrap()
    }

    async fn last_run(&self, entry: &str) -> Option<i64> {
        redis::cmd("HGET")
            .arg(format!("{}celerity.beat.last_run", self.prefix))
            .arg(entry)
            .query_async(&mut self.redis.clone())
            .await
            .unwrap()
    }

    async fn set_last_run(&self, entry: &str, tick: i64) {
        let _: () = redis::cmd("HSET")
            .arg(format!("{}celerity.beat.last_run", self.prefix))
            .arg(entry)
            .arg(tick)
            .query_async(&mut self.redis.clone())
            .await
            .unwrap();
    }

    async fn cleanup(self) {
        delete_redis_prefix(&self.prefix).await;
        let _ = std::fs::remove_file(&self.file);
    }
}

async fn stop(h: JoinHandle<Result<(), BeatError>>, t: CancellationToken) {
    t.cancel();
    h.await.unwrap().unwrap();
}

fn every_second() -> String {
    format!(
        "[[entry]]\nname = \"tick\"\ntask = \"demo.tick\"\nevery = \"1s\"\nqueue = \"{QUEUE}\"\n"
    )
}

fn unique(ids: &[String]) -> bool {
    ids.iter().collect::<HashSet<_>>().len() == ids.len()
}

#[tokio::test]
async fn an_every_second_entry_fires_each_second() {
    let env = Env::new(&every_second()).await;
    let (h, t) = env.start(1.0);
    // Watch the queue to report (not assert) how late after the whole second each job arrived.
    let end = tokio::time::Instant::now() + Duration::from_millis(3500);
    let (mut seen, mut worst_ms) = (0, 0);
    while tokio::time::Instant::now() < end {
        let n = env.sent_ids().await.len();
        if n > seen {
            seen = n;
            worst_ms = worst_ms.max(Utc::now().timestamp_subsec_millis());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eprintln!("worst observed lateness of a 1 s tick: {worst_ms} ms (5 ms polling)");
    stop(h, t).await;
    let ids = env.sent_ids().await;
    assert!(
        (3..=4).contains(&ids.len()),
        "sent {} jobs in 3.5 s",
        ids.len()
    );
    assert!(unique(&ids));
    assert!(
        env.get("celerity.beat.lock").await.is_none(),
        "lock released on shutdown"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn two_beats_started_together_send_each_tick_once() {
    let env = Env::new(&every_second()).await;
    let (h1, t1) = env.start(1.0);
    let (h2, t2) = env.start(1.0);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    stop(h1, t1).await;
    stop(h2, t2).await;
    let ids = env.sent_ids().await;
    assert!(
        (3..=4).contains(&ids.len()),
        "two beats sent {} jobs in 3.5 s",
        ids.len()
    );
    assert!(unique(&ids));
    env.cleanup().await;
}

#[tokio::test]
async fn the_standby_takes_over_when_the_leader_dies() {
    let env = Env::new(&every_second()).await;
    let (h1, _t1) = env.start(1.0);
    let mut leader = None;
    for _ in 0..50 {
        leader = env.get("celerity.beat.lock").await;
        if leader.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let leader = leader.expect("first beat took the lock");
    let (h2, t2) = env.start(1.0);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        env.get("celerity.beat.lock").await.as_ref(),
        Some(&leader),
        "no takeover while the leader lives"
    );
    // Kill the leader: no clean shutdown, so its lock stays until the lease runs out.
    h1.abort();
    let _ = h1.await;
    let before = env.sent_ids().await.len();
    let mut taken = false;
    for _ in 0..60 {
        let now = env.get("celerity.beat.lock").await;
        if now.is_some() && now.as_ref() != Some(&leader) {
            taken = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        taken,
        "the standby did not take the lock within 3 s of a 1 s lease"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop(h2, t2).await;
    let ids = env.sent_ids().await;
    assert!(ids.len() > before, "the new leader sent nothing");
    assert!(unique(&ids));
    env.cleanup().await;
}

#[tokio::test]
async fn a_beat_that_lost_the_lock_cannot_record_a_tick() {
    let env = Env::new("").await;
    let store = Store::connect(&env.url).await.unwrap();
    let old = store
        .try_acquire(Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap();
    assert!(store
        .try_acquire(Duration::from_secs(10))
        .await
        .unwrap()
        .is_none());
    // The old leader pauses past its lease; a new one takes over.
    let _: () = redis::cmd("DEL")
        .arg(format!("{}celerity.beat.lock", env.prefix))
        .query_async(&mut env.redis.clone())
        .await
        .unwrap();
    let new = store
        .try_acquire(Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap();
    assert!(new.epoch > old.epoch);
    assert_eq!(
        store.record(&old, "e", 100).await.unwrap(),
        Recorded::NotLeader
    );
    assert!(!store.renew(&old, Duration::from_secs(10)).await.unwrap());
    store.release(&old).await.unwrap();
    assert_eq!(env.get("celerity.beat.lock").await, Some(new.token.clone()));
    assert_eq!(store.record(&new, "e", 100).await.unwrap(), Recorded::Fresh);
    assert_eq!(
        store.record(&new, "e", 100).await.unwrap(),
        Recorded::AlreadySent
    );
    assert_eq!(
        store.record(&new, "e", 99).await.unwrap(),
        Recorded::AlreadySent
    );
    assert_eq!(env.last_run("e").await, Some(100));
    env.cleanup().await;
}

fn yearly(catch_up: &str) -> String {
    format!(
        "[[entry]]\nname = \"yearly\"\ntask = \"demo.yearly\"\ncron = \"0 0 0 1 1 *\"\nqueue = \"{QUEUE}\"\ncatch_up = \"{catch_up}\"\n"
    )
}

/// This year's 1 January (the latest tick of a yearly entry) and the one two years before.
fn new_years() -> (i64, i64) {
    let y = Utc::now().year();
    let tick = |y| Utc.with_ymd_and_hms(y, 1, 1, 0, 0, 0).unwrap().timestamp();
    (tick(y), tick(y - 2))
}

async fn run_for(env: &Env, d: Duration) {
    let (h, t) = env.start(1.0);
    tokio::time::sleep(d).await;
    stop(h, t).await;
}

#[tokio::test]
async fn a_missed_tick_is_sent_once_and_never_again_after_a_restart() {
    let env = Env::new(&yearly("once")).await;
    let (latest, old) = new_years();
    env.set_last_run("yearly", old).await;
    run_for(&env, Duration::from_millis(700)).await;
    assert_eq!(
        env.sent_ids().await.len(),
        1,
        "one catch-up for two missed ticks"
    );
    assert_eq!(env.last_run("yearly").await, Some(latest));
    run_for(&env, Duration::from_millis(700)).await;
    assert_eq!(env.sent_ids().await.len(), 1, "a restart re-sent a tick");
    env.cleanup().await;
}

#[tokio::test]
async fn skip_sends_no_missed_tick_and_a_new_entry_starts_from_now() {
    let env = Env::new(&yearly("skip")).await;
    let (_, old) = new_years();
    env.set_last_run("yearly", old).await;
    run_for(&env, Duration::from_millis(700)).await;
    assert_eq!(env.sent_ids().await.len(), 0, "skip sent a missed tick");
    assert_eq!(env.last_run("yearly").await, Some(old));
    env.cleanup().await;

    let env = Env::new(&yearly("once")).await;
    run_for(&env, Duration::from_millis(700)).await;
    assert_eq!(
        env.sent_ids().await.len(),
        0,
        "a never-run entry caught up on the past"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn bad_input_gives_one_clear_line() {
    let env =
        Env::new("[[entry]]\nname = \"nightly\"\ntask = \"t\"\ncron = \"0 61 * * * *\"\n").await;
    let msg = check(&env.file).unwrap_err().to_string();
    assert!(
        msg.contains("entry `nightly`") && msg.contains("bad cron expression"),
        "{msg}"
    );
    assert!(!msg.contains('\n'), "{msg}");
    let (h, _t) = env.start(1.0);
    let msg = h.await.unwrap().unwrap_err().to_string();
    assert!(msg.contains("entry `nightly`"), "{msg}");

    std::fs::write(
        &env.file,
        "[[entry]]\nname = \"z\"\ntask = \"t\"\nevery = \"1m\"\ntimezone = \"Europe/Nowhere\"\n",
    )
    .unwrap();
    let msg = check(&env.file).unwrap_err().to_string();
    assert!(
        msg.contains("entry `z`: unknown timezone `Europe/Nowhere`"),
        "{msg}"
    );

    let missing = env.file.with_extension("missing");
    assert!(check(&missing)
        .unwrap_err()
        .to_string()
        .contains("cannot read"));

    std::fs::write(&env.file, every_second()).unwrap();
    let text = check(&env.file).unwrap();
    assert_eq!(text.lines().count(), 6, "{text}");

    let args = BeatArgs {
        schedule: Some(env.file.clone()),
        check: None,
        lease: 1.0,
    };
    let conn = ConnectionArgs {
        broker: "amqp://guest:guest@127.0.0.1:5672//".into(),
        backend: None,
    };
    let msg = run_beat(&args, &conn, CancellationToken::new())
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(
        msg,
        "beat needs a redis:// broker for its lock and state (for now)"
    );
    env.cleanup().await;
}
