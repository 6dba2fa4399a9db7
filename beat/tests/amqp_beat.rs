//! Beat against the real local RabbitMQ: one leader among several through the single-active-consumer
//! lock queue, handover when the leader's connection is killed, and the state file. Each test has
//! its own task queue, lock queue and state file, and removes them. A corrupt state file must not
//! stop a beat from leading.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use lapin::options::{ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use celerity::cli::beat::{run_beat, BeatArgs};
use celerity::cli::ConnectionArgs;
use celerity_beat::BeatError;

const URL: &str = "amqp://guest:guest@127.0.0.1:5672//";

struct Env {
    queue: String,
    lock: String,
    file: PathBuf,
    state: PathBuf,
    conn: Connection,
}

impl Env {
    async fn new() -> Env {
        let id = uuid::Uuid::new_v4();
        let queue = format!("beat-amqp-{id}");
        let file = std::env::temp_dir().join(format!("celerity-beat-{id}.toml"));
        let schedule = format!(
            "[[entry]]\nname = \"tick\"\ntask = \"demo.tick\"\nevery = \"1s\"\nqueue = \"{queue}\"\n"
        );
        std::fs::write(&file, schedule).unwrap();
        let conn = Connection::connect(
            "amqp://guest:guest@127.0.0.1:5672/%2f",
            ConnectionProperties::default(),
        )
        .await
        .unwrap();
        Env {
            lock: format!("beat-lock-{id}"),
            state: std::env::temp_dir().join(format!("celerity-beat-{id}.state.json")),
            queue,
            file,
            conn,
        }
    }

    fn start(&self) -> (JoinHandle<Result<(), BeatError>>, CancellationToken) {
        self.start_with_state(self.state.clone())
    }

    /// A beat with its own state file, as a beat on another host would have.
    fn start_with_state(
        &self,
        state: PathBuf,
    ) -> (JoinHandle<Result<(), BeatError>>, CancellationToken) {
        let args = BeatArgs {
            schedule: Some(self.file.clone()),
            check: None,
            lease: 1.0,
            state_file: state,
            lock_queue: self.lock.clone(),
            metrics_addr: None,
        };
        let conn = ConnectionArgs {
            broker: URL.into(),
            backend: None,
        };
        let token = CancellationToken::new();
        let t = token.clone();
        (
            tokio::spawn(async move { run_beat(&args, &conn, t).await }),
            token,
        )
    }

    /// Jobs waiting in the task queue (0 before beat declared it).
    async fn sent(&self) -> u32 {
        let ch = self.conn.create_channel().await.unwrap();
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let n = match ch
            .queue_declare(self.queue.as_str().into(), passive, FieldTable::default())
            .await
        {
            Ok(q) => q.message_count(),
            Err(_) => return 0,
        };
        let _ = ch.close(200, "OK".into()).await;
        n
    }

    async fn wait_sent(&self, n: u32) -> bool {
        for _ in 0..100 {
            if self.sent().await >= n {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    async fn cleanup(self) {
        let ch = self.conn.create_channel().await.unwrap();
        let mirror = format!("{}.state", self.lock);
        for q in [&self.queue, &self.lock, &mirror] {
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        // The task queue's exchange of the same name, declared as Celery declares it.
        let _ = ch
            .exchange_delete(self.queue.as_str().into(), ExchangeDeleteOptions::default())
            .await;
        let _ = self.conn.close(200, "OK".into()).await;
        let _ = std::fs::remove_file(&self.file);
        let _ = std::fs::remove_file(&self.state);
    }
}

async fn stop(h: JoinHandle<Result<(), BeatError>>, t: CancellationToken) {
    t.cancel();
    h.await.unwrap().unwrap();
}

/// RabbitMQ's pids of the beat lock connections on `lock` queue.
fn lock_connections(lock: &str) -> Vec<String> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "pid", "client_properties"])
        .output()
        .unwrap();
    assert!(out.status.success(), "rabbitmqctl failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&format!("celerity-beat {lock}")))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn two_beats_on_rabbitmq_send_each_tick_once_and_keep_state() {
    let env = Env::new().await;
    let began = Instant::now();
    let (h1, t1) = env.start();
    let (h2, t2) = env.start();
    tokio::time::sleep(Duration::from_millis(3500)).await;
    stop(h1, t1).await;
    stop(h2, t2).await;
    let secs = began.elapsed().as_secs_f64();
    let n = env.sent().await;
    // One leader sends about one job a second; two leaders would send about twice that.
    assert!(
        n >= 2 && f64::from(n) <= secs + 1.0,
        "two beats sent {n} jobs in {secs:.1} s"
    );
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&env.state).unwrap()).unwrap();
    assert!(state["tick"].as_i64().is_some(), "state file: {state}");
    env.cleanup().await;
}

