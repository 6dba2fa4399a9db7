//! Running the `celerity` binary in production: its logs (no colour escapes off a terminal, JSON
//! lines, `-l`), the default number of worker processes, and the `--config` file (precedence,
//! `config check`, a worker started from the file alone), against the real Redis.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use celerity_client::{Client, SendOptions};
use celerity_testsupport::{celerity_command, delete_redis_prefix, text, ChildGuard, REDIS};
use serde_json::{json, Map, Value};

const BIN: &str = env!("CARGO_BIN_EXE_celerity");

/// A test's own key prefix, queue and scratch directory; the prefix's keys and the directory are
/// removed at the end (also when the test fails: see [`Scratch::drop`]).
struct Scratch {
    queue: String,
    url: String,
    dir: PathBuf,
}

impl Scratch {
    fn new() -> Scratch {
        let queue = celerity_testsupport::unique("ops");
        let dir = std::env::temp_dir().join(&queue);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch {
            url: format!("{REDIS}?global_keyprefix={queue}:"),
            queue,
            dir,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn write(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, contents).unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        let prefix = self.queue.clone();
        // The keys go whether the test passed or not.
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(delete_redis_prefix(&prefix));
            }
        })
        .join();
    }
}

/// `celerity` with no broker, backend, config file or log settings from the environment, and its
/// stderr into `log`.
fn command(log: &Path) -> Command {
    let mut cmd = celerity_command(BIN);
    for var in [
        "CELERITY_CONFIG",
        "CELERITY_LOG",
        "CELERITY_LOG_FORMAT",
        "CELERITY_WORKER_THREADS",
        "NO_COLOR",
    ] {
        cmd.env_remove(var);
    }
    cmd.stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    cmd
}

/// Sends `name(*args, **kwargs)` and waits for its value (`Err`: the failure's text).
async fn run_job(
    url: &str,
    queue: &str,
    name: &str,
    args: Value,
    kwargs: Value,
) -> Result<Value, String> {
    let client = Client::connect(url, None).await.unwrap();
    let args = args.as_array().cloned().unwrap_or_default();
    let kwargs: Map<String, Value> = kwargs.as_object().cloned().unwrap_or_default();
    let handle = client
        .send_task(
            name,
            args,
            kwargs,
            &SendOptions::new().queue(queue.to_owned()),
        )
        .await
        .unwrap();
    let out = handle
        .get(Some(Duration::from_secs(20)))
        .await
        .map_err(|e| e.to_string());
    client.close().await.unwrap();
    out
}

/// SIGTERM, then waits (at most 20 s) for the process to exit; SIGKILL by the guard otherwise.
fn stop(mut worker: ChildGuard) {
    let pid = i32::try_from(worker.id()).unwrap();
    // SAFETY: a plain kill(2) of our own child's pid.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if worker.child().try_wait().unwrap().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A one-process worker on `s`'s queue with `extra` flags, its stderr in `log`.
fn worker(s: &Scratch, log: &Path, extra: &[&str], env: &[(&str, &str)]) -> ChildGuard {
    let mut cmd = command(log);
    cmd.args([
        "--broker", &s.url, "worker", "-Q", &s.queue, "-P", "0", "-c", "2", "--grace", "1",
    ])
    .args(extra)
    .envs(env.iter().copied());
    ChildGuard::spawn(&mut cmd, "celerity worker")
}

fn json_lines(log: &Path) -> Vec<Value> {
    let raw = std::fs::read_to_string(log).unwrap();
    raw.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str::<Value>(l)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {l}\n{raw}"))
        })
        .collect()
}

#[tokio::test]
async fn text_logs_off_a_terminal_have_no_colour_escapes() {
    let s = Scratch::new();
    let log = s.path("worker.log");
    let w = worker(&s, &log, &[], &[]);
    assert_eq!(
        run_job(&s.url, &s.queue, "demo.add", json!([2, 3]), json!({})).await,
        Ok(json!(5))
    );
    stop(w);
    let raw = std::fs::read(&log).unwrap();
    let shown = text(&raw);
    assert!(shown.contains("succeeded"), "{shown}");
    assert!(!raw.contains(&0x1b), "colour escapes in a file: {shown:?}");
}

