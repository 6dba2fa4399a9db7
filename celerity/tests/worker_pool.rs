//! The supervised worker pool (`celerity worker -P N`) as a user runs it: real processes, real
//! Redis and RabbitMQ. A killed process loses no job, a hard time limit ends a job that never
//! yields and the pool keeps serving, SIGTERM finishes running jobs, recycled processes are replaced.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use celerity_broker::{connect_backend, State};
use celerity_client::{Client, SendOptions};
use celerity_testsupport::{delete_amqp_queue, delete_redis_prefix, AMQP, REDIS};

fn unique() -> String {
    celerity_testsupport::unique("pooltest")
}

/// A running `celerity worker` supervisor; killed (with its process group's children) on drop.
struct Pool {
    child: Child,
}

impl Pool {
    fn start(broker: &str, backend: &str, queue: &str, extra: &[&str]) -> Pool {
        Pool::start_logging_to(broker, backend, queue, extra, Stdio::null())
    }

    /// Like `start`, with the pool's log (stderr) going to `stderr`.
    fn start_logging_to(
        broker: &str,
        backend: &str,
        queue: &str,
        extra: &[&str],
        stderr: Stdio,
    ) -> Pool {
        let child = Command::new(env!("CARGO_BIN_EXE_celerity"))
            .args([
                "--broker",
                broker,
                "--backend",
                backend,
                "worker",
                "-Q",
                queue,
            ])
            .args(extra)
            .env("CELERITY_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start celerity worker");
        Pool { child }
    }

