//! deploy/ as shipped, checked as far as this machine allows (deploy/README.md says what each test
//! proved and what it could not):
//!
//! - `supervisord_runs_worker_and_beat_and_stops_them_warm`: the real supervisord runs the shipped
//!   `supervisord.conf` (paths rendered into a temp dir) against the local Redis; jobs that are
//!   running when it stops the programs all finish, and both programs exit with status 0.
//! - `systemd_units_pass_systemd_analyze_verify`: `systemd-analyze verify` and `security
//!   --offline` on the units in a private `--root` (no systemd as PID 1 is needed for that).
//! - `kubernetes_and_compose_files_validate_offline`: the schemas shipped in PyPI packages
//!   (`tests/python/deploy_validate.py` in the `scripts/deploy-venv.sh` venv).
//! - `shipped_command_lines_parse` and `shipped_schedules_check`: every command line and schedule
//!   in deploy/ is accepted by the binary built from this tree.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use celerity_broker::{connect_backend, connect_broker, State};
use celerity_client::{Client, SendOptions};
use celerity_testsupport::{text, unique, Cleanup, REDIS};

const EXE: &str = env!("CARGO_BIN_EXE_celerity");
/// Private ports (this suite's range) for the metrics endpoints the shipped files put on 9808/9809.
const WORKER_METRICS_PORT: u16 = 25808;
const BEAT_METRICS_PORT: u16 = 25809;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn shipped(rel: &str) -> String {
    let path = repo().join("deploy").join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A directory under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(unique(tag));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `program FLAG` runs and succeeds: the tool is installed.
fn installed(program: &str, flag: &str) -> bool {
    Command::new(program)
        .arg(flag)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether `celerity VERB --help` lists `flag` (flags being added on other branches).
fn binary_knows(verb: &str, flag: &str) -> bool {
    let out = Command::new(EXE).args([verb, "--help"]).output().unwrap();
    text(&out.stdout).contains(flag)
}

/// Runs `cmd` to its end, killing it after `within`.
fn run_bounded(cmd: &mut Command, within: Duration) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {cmd:?}: {e}"));
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(within) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            // SAFETY: kill(2) on the pid of our own child, which has not been reaped yet.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("{cmd:?} still running after {within:?}");
        }
    }
}

/// `key=value` (ini) or `Key=Value` (systemd) settings of `section` in `text`, comments skipped.
/// Repeated keys keep every value, in order.
fn section(text: &str, section: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut inside = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            inside = line == format!("[{section}]");
        } else if inside && !line.starts_with(['#', ';']) {
            if let Some((k, v)) = line.split_once('=') {
                out.entry(k.trim().to_owned())
                    .or_default()
                    .push(v.trim().to_owned());
            }
        }
    }
    out
}

fn one<'a>(settings: &'a BTreeMap<String, Vec<String>>, key: &str) -> &'a str {
    match settings.get(key).map(Vec::as_slice) {
        Some([v]) => v,
        other => panic!("{key}: expected one value, got {other:?}"),
    }
}

/// The number after `--grace` in a command line.
fn grace_of(command: &[String]) -> f64 {
    let at = command
        .iter()
        .position(|a| a == "--grace")
        .unwrap_or_else(|| panic!("no --grace in {command:?}"));
    command[at + 1].parse().unwrap()
}