#[tokio::test]
async fn json_logs_are_one_object_per_line_naming_the_job() {
    let s = Scratch::new();
    let log = s.path("worker.log");
    let w = worker(&s, &log, &["--log-format", "json"], &[]);
    let value = run_job(
        &s.url,
        &s.queue,
        "demo.add",
        json!([]),
        json!({"x": 4, "y": 5}),
    )
    .await;
    assert_eq!(value, Ok(json!(9)));
    stop(w);
    let lines = json_lines(&log);
    for l in &lines {
        for key in ["timestamp", "level", "target", "message"] {
            assert!(l.get(key).is_some_and(Value::is_string), "no {key}: {l}");
        }
    }
    let done = lines
        .iter()
        .find(|l| l["message"] == json!("succeeded"))
        .unwrap_or_else(|| panic!("no `succeeded` line: {lines:?}"));
    assert_eq!(done["task_name"], json!("demo.add"), "{done}");
    assert!(
        done["task_id"].as_str().is_some_and(|id| id.len() == 36),
        "{done}"
    );
    assert_eq!(done["level"], json!("INFO"));
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == json!("worker stopped")),
        "{lines:?}"
    );
}

#[tokio::test]
async fn loglevel_warning_hides_info_lines_even_with_celerity_log() {
    let s = Scratch::new();
    let log = s.path("worker.log");
    // The format from the environment; -l (Celery's spelling) beats CELERITY_LOG.
    let w = worker(
        &s,
        &log,
        &["-l", "WARNING"],
        &[("CELERITY_LOG_FORMAT", "json"), ("CELERITY_LOG", "debug")],
    );
    assert_eq!(
        run_job(&s.url, &s.queue, "demo.add", json!([1, 1]), json!({})).await,
        Ok(json!(2))
    );
    let failed = run_job(
        &s.url,
        &s.queue,
        "demo.fail",
        json!([]),
        json!({"message": "no"}),
    )
    .await;
    assert!(failed.is_err_and(|e| e.contains("ValueError")));
    stop(w);
    let lines = json_lines(&log);
    for l in &lines {
        assert!(
            ["WARN", "ERROR"].contains(&l["level"].as_str().unwrap_or_default()),
            "{l}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == json!("failed") && l["task_name"] == json!("demo.fail")),
        "{lines:?}"
    );
}

/// The pids whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let out = Command::new("pgrep")
        .arg("-P")
        .arg(pid.to_string())
        .output()
        .unwrap();
    text(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

#[test]
fn a_default_pool_has_one_process_per_cpu() {
    let s = Scratch::new();
    let log = s.path("worker.log");
    let cpus = std::thread::available_parallelism().unwrap().get();
    let mut cmd = command(&log);
    cmd.args([
        "--broker", &s.url, "worker", "-Q", &s.queue, "-c", "1", "--grace", "1",
    ]);
    let w = ChildGuard::spawn(&mut cmd, "celerity worker");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = children_of(w.id());
    while seen.len() < cpus && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        seen = children_of(w.id());
    }
    // A little longer: more than one per CPU would show up here.
    std::thread::sleep(Duration::from_millis(500));
    seen = children_of(w.id());
    stop(w);
    assert_eq!(
        seen.len(),
        cpus,
        "children {seen:?}; log: {}",
        std::fs::read_to_string(&log).unwrap()
    );
}

/// `celerity ARGS…` with `env`, its output.
fn run(args: &[&str], env: &[(&str, &str)], log: &Path) -> Output {
    let mut cmd = command(log);
    cmd.args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped());
    cmd.output().unwrap()
}

