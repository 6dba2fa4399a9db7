//! `--metrics-addr` as an operator uses it: a real `celerity worker` (a `-P 2` pool, or one
//! process), real Redis, scraped over HTTP. Known jobs (successes, failures, retries, a revoke)
//! give exact counts in celery-exporter's names, children recycled mid-run included; `/readyz`
//! follows a private Redis going away and coming back while `/healthz` stays OK; a pool child stuck
//! in a job that never yields makes `/healthz` fail until it is free again (and one killed at its
//! hard time limit is counted by the supervisor); two beats show one
//! leader and one ready standby, which leads once the leader dies.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use celerity_broker::{connect_backend, State};
use celerity_client::{Client, SendOptions};
use celerity_testsupport::{delete_redis_prefix, unique, PrivateRedis, REDIS};

/// This suite's private servers go on ports from here (its own range, clear of other suites').
const PORTS: std::ops::Range<u16> = 23_100..23_200;

/// A running `celerity worker` with `--metrics-addr 127.0.0.1:0`; its log is kept (and printed if
/// the test fails); killed with its children on drop.
struct Worker {
    child: Child,
    addr: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Worker {
    fn start(broker: &str, backend: &str, queue: &str, extra: &[&str]) -> Worker {
        let mut args = vec![
            "--broker",
            broker,
            "--backend",
            backend,
            "worker",
            "-Q",
            queue,
        ];
        args.extend(extra);
        Worker::spawn(&args)
    }

    /// `celerity ARGS… --metrics-addr 127.0.0.1:0` (the verb's flag goes last).
    fn spawn(args: &[&str]) -> Worker {
        let mut child = Command::new(env!("CARGO_BIN_EXE_celerity"))
            .args(args)
            .args(["--metrics-addr", "127.0.0.1:0"])
            .env("CELERITY_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start celerity worker");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().expect("stderr");
        let kept = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("metrics listening on http://") {
                    let _ = tx.send(rest.trim_end_matches("/metrics").to_owned());
                }
                kept.lock().unwrap().push(line);
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the worker never said where it serves metrics");
        Worker { child, addr, log }
    }

    fn get(&self, path: &str) -> (u16, String) {
        http_get(&self.addr, path).unwrap_or((0, String::new()))
    }

    /// Polls `path` until `done` holds for its answer, at most `within`.
    fn wait_for(
        &self,
        path: &str,
        within: Duration,
        done: impl Fn(u16, &str) -> bool,
    ) -> (u16, String) {
        let until = Instant::now() + within;
        loop {
            let (status, body) = self.get(path);
            if done(status, &body) || Instant::now() > until {
                return (status, body);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Ok(out) = Command::new("pgrep")
            .arg("-P")
            .arg(self.child.id().to_string())
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).lines() {
                if let Ok(pid) = pid.trim().parse::<i32>() {
                    // SAFETY: kill(2) with a pid of our own child's child and a signal number.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- worker log ---\n{}", self.log());
        }
    }
}

/// One `GET` over HTTP/1.1 (the connection closed after it): status and body.
fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

/// The samples of an OpenMetrics text: name, labels, value.
fn samples(text: &str) -> Vec<(String, HashMap<String, String>, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split("\",")
                .filter_map(|kv| {
                    let (k, v) = kv.split_once("=\"")?;
                    Some((k.to_owned(), v.trim_end_matches('"').to_owned()))
                })
                .collect();
            Some((name.to_owned(), labels, value.parse().ok()?))
        })
        .collect()
}

/// The sum of `metric` over the series whose labels include all of `with`.
fn total(text: &str, metric: &str, with: &[(&str, &str)]) -> f64 {
    samples(text)
        .iter()
        .filter(|(n, l, _)| {
            n == metric
                && with
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| v)
        .sum()
}

async fn client(broker: &str, backend: &str) -> Client {
    let b = celerity_broker::connect_broker(broker).await.unwrap();
    Client::new(b, Some(connect_backend(backend).await.unwrap()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_serves_exact_counts_of_known_jobs() {
    let q = unique("metrics-counts");
    let broker = format!("{REDIS}?global_keyprefix={q}:");
    let backend = broker.clone();
    // Children recycle after 4 jobs: the totals must keep what the replaced ones counted.
    let pool = Worker::start(
        &broker,
        &backend,
        &q,
        &["-P", "2", "-c", "4", "--max-tasks-per-child", "4"],
    );
    let (status, _) = pool.wait_for("/readyz", Duration::from_secs(20), |s, _| s == 200);
    assert_eq!(status, 200, "the pool never became ready");
    let c = client(&broker, &backend).await;
    let opts = SendOptions::new().queue(&q);

    // A job revoked before it is due: held for its ETA, then skipped as REVOKED.
    let revoked = c
        .send_task(
            "demo.sleep_ms",
            vec![json!(1)],
            Default::default(),
            &opts.clone().countdown(Duration::from_secs(3)),
        )
        .await
        .unwrap();
    c.revoke(&[revoked.id().to_owned()], false).await.unwrap();
    let mut handles = Vec::new();
    for i in 0..5 {
        handles.push((
            State::Success,
            c.send_task(
                "demo.add",
                vec![json!(i), json!(1)],
                Default::default(),
                &opts,
            )
            .await
            .unwrap(),
        ));
    }
    for _ in 0..3 {
        handles.push((
            State::Failure,
            c.send_task("demo.fail", vec![json!("boom")], Default::default(), &opts)
                .await
                .unwrap(),
        ));
    }
    // Fails twice (two retries), then succeeds.
    let key = format!("{q}-flaky");
    handles.push((
        State::Success,
        c.send_task(
            "demo.flaky",
            vec![json!(key), json!(2)],
            Default::default(),
            &opts,
        )
        .await
        .unwrap(),
    ));
    handles.push((State::Revoked, revoked));
    for (want, h) in &handles {
        let m = h.wait_meta(Some(Duration::from_secs(30))).await.unwrap();
        assert_eq!(
            m.status,
            *want,
            "{} ended {:?}: {}",
            h.id(),
            m.status,
            pool.log()
        );
    }

    let by = |name: &'static str| [("name", name), ("queue_name", q.as_str())];
    type Want<'a> = (&'a str, [(&'a str, &'a str); 2], f64);
    let want: Vec<Want> = vec![
        ("celery_task_received_total", by("demo.add"), 5.0),
        ("celery_task_started_total", by("demo.add"), 5.0),
        ("celery_task_succeeded_total", by("demo.add"), 5.0),
        ("celery_task_runtime_count", by("demo.add"), 5.0),
        ("celery_task_received_total", by("demo.fail"), 3.0),
        ("celery_task_failed_total", by("demo.fail"), 3.0),
        ("celery_task_succeeded_total", by("demo.fail"), 0.0),
        ("celery_task_received_total", by("demo.flaky"), 3.0),
        ("celery_task_started_total", by("demo.flaky"), 3.0),
        ("celery_task_retried_total", by("demo.flaky"), 2.0),
        ("celery_task_sent_total", by("demo.flaky"), 2.0),
        ("celery_task_succeeded_total", by("demo.flaky"), 1.0),
        ("celery_task_received_total", by("demo.sleep_ms"), 1.0),
        ("celery_task_started_total", by("demo.sleep_ms"), 0.0),
        ("celery_task_revoked_total", by("demo.sleep_ms"), 1.0),
    ];
    // (Gauges too: both children up and reporting, a recycled one's successor may not have
    // reported yet, and the queue seen empty, which a child measures once a second.)
    let matches = |text: &str| {
        want.iter().all(|(m, with, n)| total(text, m, with) == *n)
            && total(text, "celery_worker_up", &[]) == 2.0
            && total(text, "celery_queue_length", &[("queue_name", q.as_str())]) == 0.0
    };
    // Children report every second; wait for the last reports, then hold the counts to the exact
    // numbers (none counted twice, none lost with a recycled child).
    let (_, text) = pool.wait_for("/metrics", Duration::from_secs(15), |s, t| {
        s == 200 && matches(t)
    });
    for (m, with, n) in &want {
        assert_eq!(total(&text, m, with), *n, "{m} {with:?}\n{text}");
    }
    assert_eq!(
        total(
            &text,
            "celery_task_failed_total",
            &[("name", "demo.fail"), ("exception", "ValueError")]
        ),
        3.0
    );
    assert!(
        total(
            &text,
            "celerity_process_restarts_total",
            &[("cause", "max_tasks")]
        ) >= 1.0,
        "{text}"
    );
    assert_eq!(total(&text, "celery_worker_up", &[]), 2.0, "{text}");
    assert_eq!(
        total(&text, "celery_queue_length", &[("queue_name", q.as_str())]),
        0.0,
        "{text}"
    );
    assert!(
        text.contains("# TYPE celery_task_runtime histogram"),
        "{text}"
    );
    assert!(text.trim_end().ends_with("# EOF"));
    assert_eq!(pool.get("/healthz").0, 200);
    assert_eq!(pool.get("/readyz").0, 200);
    assert_eq!(pool.get("/nothing").0, 404);
    drop(pool);
    delete_redis_prefix(&q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_a_redis_outage_while_healthz_stays_ok() {
    let Some(mut redis) = PrivateRedis::start_in(PORTS).await else {
        panic!("cannot start a private redis-server on ports {PORTS:?}");
    };
    let q = unique("metrics-ready");
    let url = redis.url();
    let node = format!("{q}@probe");
    let worker = Worker::start(&url, &url, &q, &["-P", "0", "-c", "2", "-n", &node]);
    let ready = |s: u16, _: &str| s == 200;
    assert_eq!(
        worker.wait_for("/readyz", Duration::from_secs(20), ready).0,
        200,
        "never ready"
    );
    assert_eq!(worker.get("/healthz").0, 200);
    // `inspect ping -d NODE` as an exec probe: 0 only if every named node answered.
    let ping = |nodes: &str| {
        Command::new(env!("CARGO_BIN_EXE_celerity"))
            .args(["--broker", &url, "inspect", "ping", "-d", nodes, "-t", "2"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run celerity inspect ping")
            .success()
    };
    assert!(ping(&node), "inspect ping -d {node} failed");
    assert!(
        !ping(&format!("{node},nobody@nowhere")),
        "a silent node must fail the ping"
    );
    assert!(!ping("nobody@nowhere"));

    // While Redis is down (6 s): /readyz must turn 503 and /healthz stay 200 throughout.
    let addr = worker.addr.clone();
    let watcher = std::thread::spawn(move || {
        let until = Instant::now() + Duration::from_secs(5);
        let (mut unready, mut unhealthy) = (None, Vec::new());
        while Instant::now() < until {
            let r = http_get(&addr, "/readyz").unwrap_or((0, String::new()));
            if r.0 == 503 && unready.is_none() {
                unready = Some(r.1);
            }
            let h = http_get(&addr, "/healthz").map_or(0, |h| h.0);
            if h != 200 {
                unhealthy.push(h);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        (unready, unhealthy)
    });
    assert!(
        redis.restart(Duration::from_secs(6)).await,
        "redis did not come back"
    );
    let (unready, unhealthy) = watcher.join().unwrap();
    let why = unready.expect("/readyz never failed while Redis was down");
    assert!(why.contains("broker") || why.contains("backend"), "{why}");
    assert!(
        unhealthy.is_empty(),
        "/healthz failed during the outage: {unhealthy:?}"
    );

    let (status, body) = worker.wait_for("/readyz", Duration::from_secs(20), ready);
    assert_eq!(status, 200, "not ready again after Redis came back: {body}");
    assert_eq!(worker.get("/healthz").0, 200);
    let c = client(&url, &url).await;
    let add = c
        .send_task(
            "demo.add",
            vec![json!(2), json!(3)],
            Default::default(),
            &SendOptions::new().queue(&q),
        )
        .await
        .unwrap();
    assert_eq!(
        add.get(Some(Duration::from_secs(20))).await.unwrap(),
        json!(5)
    );
    let (_, text) = worker.wait_for("/metrics", Duration::from_secs(5), |_, t| {
        total(t, "celery_task_succeeded_total", &[("name", "demo.add")]) == 1.0
    });
    assert_eq!(
        total(
            &text,
            "celery_task_succeeded_total",
            &[("name", "demo.add")]
        ),
        1.0,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_child_stuck_in_a_job_fails_healthz_until_it_is_free() {
    let q = unique("metrics-stuck");
    let broker = format!("{REDIS}?global_keyprefix={q}:");
    let pool = Worker::start(&broker, &broker, &q, &["-P", "1", "-c", "2"]);
    assert_eq!(
        pool.wait_for("/readyz", Duration::from_secs(20), |s, _| s == 200)
            .0,
        200
    );
    let c = client(&broker, &broker).await;
    // demo.spin_ms blocks its thread: the child's single-threaded runtime stops reporting.
    let spin = c
        .send_task(
            "demo.spin_ms",
            vec![json!(12_000)],
            Default::default(),
            &SendOptions::new().queue(&q),
        )
        .await
        .unwrap();
    let (status, why) = pool.wait_for("/healthz", Duration::from_secs(12), |s, _| s == 503);
    assert_eq!(status, 503, "a stuck child did not make /healthz fail");
    assert!(why.contains("have not reported"), "{why}");
    let m = spin.wait_meta(Some(Duration::from_secs(30))).await.unwrap();
    assert_eq!(m.status, State::Success);
    assert_eq!(
        pool.wait_for("/healthz", Duration::from_secs(10), |s, _| s == 200)
            .0,
        200
    );

    // Past its hard time limit the supervisor kills the child: it counts the restart's cause and
    // the job's failure, which the dead child never could.
    let limited = SendOptions::new().queue(&q).time_limits(Some(1.0), None);
    let spin = c
        .send_task(
            "demo.spin_ms",
            vec![json!(60_000)],
            Default::default(),
            &limited,
        )
        .await
        .unwrap();
    let m = spin.wait_meta(Some(Duration::from_secs(30))).await.unwrap();
    assert_eq!(m.status, State::Failure);
    let killed = |_: u16, t: &str| {
        total(
            t,
            "celerity_process_restarts_total",
            &[("cause", "hard_time_limit")],
        ) == 1.0
            && total(
                t,
                "celery_task_failed_total",
                &[
                    ("name", "demo.spin_ms"),
                    ("exception", "TimeLimitExceeded"),
                    ("queue_name", &q),
                ],
            ) == 1.0
    };
    let (status, text) = pool.wait_for("/metrics", Duration::from_secs(10), killed);
    assert!(killed(status, &text), "{text}");
    drop(pool);
    delete_redis_prefix(&q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beat_serves_leader_ticks_and_standby_readiness() {
    let Some(redis) = PrivateRedis::start_in(PORTS.end..PORTS.end + 100).await else {
        panic!("cannot start a private redis-server");
    };
    let url = redis.url();
    let dir = std::env::temp_dir().join(unique("metrics-beat"));
    std::fs::create_dir_all(&dir).unwrap();
    let schedule = dir.join("schedule.toml");
    std::fs::write(
        &schedule,
        "[[entry]]\nname = \"tick\"\ntask = \"demo.noop\"\nevery = \"1s\"\nqueue = \"beat-metrics\"\n",
    )
    .unwrap();
    let path = schedule.to_string_lossy().into_owned();
    let beat =
        |url: &str| Worker::spawn(&["--broker", url, "beat", "--schedule", &path, "--lease", "2"]);
    let leader = beat(&url);
    let leading = |_: u16, t: &str| {
        total(t, "celerity_beat_leader", &[]) == 1.0
            && total(t, "celerity_beat_ticks_sent_total", &[("entry", "tick")]) >= 2.0
    };
    let (_, text) = leader.wait_for("/metrics", Duration::from_secs(20), leading);
    assert!(leading(200, &text), "{text}");
    assert!(
        total(&text, "celerity_beat_lateness_seconds_count", &[]) >= 2.0,
        "{text}"
    );
    assert!(
        total(&text, "celerity_beat_lease_renewals_total", &[]) >= 1.0,
        "{text}"
    );
    assert_eq!(leader.get("/readyz").0, 200);

    let standby = beat(&url);
    let (status, _) = standby.wait_for("/readyz", Duration::from_secs(20), |s, _| s == 200);
    assert_eq!(status, 200, "a healthy standby is ready");
    assert_eq!(
        total(&standby.get("/metrics").1, "celerity_beat_leader", &[]),
        0.0
    );
    assert_eq!(standby.get("/healthz").0, 200);

    // The leader dies: the standby takes the lease and says so.
    drop(leader);
    let (_, text) = standby.wait_for("/metrics", Duration::from_secs(20), leading);
    assert!(leading(200, &text), "the standby never led: {text}");
    drop(standby);
    drop(redis);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_embedded_beat_serves_both_on_one_listener() {
    let Some(redis) = PrivateRedis::start_in(PORTS.end + 100..PORTS.end + 200).await else {
        panic!("cannot start a private redis-server");
    };
    let url = redis.url();
    let q = unique("metrics-worker-beat");
    let dir = std::env::temp_dir().join(&q);
    std::fs::create_dir_all(&dir).unwrap();
    let schedule = dir.join("schedule.toml");
    std::fs::write(
        &schedule,
        format!(
            "[[entry]]\nname = \"tick\"\ntask = \"demo.noop\"\nevery = \"1s\"\nqueue = \"{q}\"\n"
        ),
    )
    .unwrap();
    let path = schedule.to_string_lossy().into_owned();
    let worker = Worker::start(&url, &url, &q, &["-P", "1", "-B", "--beat-schedule", &path]);
    let both = |s: u16, t: &str| {
        s == 200
            && total(t, "celerity_beat_leader", &[]) == 1.0
            && total(t, "celery_worker_up", &[]) == 1.0
            && total(t, "celery_task_succeeded_total", &[("name", "demo.noop")]) >= 1.0
    };
    let (status, text) = worker.wait_for("/metrics", Duration::from_secs(20), both);
    assert!(both(status, &text), "{text}");
    assert_eq!(worker.get("/readyz").0, 200);
    drop(worker);
    drop(redis);
    let _ = std::fs::remove_dir_all(&dir);
}
