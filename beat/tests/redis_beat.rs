//! Beat against the real local Redis: firing, one leader among several, handover, restart and
//! catch-up, fencing, and clear errors. Each test has its own `global_keyprefix` and cleans up.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use chrono::{Datelike, TimeZone, Utc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use celerity::cli::beat::{run_beat, BeatArgs};
use celerity::cli::ConnectionArgs;
use celerity_beat::state::{Recorded, Store};
use celerity_beat::{check, BeatError};
use celerity_testsupport::delete_redis_prefix;

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
            state_file: PathBuf::from("unused-on-redis.json"),
            lock_queue: "unused-on-redis".into(),
            metrics_addr: None,
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
        state_file: std::env::temp_dir().join("celerity-beat-unused.json"),
        lock_queue: "unused".into(),
        metrics_addr: None,
    };
    let conn = ConnectionArgs {
        broker: "memory://".into(),
        backend: None,
    };
    let msg = run_beat(&args, &conn, CancellationToken::new())
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(
        msg,
        "beat needs a redis:// or amqp:// broker for its lock and state"
    );
    env.cleanup().await;
}

/// Task names of the messages waiting in the queue.
async fn sent_tasks(env: &Env) -> Vec<String> {
    let raw: Vec<String> = redis::cmd("LRANGE")
        .arg(format!("{}{QUEUE}", env.prefix))
        .arg(0)
        .arg(-1)
        .query_async(&mut env.redis.clone())
        .await
        .unwrap();
    raw.iter()
        .map(|m| {
            let v: serde_json::Value = serde_json::from_str(m).unwrap();
            v["headers"]["task"].as_str().unwrap().to_owned()
        })
        .collect()
}

fn count(tasks: &[String], name: &str) -> usize {
    tasks.iter().filter(|t| *t == name).count()
}

fn two_entries() -> String {
    format!(
        "{}[[entry]]\nname = \"new\"\ntask = \"demo.new\"\nevery = \"1s\"\nqueue = \"{QUEUE}\"\n",
        every_second()
    )
}

/// Waits (up to 10 s) until `task` has been sent at least `n` times.
async fn wait_for(env: &Env, task: &str, n: usize) -> bool {
    for _ in 0..100 {
        if count(&sent_tasks(env).await, task) >= n {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test]
async fn a_changed_file_is_reloaded_and_a_broken_one_refused() {
    let env = Env::new(&every_second()).await;
    let (h, t) = env.start(3.0);
    assert!(
        wait_for(&env, "demo.tick", 1).await,
        "the first entry never fired"
    );

    std::fs::write(&env.file, two_entries()).unwrap();
    assert!(
        wait_for(&env, "demo.new", 1).await,
        "the added entry never fired"
    );

    std::fs::write(&env.file, "[[entry]]\nname = \"broken\"\ncron = \"nope\"\n").unwrap();
    // Past the 2 s poll: the broken file has been seen (and refused) by now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = sent_tasks(&env).await;
    let (tick, new) = (count(&before, "demo.tick"), count(&before, "demo.new"));
    assert!(
        wait_for(&env, "demo.tick", tick + 2).await,
        "the old entry stopped"
    );
    assert!(
        wait_for(&env, "demo.new", new + 2).await,
        "the added entry stopped"
    );
    stop(h, t).await;

    // Each entry fired once per second at most: the reloads did not reset the kept entry.
    let ids = env.sent_ids().await;
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), ids.len());
    env.cleanup().await;
}

#[tokio::test]
async fn sighup_reloads_the_schedule() {
    let env = Env::new(&every_second()).await;
    let (h, t) = env.start(3.0);
    assert!(
        wait_for(&env, "demo.tick", 1).await,
        "the first entry never fired"
    );

    // Rewrite the file but keep its modification time, so only the signal can reveal the change.
    let mtime = std::fs::metadata(&env.file).unwrap().modified().unwrap();
    std::fs::write(&env.file, two_entries()).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&env.file)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        count(&sent_tasks(&env).await, "demo.new"),
        0,
        "reloaded without a signal"
    );

    // The beat above installed the SIGHUP handler, so this does not kill the test process.
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(wait_for(&env, "demo.new", 1).await, "SIGHUP did not reload");
    stop(h, t).await;
    env.cleanup().await;
}

/// Not a timed assertion: prints the worst lateness of a 1 s entry (time the message reached the
/// queue minus the tick it was recorded for) over 20 s, or `CELERITY_BEAT_LATENESS_SECS` seconds.
#[tokio::test]
async fn lateness_of_a_one_second_entry_is_printed() {
    let secs: u64 = std::env::var("CELERITY_BEAT_LATENESS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let env = Env::new(&every_second()).await;
    let (h, t) = env.start(3.0);
    let mut conn = env.redis.clone();
    let queue = format!("{}{QUEUE}", env.prefix);
    let end = std::time::Instant::now() + Duration::from_secs(secs);
    let (mut worst, mut total, mut n) = (0.0f64, 0.0f64, 0u32);
    while std::time::Instant::now() < end {
        let got: Option<(String, String)> = redis::cmd("BLPOP")
            .arg(&queue)
            .arg(0.3) // under the connection's response timeout
            .query_async(&mut conn)
            .await
            .unwrap();
        let now = Utc::now();
        if got.is_none() {
            continue;
        }
        let tick = env.last_run("tick").await.unwrap();
        let late = (now.timestamp_micros() - tick * 1_000_000) as f64 / 1e6;
        worst = worst.max(late);
        total += late;
        n += 1;
    }
    stop(h, t).await;
    println!(
        "beat lateness over {secs} s: {n} fires, worst {:.1} ms, mean {:.1} ms",
        worst * 1e3,
        total * 1e3 / f64::from(n.max(1))
    );
    assert!(n as u64 >= secs / 2, "only {n} fires in {secs} s");
    env.cleanup().await;
}

#[tokio::test]
async fn a_cron_entry_with_seconds_fires_on_its_seconds() {
    let env = Env::new(&format!(
        "[[entry]]\nname = \"even\"\ntask = \"demo.even\"\ncron = \"*/2 * * * * *\"\nqueue = \"{QUEUE}\"\n"
    ))
    .await;
    let (h, t) = env.start(1.0);
    let mut ticks = HashSet::new();
    let end = tokio::time::Instant::now() + Duration::from_millis(4600);
    while tokio::time::Instant::now() < end {
        if let Some(tick) = env.last_run("even").await {
            ticks.insert(tick);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop(h, t).await;
    // A tick sent between the last poll and the stop is only seen now.
    if let Some(tick) = env.last_run("even").await {
        ticks.insert(tick);
    }
    let ids = env.sent_ids().await;
    assert!(
        (2..=3).contains(&ids.len()),
        "sent {} jobs in 4.6 s",
        ids.len()
    );
    assert_eq!(ticks.len(), ids.len(), "ticks {ticks:?}");
    assert!(ticks.iter().all(|t| t % 2 == 0), "odd tick in {ticks:?}");
    env.cleanup().await;
}