/// `celerity ARGS --help` succeeds: clap accepted every flag and value before `--help`. Without
/// `metrics` (the binary does not have --metrics-addr yet), `--metrics-addr X` is left out.
fn assert_parses(what: &str, args: &[String], metrics: bool) {
    let mut args = args.to_vec();
    if !metrics {
        if let Some(at) = args.iter().position(|a| a == "--metrics-addr") {
            args.drain(at..at + 2);
        }
    }
    let out = Command::new(EXE)
        .args(&args)
        .arg("--help")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{what}: celerity {args:?} refused: {}",
        text(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------------
// supervisord

/// The `[program:NAME]` command of the shipped conf, as the words after `exec`.
fn program_command(conf: &str, name: &str) -> Vec<String> {
    let settings = section(conf, &format!("program:{name}"));
    let command = one(&settings, "command");
    let exec = command
        .split("exec ")
        .nth(1)
        .unwrap_or_else(|| panic!("{name}: command does not exec celerity: {command}"));
    exec.trim_end_matches('\'')
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// The shipped conf's stop settings for both programs: what makes a stop warm and unhurried.
#[test]
fn shipped_supervisord_conf_stops_warm() {
    let conf = shipped("supervisord/supervisord.conf");
    for name in ["celerity-worker", "celerity-beat"] {
        let s = section(&conf, &format!("program:{name}"));
        assert_eq!(one(&s, "stopsignal"), "TERM", "{name}");
        assert_eq!(one(&s, "stopasgroup"), "true", "{name}");
        assert_eq!(one(&s, "killasgroup"), "true", "{name}");
        assert_eq!(one(&s, "user"), "celerity", "{name}");
        let command = program_command(&conf, name);
        assert_eq!(command[0], "/usr/local/bin/celerity", "{name}");
        if name == "celerity-worker" {
            let wait: f64 = one(&s, "stopwaitsecs").parse().unwrap();
            let grace = grace_of(&command);
            assert!(
                wait > grace,
                "stopwaitsecs {wait} must exceed --grace {grace}"
            );
        }
    }
}

/// The shipped conf with its paths moved into `dir`. Only paths change, and the `user=` lines go
/// (the test cannot create the `celerity` user); the metrics addresses move to private ports.
fn render_supervisord_conf(conf: &str, dir: &TempDir) -> String {
    let mut out = conf
        .replace("/usr/local/bin/celerity", EXE)
        .replace("/etc/celerity", dir.path("etc").to_str().unwrap())
        .replace("/var/log/celerity", dir.path("log").to_str().unwrap())
        .replace("/var/lib/celerity", dir.path("lib").to_str().unwrap())
        .replace("/run/celerity", dir.path("run").to_str().unwrap())
        .replace("0.0.0.0:9808", &format!("127.0.0.1:{WORKER_METRICS_PORT}"))
        .replace("0.0.0.0:9809", &format!("127.0.0.1:{BEAT_METRICS_PORT}"));
    out = out
        .lines()
        .filter(|l| !l.starts_with("user="))
        .map(|l| format!("{l}\n"))
        .collect();
    out
}

/// A private supervisord (`-n`, our child). Dropping it SIGKILLs supervisord and the process
/// groups of the programs it started (supervisord puts each program in its own group).
struct Supervisord {
    child: std::process::Child,
    conf: PathBuf,
}

impl Supervisord {
    fn start(conf: PathBuf) -> Supervisord {
        let child = Command::new("supervisord")
            .args(["-n", "-c"])
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start supervisord");
        Supervisord { child, conf }
    }

    fn ctl(&self, args: &[&str]) -> String {
        let out = run_bounded(
            Command::new("supervisorctl")
                .arg("-c")
                .arg(&self.conf)
                .args(args),
            Duration::from_secs(120),
        );
        text(&out.stdout)
    }

    /// Waits until `supervisorctl status` shows every program RUNNING (after `startsecs`).
    fn wait_running(&self, programs: &[&str], within: Duration) {
        let end = Instant::now() + within;
        loop {
            let status = self.ctl(&["status"]);
            let running = programs.iter().all(|p| {
                status
                    .lines()
                    .any(|l| l.starts_with(p) && l.contains("RUNNING"))
            });
            if running {
                return;
            }
            assert!(Instant::now() < end, "not all RUNNING:\n{status}");
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn children(&self) -> Vec<i32> {
        let out = Command::new("pgrep")
            .arg("-P")
            .arg(self.child.id().to_string())
            .output()
            .unwrap();
        text(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// SIGTERM (supervisord stops every program first), then waits for its exit.
    fn shut_down(&mut self, within: Duration) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own, unreaped child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < end, "supervisord still running");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Supervisord {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        for pid in self.children() {
            // SAFETY: the process group of a program our supervisord started.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET path` on 127.0.0.1:`port`; the status code.
fn http_status(port: u16, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    raw.split_whitespace().nth(1)?.parse().ok()
}

fn wait_http_ok(port: u16, path: &str, within: Duration) {
    let end = Instant::now() + within;
    while http_status(port, path) != Some(200) {
        assert!(
            Instant::now() < end,
            "GET {path} on {port} never answered 200"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The local Redis, every key under `prefix`.
fn redis_url(prefix: &str) -> String {
    format!("{REDIS}?global_keyprefix={prefix}")
}

async fn queued_ids(redis: &mut redis::aio::MultiplexedConnection, key: &str) -> Vec<String> {
    let raw: Vec<String> = redis::cmd("LRANGE")
        .arg(key)
        .arg(0)
        .arg(-1)
        .query_async(redis)
        .await
        .unwrap();
    raw.iter()
        .filter_map(|m| serde_json::from_str::<Value>(m).ok())
        .filter_map(|v| v["headers"]["id"].as_str().map(str::to_owned))
        .collect()
}

const SLEEP_MS: u64 = 6000;
const SLEEPERS: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supervisord_runs_worker_and_beat_and_stops_them_warm() {
    if !installed("supervisord", "--version") || !installed("supervisorctl", "-h") {
        eprintln!(
            "SKIPPED supervisord_runs_worker_and_beat_and_stops_them_warm: supervisord is not \
             installed (apt-get install supervisor, or scripts/ci-setup.sh)"
        );
        return;
    }
    let prefix = format!("{}:", unique("deploytest"));
    let _cleanup = Cleanup::new().redis_prefix(prefix.clone());
    let url = redis_url(&prefix);
    let dir = TempDir::new("celerity-supervisord");
    for sub in ["etc", "log", "lib", "run"] {
        std::fs::create_dir_all(dir.path(sub)).unwrap();
    }
    std::fs::write(
        dir.path("etc/celerity.env"),
        format!("CELERITY_BROKER_URL={url}\nCELERITY_RESULT_BACKEND={url}\n"),
    )
    .unwrap();
    std::fs::write(
        dir.path("etc/schedule.toml"),
        "[[entry]]\nname = \"tick\"\ntask = \"demo.add\"\nargs = [20, 22]\nevery = \"1s\"\nqueue = \"celery\"\n",
    )
    .unwrap();
    let conf = dir.path("etc/supervisord.conf");
    let rendered = render_supervisord_conf(&shipped("supervisord/supervisord.conf"), &dir);
    std::fs::write(&conf, &rendered).unwrap();

    let mut sup = Supervisord::start(conf);
    sup.wait_running(
        &["celerity-worker", "celerity-beat"],
        Duration::from_secs(40),
    );
    let metrics = binary_knows("worker", "--metrics-addr");
    if metrics {
        wait_http_ok(WORKER_METRICS_PORT, "/healthz", Duration::from_secs(20));
        wait_http_ok(WORKER_METRICS_PORT, "/readyz", Duration::from_secs(20));
        wait_http_ok(BEAT_METRICS_PORT, "/healthz", Duration::from_secs(20));
    } else {
        eprintln!("this binary has no --metrics-addr yet: /healthz and /readyz not probed");
    }

    let client = Client::new(
        connect_broker(&url).await.unwrap(),
        Some(connect_backend(&url).await.unwrap()),
    );
    let to_celery = SendOptions::new().queue("celery");
    let add = client
        .send_task(
            "demo.add",
            vec![json!(2), json!(3)],
            Default::default(),
            &to_celery,
        )
        .await
        .unwrap();
    let first = add.get(Some(Duration::from_secs(30))).await.unwrap();
    assert_eq!(first, json!(5));

    let mut sleepers = Vec::new();
    for _ in 0..SLEEPERS {
        sleepers.push(
            client
                .send_task(
                    "demo.sleep_ms",
                    vec![json!(SLEEP_MS)],
                    Default::default(),
                    &to_celery,
                )
                .await
                .unwrap(),
        );
    }
    // Stop once the worker holds every sleeper (none left in the queue).
    let mut redis = redis::Client::open(REDIS)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let ids: Vec<String> = sleepers.iter().map(|s| s.id().to_owned()).collect();
    let end = Instant::now() + Duration::from_secs(20);
    while queued_ids(&mut redis, &format!("{prefix}celery"))
        .await
        .iter()
        .any(|q| ids.contains(q))
    {
        assert!(Instant::now() < end, "the worker never took the sleepers");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let backend = client.backend().unwrap();
    let mut finished_before_stop = 0;
    for id in &ids {
        if backend.get(id).await.unwrap().status == State::Success {
            finished_before_stop += 1;
        }
    }
    assert!(
        finished_before_stop < SLEEPERS,
        "every sleeper finished before the stop: the stop tested nothing"
    );
    let beat_runs: usize = redis::cmd("HLEN")
        .arg(format!("{prefix}celerity.beat.last_run"))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(beat_runs >= 1, "beat under supervisord sent nothing");

    // What a `supervisorctl stop all` (an operator, or a package upgrade) does: each program's
    // stopsignal, then up to stopwaitsecs.
    let stopped = tokio::task::block_in_place(|| sup.ctl(&["stop", "all"]));
    assert!(
        stopped.contains("celerity-worker: stopped") && stopped.contains("celerity-beat: stopped"),
        "{stopped}"
    );
    let status = tokio::task::block_in_place(|| sup.shut_down(Duration::from_secs(30)));
    assert!(status.success(), "supervisord: {status:?}");

    for (id, sleeper) in ids.iter().zip(&sleepers) {
        let meta = backend.get(id).await.unwrap();
        assert_eq!(meta.status, State::Success, "{id}: {meta:?}");
        assert_eq!(
            sleeper.get(Some(Duration::from_secs(1))).await.unwrap(),
            json!(SLEEP_MS)
        );
    }
    let log = std::fs::read_to_string(dir.path("log/supervisord.log")).unwrap();
    for program in ["celerity-worker", "celerity-beat"] {
        assert!(
            log.contains(&format!("stopped: {program} (exit status 0)")),
            "{program} did not exit 0:\n{log}"
        );
    }
    assert!(!log.contains("SIGKILL"), "supervisord had to kill:\n{log}");
    eprintln!(
        "supervisord: {SLEEPERS} jobs of {SLEEP_MS} ms running at the stop \
         ({finished_before_stop} finished before it), all SUCCESS; beat sent {beat_runs} entry"
    );
}

// ---------------------------------------------------------------------------------------------
// systemd

const UNITS: [&str; 2] = ["celerity-worker@.service", "celerity-beat.service"];

/// `${VAR}` in a unit's ExecStart filled from its `Environment=VAR=value` defaults, `%i`/`%H`
/// from an instance and host name; the words after the executable.
fn exec_start_args(unit: &str, instance: &str) -> Vec<String> {
    let s = section(unit, "Service");
    let mut line = one(&s, "ExecStart")
        .replace("%i", instance)
        .replace("%H", "host");
    for env in s.get("Environment").into_iter().flatten() {
        if let Some((k, v)) = env.split_once('=') {
            line = line.replace(&format!("${{{k}}}"), v);
        }
    }
    assert!(!line.contains("${"), "unfilled variable in {line}");
    line.split_whitespace().skip(1).map(str::to_owned).collect()
}

/// The settings the units promise: a dedicated user, an EnvironmentFile, SIGTERM with more time
/// than --grace, restart on failure, hardening.
#[test]
fn shipped_systemd_units_stop_warm_and_are_hardened() {
    for name in UNITS {
        let unit = shipped(&format!("systemd/{name}"));
        let s = section(&unit, "Service");
        assert_eq!(one(&s, "User"), "celerity", "{name}");
        assert_eq!(one(&s, "KillSignal"), "SIGTERM", "{name}");
        assert_eq!(one(&s, "Restart"), "on-failure", "{name}");
        assert!(
            s.get("EnvironmentFile")
                .is_some_and(|f| f.iter().any(|f| f == "/etc/celerity/celerity.env")),
            "{name}"
        );
        for (key, value) in [
            ("NoNewPrivileges", "true"),
            ("ProtectSystem", "strict"),
            ("ProtectHome", "true"),
            ("PrivateTmp", "true"),
            ("CapabilityBoundingSet", ""),
        ] {
            assert_eq!(one(&s, key), value, "{name}: {key}");
        }
        let args = exec_start_args(&unit, "celery");
        let timeout: f64 = one(&s, "TimeoutStopSec").parse().unwrap();
        if args[0] == "worker" {
            let grace = grace_of(&args);
            assert!(
                timeout > grace,
                "{name}: TimeoutStopSec {timeout} <= --grace {grace}"
            );
        }
    }
}

/// The last `Overall exposure level for UNIT: N.N` of `systemd-analyze security`.
fn exposure(out: &str) -> f64 {
    let line = out
        .lines()
        .rfind(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level in:\n{out}"));
    let after = line.rsplit(": ").next().unwrap_or_default();
    after.split_whitespace().next().unwrap().parse().unwrap()
}

/// A filesystem root for `systemd-analyze --root`: the host's own unit files (the targets ours
/// name), ours, and stand-ins for the executables they run (verify checks they exist).
fn systemd_root(dir: &TempDir) -> Option<PathBuf> {
    let host_units = Path::new("/usr/lib/systemd/system");
    if !host_units.is_dir() {
        return None;
    }
    let root = dir.path("root");
    for sub in [
        "usr/lib/systemd",
        "etc/systemd/system",
        "usr/local/bin",
        "bin",
    ] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    let copied = Command::new("cp")
        .arg("-a")
        .arg(host_units)
        .arg(root.join("usr/lib/systemd/"))
        .status()
        .unwrap();
    assert!(copied.success());
    for exe in ["usr/local/bin/celerity", "bin/kill"] {
        let path = root.join(exe);
        std::fs::write(&path, "#!/bin/sh\nexit 0\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    for name in UNITS {
        std::fs::write(
            root.join("etc/systemd/system").join(name),
            shipped(&format!("systemd/{name}")),
        )
        .unwrap();
    }
    Some(root)
}

fn analyze(root: &Path, args: &[&str]) -> (bool, String) {
    let out = run_bounded(
        Command::new("systemd-analyze")
            .arg(format!("--root={}", root.display()))
            .args(args),
        Duration::from_secs(60),
    );
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    (out.status.success(), all)
}

/// `systemd-analyze verify` loads both units (a worker instance and beat) without one warning, and
/// `security --offline` rates their exposure at most 2.0 ("OK"). A deliberately broken unit in the
/// same root is reported, which shows verify checks what it loads in this mode.
#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    if !installed("systemd-analyze", "--version") {
        eprintln!("SKIPPED systemd_units_pass_systemd_analyze_verify: no systemd-analyze");
        return;
    }
    let dir = TempDir::new("celerity-systemd");
    let Some(root) = systemd_root(&dir) else {
        eprintln!("SKIPPED systemd_units_pass_systemd_analyze_verify: no /usr/lib/systemd/system");
        return;
    };
    let units = ["celerity-worker@celery.service", "celerity-beat.service"];
    let (ok, out) = analyze(&root, &[&["verify", "--man=no"][..], &units[..]].concat());
    assert!(ok && out.trim().is_empty(), "verify:\n{out}");

    let broken = shipped("systemd/celerity-beat.service")
        .replace("KillSignal=SIGTERM", "KillSignal=SIGTERMM")
        .replace("TimeoutStopSec=", "TimeoutStopSecs=");
    std::fs::write(root.join("etc/systemd/system/broken.service"), broken).unwrap();
    let (_, out) = analyze(&root, &["verify", "--man=no", "broken.service"]);
    assert!(
        out.contains("SIGTERMM") && out.contains("TimeoutStopSecs"),
        "verify missed the broken unit:\n{out}"
    );

    for unit in units {
        let (_, out) = analyze(&root, &["security", "--offline=true", unit]);
        let level = exposure(&out);
        assert!(level <= 2.0, "{unit}: exposure {level}\n{out}");
        eprintln!("{unit}: systemd-analyze security exposure {level}");
    }
}

// ---------------------------------------------------------------------------------------------
// Kubernetes, compose, and what every file gives the binary

/// The python of `scripts/deploy-venv.sh`, or `None` with `CELERITY_NO_PYTHON`. Panics if the venv
/// cannot be made: the validators must run.
fn deploy_python() -> Option<PathBuf> {
    if std::env::var_os("CELERITY_NO_PYTHON").is_some() {
        return None;
    }
    let script = repo().join("scripts/deploy-venv.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "{} failed", script.display());
    let stdout = text(&out.stdout);
    Some(PathBuf::from(
        stdout.lines().last().unwrap_or_default().trim(),
    ))
}

/// The validator's findings: command lines and schedules in the Kubernetes and compose files.
fn validate_manifests(python: &Path, dir: &TempDir) -> Value {
    let found = dir.path("found.json");
    let out = run_bounded(
        Command::new(python)
            .arg(repo().join("celerity/tests/python/deploy_validate.py"))
            .arg(repo().join("deploy"))
            .arg(&found),
        Duration::from_secs(120),
    );
    let report = text(&out.stdout);
    eprintln!("{report}{}", text(&out.stderr));
    assert!(out.status.success(), "deploy_validate.py failed:\n{report}");
    assert!(report.contains("deploy-validate: ok"));
    serde_json::from_str(&std::fs::read_to_string(found).unwrap()).unwrap()
}

/// Kubernetes manifests against the Kubernetes 1.37 schemas (strict) and the KEDA objects by
/// structure; compose.yaml against the compose-spec schema; and their cross-file promises.
#[test]
fn kubernetes_and_compose_files_validate_offline() {
    let Some(python) = deploy_python() else {
        eprintln!("SKIPPED kubernetes_and_compose_files_validate_offline: CELERITY_NO_PYTHON");
        return;
    };
    let dir = TempDir::new("celerity-manifests");
    let found = validate_manifests(&python, &dir);
    let commands = found["commands"].as_object().unwrap();
    assert_eq!(commands.len(), 4, "{commands:?}");
}

/// Every command line in deploy/ is accepted by this tree's binary (clap parses them up to a final
/// `--help`): the supervisord programs, the systemd ExecStarts, the Containerfile's CMD, and (with
/// the venv) the Kubernetes and compose args.
#[test]
fn shipped_command_lines_parse() {
    let metrics =
        binary_knows("worker", "--metrics-addr") && binary_knows("beat", "--metrics-addr");
    if !metrics {
        eprintln!("this binary has no --metrics-addr yet: it is left out of the checked lines");
    }
    let conf = shipped("supervisord/supervisord.conf");
    for name in ["celerity-worker", "celerity-beat"] {
        let command = program_command(&conf, name);
        assert_parses(&format!("supervisord {name}"), &command[1..], metrics);
    }
    for name in UNITS {
        let args = exec_start_args(&shipped(&format!("systemd/{name}")), "celery");
        assert_parses(name, &args, metrics);
    }
    let containerfile = shipped("container/Containerfile");
    let cmd = containerfile
        .lines()
        .find_map(|l| l.strip_prefix("CMD "))
        .expect("Containerfile has a CMD");
    let cmd: Vec<String> = serde_json::from_str(cmd).unwrap();
    assert_parses("Containerfile CMD", &cmd, metrics);

    let Some(python) = deploy_python() else {
        return;
    };
    let dir = TempDir::new("celerity-commands");
    let found = validate_manifests(&python, &dir);
    for (what, args) in found["commands"].as_object().unwrap() {
        let args: Vec<String> = serde_json::from_value(args.clone()).unwrap();
        assert_parses(what, &args, metrics);
    }
}

/// Every beat schedule in deploy/ passes `celerity beat --check`.
#[test]
fn shipped_schedules_check() {
    let dir = TempDir::new("celerity-schedules");
    let mut schedules = vec![
        (
            "schedule.toml.example".to_owned(),
            shipped("schedule.toml.example"),
        ),
        (
            "compose/schedule.toml".to_owned(),
            shipped("compose/schedule.toml"),
        ),
    ];
    if let Some(python) = deploy_python() {
        let found = validate_manifests(&python, &dir);
        for (what, body) in found["schedules"].as_object().unwrap() {
            schedules.push((what.clone(), body.as_str().unwrap().to_owned()));
        }
    }
    assert!(schedules.len() >= 2);
    for (i, (what, body)) in schedules.iter().enumerate() {
        let file = dir.path(&format!("schedule-{i}.toml"));
        std::fs::write(&file, body).unwrap();
        let out = Command::new(EXE)
            .args(["beat", "--check"])
            .arg(&file)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "{what}: {}", text(&out.stderr));
    }
}