#[test]
fn config_check_prints_the_effective_configuration_without_passwords() {
    let s = Scratch::new();
    let log = s.path("err.log");
    let file = s.write(
        "c.toml",
        "broker = \"redis://:hunter2-secret@127.0.0.1:6379/3\"\n\
         backend = \"redis://user:other-secret@127.0.0.1:6379/4\"\n\
         log_format = \"json\"\n\
         [worker]\nqueues = [\"a\", \"b\"]\nconcurrency = 7\nthreads = 3\nprocesses = 0\n\
         rate_limit = [\"demo.add=10/s\"]\nmetrics_addr = \"127.0.0.1:24001\"\n\
         [beat]\nschedule = \"s.toml\"\nlease = 5\n",
    );
    let f = file.to_str().unwrap();
    let out = run(&["config", "check", f], &[], &log);
    let shown = text(&out.stdout);
    assert!(
        out.status.success(),
        "{shown}{}",
        std::fs::read_to_string(&log).unwrap()
    );
    assert!(
        !shown.contains("hunter2-secret") && !shown.contains("other-secret"),
        "{shown}"
    );
    for line in [
        "broker = \"redis://:****@127.0.0.1:6379/3\"",
        "log_format = \"json\"",
        "queues = [\"a\", \"b\"]",
        "concurrency = 7",
        "threads = 3",
        "processes = 0",
        "metrics_addr = \"127.0.0.1:24001\"",
        "lease = 5.0",
    ] {
        assert!(shown.lines().any(|l| l == line), "no `{line}` in:\n{shown}");
    }
    // What is printed is a config file again.
    let again = s.write("again.toml", &shown);
    assert!(
        run(&["config", "check", again.to_str().unwrap()], &[], &log)
            .status
            .success()
    );

    // Precedence: flag > environment > file > default.
    let broker_of = |out: &Output| {
        text(&out.stdout)
            .lines()
            .find(|l| l.starts_with("broker = "))
            .unwrap_or_default()
            .to_owned()
    };
    let env = [
        ("CELERITY_BROKER_URL", "redis://127.0.0.1:6379/2"),
        ("CELERITY_WORKER_THREADS", "2"),
    ];
    let out = run(
        &["config", "check", f, "--broker", "redis://127.0.0.1:6379/1"],
        &env,
        &log,
    );
    assert_eq!(broker_of(&out), "broker = \"redis://127.0.0.1:6379/1\"");
    let out = run(&["config", "check", f], &env, &log);
    assert_eq!(broker_of(&out), "broker = \"redis://127.0.0.1:6379/2\"");
    assert!(
        text(&out.stdout).lines().any(|l| l == "threads = 2"),
        "{}",
        text(&out.stdout)
    );
    let plain = s.write("plain.toml", "[worker]\nconcurrency = 2\n");
    let out = run(&["config", "check", plain.to_str().unwrap()], &[], &log);
    assert_eq!(broker_of(&out), "broker = \"memory://\"");
}

#[test]
fn unknown_keys_and_bad_values_are_refused_naming_the_key() {
    let s = Scratch::new();
    let log = s.path("err.log");
    for (contents, key) in [
        ("[worker]\nconcurency = 4\n", "`worker.concurency`"),
        ("[worker]\nconcurrency = -4\n", "`worker.concurrency`"),
        ("[beat]\nlease = \"long\"\n", "`beat.lease`"),
        ("loglevel = \"chatty\"\n", "`loglevel`"),
        (
            "broker = \"nope://u:pw-in-bad-url@127.0.0.1:6379/0\"\n",
            "`broker`",
        ),
    ] {
        let file = s.write("bad.toml", contents);
        for args in [
            vec!["config", "check", file.to_str().unwrap()],
            vec!["--config", file.to_str().unwrap(), "worker"],
        ] {
            let out = run(&args, &[], &log);
            let err = std::fs::read_to_string(&log).unwrap();
            assert_eq!(out.status.code(), Some(2), "{args:?} {contents}: {err}");
            assert!(err.contains(key), "{args:?}: {key} not in {err}");
            assert_eq!(err.trim_end().lines().count(), 1, "{err}");
            assert!(!err.contains("pw-in-bad-url"), "{err}");
        }
    }
}

#[tokio::test]
async fn a_worker_started_from_a_config_file_alone_runs_jobs_on_redis() {
    let s = Scratch::new();
    let log = s.path("worker.log");
    let file = s.write(
        "worker.toml",
        &format!(
            "broker = \"{}\"\nlog_format = \"json\"\nloglevel = \"info\"\n\
             [worker]\nqueues = [\"{}\"]\nprocesses = 0\nconcurrency = 2\ngrace = 1\n",
            s.url, s.queue
        ),
    );
    let mut cmd = command(&log);
    cmd.arg("worker").env("CELERITY_CONFIG", &file);
    let w = ChildGuard::spawn(&mut cmd, "celerity worker");
    let value = run_job(&s.url, &s.queue, "demo.mul", json!([6]), json!({"y": 7})).await;
    assert_eq!(
        value,
        Ok(json!(42)),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    stop(w);
    let lines = json_lines(&log);
    let ready = lines
        .iter()
        .find(|l| l["message"] == json!("worker ready"))
        .unwrap();
    assert_eq!(ready["concurrency"], json!(2), "{ready}");
}