#[tokio::test]
async fn killing_the_leaders_connection_hands_over_without_duplicates() {
    let env = Env::new().await;
    let began = Instant::now();
    let (h1, t1) = env.start();
    assert!(env.wait_sent(1).await, "the first beat never sent");
    let first = lock_connections(&env.lock);
    assert_eq!(first.len(), 1, "{first:?}");
    let (h2, t2) = env.start();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(lock_connections(&env.lock).len(), 2);

    let status = std::process::Command::new("rabbitmqctl")
        .args(["-q", "close_connection", &first[0], "test: leader killed"])
        .status()
        .unwrap();
    assert!(status.success());
    let at_kill = env.sent().await;
    assert!(
        env.wait_sent(at_kill + 3).await,
        "nobody took over after the leader's connection died"
    );
    stop(h1, t1).await;
    stop(h2, t2).await;
    let secs = began.elapsed().as_secs_f64();
    let n = env.sent().await;
    assert!(
        f64::from(n) <= secs + 1.0,
        "sent {n} jobs in {secs:.1} s: a tick went out twice"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn a_leader_on_another_host_sees_the_ticks_its_predecessor_sent() {
    let env = Env::new().await;
    // An hourly entry both "hosts" last ran two hours ago: the first leader catches up the latest
    // hour once; the second, whose own state file is just as stale, must learn from the mirror
    // that this tick went out already.
    let schedule = format!(
        "[[entry]]\nname = \"hourly\"\ntask = \"demo.tick\"\nevery = \"1h\"\nqueue = \"{}\"\ncatch_up = \"once\"\n",
        env.queue
    );
    std::fs::write(&env.file, schedule).unwrap();
    let stale = chrono::Utc::now().timestamp() / 3600 * 3600 - 7200;
    let other = env.state.with_extension("other.json");
    for f in [&env.state, &other] {
        std::fs::write(f, format!("{{\"hourly\":{stale}}}")).unwrap();
    }

    let (h1, t1) = env.start();
    assert!(env.wait_sent(1).await, "the first leader did not catch up");
    stop(h1, t1).await;

    let (h2, t2) = env.start_with_state(other.clone());
    // Long enough to become leader and decide what was missed.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    stop(h2, t2).await;
    assert_eq!(env.sent().await, 1, "the second leader sent the hour again");
    let merged: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&other).unwrap()).unwrap();
    assert!(merged["hourly"].as_i64().unwrap() > stale, "{merged}");
    let _ = std::fs::remove_file(&other);
    env.cleanup().await;
}

#[tokio::test]
async fn a_corrupt_state_file_does_not_stop_beat_from_leading() {
    let env = Env::new().await;
    // Half a file, as a crash in the middle of a non-atomic write would leave.
    std::fs::write(&env.state, "{\"tick\": 17").unwrap();
    let (h, t) = env.start();
    let sent = env.wait_sent(1).await;
    stop(h, t).await;
    assert!(sent, "beat never led with a corrupt state file");
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&env.state).unwrap()).unwrap();
    assert!(state["tick"].as_i64().is_some_and(|t| t > 17), "{state}");
    // The bad file was kept aside for a person to look at.
    let name = env
        .state
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let aside: Vec<PathBuf> = std::fs::read_dir(env.state.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{name}.corrupt-")))
        })
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(std::fs::read(&aside[0]).unwrap(), b"{\"tick\": 17");
    let _ = std::fs::remove_file(&aside[0]);
    env.cleanup().await;
}