    fn children(&self) -> Vec<i32> {
        let out = Command::new("pgrep")
            .arg("-P")
            .arg(self.child.id().to_string())
            .output()
            .expect("pgrep");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    fn wait_for_children(&self, n: usize) -> Vec<i32> {
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            let c = self.children();
            if c.len() == n || Instant::now() > until {
                return c;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) with a pid and a signal number.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let until = Instant::now() + within;
        while Instant::now() < until {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        for pid in self.children() {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn client(broker: &str, backend: &str) -> Client {
    let b = celerity_broker::connect_broker(broker).await.unwrap();
    Client::new(b, Some(connect_backend(backend).await.unwrap()))
}

/// Sends `demo.add(2, 3)` to `queue` and checks the pool answers 5.
async fn assert_pool_adds(c: &Client, queue: &str) {
    let add = c
        .send_task(
            "demo.add",
            vec![json!(2), json!(3)],
            Default::default(),
            &SendOptions::new().queue(queue),
        )
        .await
        .unwrap();
    assert_eq!(
        add.get(Some(Duration::from_secs(20))).await.unwrap(),
        json!(5)
    );
}

/// Sends `n` short jobs, SIGKILLs one worker process while they run, and checks every job still
/// finishes exactly with its value.
async fn killed_process_loses_nothing(broker: &str, backend: &str, queue: &str) {
    let pool = Pool::start(broker, backend, queue, &["-P", "2", "-c", "4"]);
    let before = pool.wait_for_children(2);
    assert_eq!(before.len(), 2, "pool did not start 2 processes");
    let c = client(broker, backend).await;
    let opts = SendOptions::new().queue(queue);
    // One batch, so the queue is full at once however slowly this machine runs the producer.
    let batch: Vec<_> = (0..200)
        .map(|i| {
            opts.build(
                "demo.sleep_ms",
                vec![json!(30 + i % 3)],
                Default::default(),
                chrono::Utc::now(),
            )
            .unwrap()
        })
        .collect();
    c.send_batch(&batch, queue).await.unwrap();
    let ids: Vec<_> = batch
        .iter()
        .map(|m| c.result::<serde_json::Value>(m.id()))
        .collect();
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(
        c.broker().queue_len(queue).await.unwrap() > 0,
        "the batch must still be running when a process is killed"
    );
    unsafe { libc::kill(before[0], libc::SIGKILL) };
    for (i, h) in ids.iter().enumerate() {
        let m = h
            .wait_meta(Some(Duration::from_secs(60)))
            .await
            .unwrap_or_else(|e| panic!("job {i}: {e}"));
        assert_eq!(
            (m.status, m.result),
            (State::Success, json!(30 + i % 3)),
            "job {i}"
        );
    }
    let after = pool.wait_for_children(2);
    assert_eq!(after.len(), 2, "the killed process was not replaced");
    assert!(!after.contains(&before[0]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_process_loses_no_job_on_rabbitmq() {
    let q = unique();
    let backend = format!("{REDIS}?global_keyprefix={q}:");
    killed_process_loses_nothing(AMQP, &backend, &q).await;
    delete_amqp_queue(&q).await;
    delete_redis_prefix(&q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_process_loses_no_job_on_redis() {
    let q = unique();
    // A short visibility timeout so the dead process's jobs come back within the test.
    let broker = format!("{REDIS}?global_keyprefix={q}:&visibility_timeout=2&restore_interval=1");
    let backend = format!("{REDIS}?global_keyprefix={q}:");
    killed_process_loses_nothing(&broker, &backend, &q).await;
    delete_redis_prefix(&q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_time_limit_ends_a_spinning_job_and_the_pool_keeps_serving() {
    let q = unique();
    let backend = format!("{REDIS}?global_keyprefix={q}:");
    let pool = Pool::start(AMQP, &backend, &q, &["-P", "2", "-c", "2"]);
    assert_eq!(pool.wait_for_children(2).len(), 2);
    let c = client(AMQP, &backend).await;
    let spin = c
        .send_task(
            "demo.spin_ms",
            vec![json!(60_000)],
            Default::default(),
            &SendOptions::new().queue(&q).time_limits(Some(1.0), None),
        )
        .await
        .unwrap();
    let m = spin.wait_meta(Some(Duration::from_secs(30))).await.unwrap();
    assert_eq!(m.status, State::Failure);
    assert_eq!(
        m.exception().map(|e| e.exc_type),
        Some("TimeLimitExceeded".to_owned())
    );
    assert_pool_adds(&c, &q).await;
    // RabbitMQ gave the spinning job back when its process died; the pool must drop it, not run it again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(c.broker().queue_len(&q).await.unwrap(), 0);
    assert_eq!(pool.wait_for_children(2).len(), 2);
    assert_eq!(
        c.backend().unwrap().get(spin.id()).await.unwrap().status,
        State::Failure
    );
    drop(pool);
    delete_amqp_queue(&q).await;
    delete_redis_prefix(&q).await;
}

/// With results over `rpc://`, a job killed at its hard time limit still answers its sender: the
/// supervisor (which killed the process) sends the `TimeLimitExceeded` FAILURE to the reply queue
/// the child reported when the job started. (It used to store it without the reply address, so
/// the `rpc://` backend dropped it and the caller waited until its own timeout.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_time_limit_failure_reaches_an_rpc_caller() {
    let q = unique();
    let pool = Pool::start(AMQP, "rpc://", &q, &["-P", "1", "-c", "2"]);
    assert_eq!(pool.wait_for_children(1).len(), 1);
    let c = Client::connect(AMQP, Some("rpc://")).await.unwrap();
    let spin = c
        .send_task(
            "demo.spin_ms",
            vec![json!(60_000)],
            Default::default(),
            &SendOptions::new().queue(&q).time_limits(Some(1.0), None),
        )
        .await
        .unwrap();
    let m = spin.wait_meta(Some(Duration::from_secs(20))).await;
    drop(pool);
    delete_amqp_queue(&q).await;
    let m = m.expect("the time-limit failure never reached the rpc:// caller");
    assert_eq!(m.status, State::Failure);
    assert_eq!(
        m.exception().map(|e| e.exc_type),
        Some("TimeLimitExceeded".to_owned())
    );
}

/// A pool whose log reader went away (stderr is a pipe nobody reads any more, as when the terminal
/// or the process manager that started it is gone) keeps working and still stops on SIGTERM: a log
/// line that cannot be written is dropped. (It used to panic in the logger: the signal handler
/// died with it, and the pool ignored SIGTERM from then on.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_whose_log_pipe_closed_runs_and_stops_on_sigterm() {
    let q = unique();
    let url = format!("{REDIS}?global_keyprefix={q}:");
    let mut pool = Pool::start_logging_to(&url, &url, &q, &["-P", "2", "-c", "4"], Stdio::piped());
    drop(pool.child.stderr.take());
    assert_eq!(
        pool.wait_for_children(2).len(),
        2,
        "pool did not start 2 processes"
    );
    let c = client(&url, &url).await;
    assert_pool_adds(&c, &q).await;
    pool.signal(libc::SIGTERM);
    let status = pool
        .wait_exit(Duration::from_secs(30))
        .expect("the pool did not stop on SIGTERM");
    assert!(status.success(), "pool exited with {status}");
    let _ = c.close().await;
    delete_redis_prefix(&q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_running_jobs_and_recycled_processes_are_replaced() {
    let q = unique();
    let url = format!("{REDIS}?global_keyprefix={q}:");
    let mut pool = Pool::start(
        &url,
        &url,
        &q,
        &["-P", "1", "-c", "4", "--max-tasks-per-child", "5"],
    );
    let first = pool.wait_for_children(1);
    let c = client(&url, &url).await;
    let opts = SendOptions::new().queue(&q);
    let mut ids = Vec::new();
    for i in 0..12 {
        ids.push(
            c.send_task(
                "demo.add",
                vec![json!(i), json!(1)],
                Default::default(),
                &opts,
            )
            .await
            .unwrap(),
        );
    }
    for (i, h) in ids.iter().enumerate() {
        assert_eq!(
            h.get(Some(Duration::from_secs(30))).await.unwrap(),
            json!(i + 1)
        );
    }
    let now = pool.wait_for_children(1);
    assert_ne!(
        first, now,
        "after 12 jobs at 5 per process the first process must have been replaced"
    );

    let long = c
        .send_task(
            "demo.sleep_ms",
            vec![json!(1500)],
            Default::default(),
            &opts,
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    pool.signal(libc::SIGTERM);
    let status = pool
        .wait_exit(Duration::from_secs(20))
        .expect("pool did not stop");
    assert!(status.success(), "{status:?}");
    assert_eq!(
        c.backend().unwrap().get(long.id()).await.unwrap().status,
        State::Success
    );
    delete_redis_prefix(&q).await;
}

/// `celerity worker --beat`: the embedded beat (in the supervisor, once) sends an every-second job
/// that the pool runs; SIGTERM stops both cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_with_embedded_beat_runs_the_schedule() {
    let q = unique();
    let url = format!("{REDIS}?global_keyprefix={q}:");
    let schedule = std::env::temp_dir().join(format!("{q}.toml"));
    std::fs::write(&schedule, format!("[[entry]]\nname = \"tick\"\ntask = \"demo.add\"\nargs = [20, 22]\nevery = \"1s\"\nqueue = \"{q}\"\n")).unwrap();
    let started = Instant::now();
    let mut pool = Pool::start(
        &url,
        &url,
        &q,
        &[
            "-P",
            "2",
            "-c",
            "2",
            "--beat",
            "--beat-schedule",
            schedule.to_str().unwrap(),
        ],
    );
    assert_eq!(pool.wait_for_children(2).len(), 2);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    pool.signal(libc::SIGTERM);
    let ran_for = started.elapsed().as_secs_f64();
    let status = pool
        .wait_exit(Duration::from_secs(20))
        .expect("pool did not stop");
    assert!(status.success(), "{status:?}");

    let client = redis::Client::open(REDIS).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{q}:celery-task-meta-*"))
        .query_async(&mut c)
        .await
        .unwrap();
    // One job per second while it ran, each once (two worker processes, but one beat).
    let most = ran_for.floor() as usize + 1;
    assert!(
        (3..=most).contains(&keys.len()),
        "{} results in {ran_for:.1} s",
        keys.len()
    );
    for k in keys {
        let v: String = redis::cmd("GET").arg(&k).query_async(&mut c).await.unwrap();
        let meta: serde_json::Value = serde_json::from_str(&v).unwrap();
        assert_eq!(
            (meta["status"].as_str(), meta["result"].as_i64()),
            (Some("SUCCESS"), Some(42))
        );
    }
    let _ = std::fs::remove_file(&schedule);
    delete_redis_prefix(&q).await;
}

/// A `-P 2` pool on Redis under key prefix `prefix`, consuming `q`, its two children up; and a client.
async fn redis_pool_of_two(q: &str, prefix: &str) -> (Pool, Client) {
    let url = format!("{REDIS}?global_keyprefix={prefix}");
    let pool = Pool::start(&url, &url, q, &["-P", "2", "-c", "2"]);
    assert_eq!(pool.wait_for_children(2).len(), 2);
    (pool, client(&url, &url).await)
}

/// Defect 16.3: a message whose hard time limit is 1e19 s (past what the supervisor's clock can
/// add) used to panic its pool slot; the supervisor then exited 0 with the child running on as an
/// orphan. Now the limit is not enforced, the job runs, and the pool keeps supervising.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absurd_hard_time_limit_neither_panics_nor_ends_the_supervisor() {
    let (q, prefix) = (unique(), format!("{}:", unique()));
    let (mut pool, c) = redis_pool_of_two(&q, &prefix).await;
    // Built by hand: the client refuses such a limit, a hostile producer does not.
    let mut m = celerity_broker::protocol::TaskMessage::new(
        "demo.add",
        vec![json!(1), json!(2)],
        Default::default(),
    );
    m.headers.timelimit = (Some(1e19), None);
    c.broker().publish(&q, &m.encode()).await.unwrap();
    let meta = c
        .backend()
        .unwrap()
        .wait(m.id(), Some(Duration::from_secs(20)))
        .await
        .unwrap();
    assert_eq!((meta.status, meta.result), (State::Success, json!(3)));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        pool.wait_exit(Duration::from_millis(100)).is_none(),
        "the supervisor exited"
    );
    assert_eq!(pool.wait_for_children(2).len(), 2);
    assert_pool_adds(&c, &q).await;
    drop(pool);
    delete_redis_prefix(&prefix).await;
}

/// Defect 16.8: a remote `shutdown` (`celery control shutdown`) stops a supervised pool as it stops
/// a Celery worker: the supervisor exits, instead of starting the stopped children again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_shutdown_stops_the_whole_pool() {
    let (q, prefix) = (unique(), format!("{}:", unique()));
    let (mut pool, c) = redis_pool_of_two(&q, &prefix).await;
    assert_pool_adds(&c, &q).await;
    c.control_cast("shutdown", Default::default(), &[])
        .await
        .unwrap();
    let status = pool.wait_exit(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.success()),
        "the supervisor did not stop: {status:?}"
    );
    drop(pool);
    delete_redis_prefix(&prefix).await;
}

/// A header table nested 5,000 deep (RabbitMQ takes it; a 128 KiB frame holds ~18,000 levels) used
/// to overflow lapin's I/O thread's default 2 MiB stack and abort the worker. The `celerity` binary
/// gives such threads room (`reserve_thread_stacks`), and our own reading stops at 64 levels: the
/// worker lives on and serves the next job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deeply_nested_amqp_header_does_not_kill_the_worker() {
    let q = unique();
    let backend = format!("{REDIS}?global_keyprefix={q}:");
    let mut pool = Pool::start(AMQP, &backend, &q, &["-P", "0", "-c", "2"]);
    let c = client(AMQP, &backend).await;
    assert_pool_adds(&c, &q).await;
    // Published by this test binary run again with room on its own stacks (lapin writes the table
    // recursively on its I/O thread, and the room must be there before the first thread starts).
    let exe = std::env::current_exe().unwrap();
    let published = Command::new(exe)
        .args(["--exact", "deep_header_publisher", "--nocapture"])
        .env("CELERITY_DEEP_HEADER_QUEUE", &q)
        .env("RUST_MIN_STACK", "268435456")
        .status()
        .unwrap();
    assert!(published.success(), "the publisher failed");
    assert_pool_adds(&c, &q).await;
    assert!(
        pool.wait_exit(Duration::from_millis(200)).is_none(),
        "the worker died"
    );
    drop(pool);
    delete_amqp_queue(&q).await;
    delete_redis_prefix(&q).await;
}

/// Helper of the test above (does nothing unless it sets `CELERITY_DEEP_HEADER_QUEUE`): publishes
/// one message whose header table is nested 5,000 deep.
#[tokio::test]
async fn deep_header_publisher() {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    use lapin::types::{AMQPValue, FieldTable};
    let Ok(q) = std::env::var("CELERITY_DEEP_HEADER_QUEUE") else {
        return;
    };
    let conn = lapin::Connection::connect(AMQP, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut v = AMQPValue::Boolean(true);
    for _ in 0..5_000 {
        let mut t = FieldTable::default();
        t.insert("a".into(), v);
        v = AMQPValue::FieldTable(t);
    }
    let mut headers = FieldTable::default();
    headers.insert("deep".into(), v);
    let props = lapin::BasicProperties::default()
        .with_content_type("application/json".into())
        .with_headers(headers);
    channel
        .basic_publish(
            "".into(),
            q.as_str().into(),
            BasicPublishOptions::default(),
            b"[[], {}, {}]",
            props,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let _ = conn.close(200, "OK".into()).await;
}
