//! No password where another user or a log can read it: not in `--help` (clap shows the values of
//! environment variables), not on the command line of a pool's worker processes (`ps` shows them).

use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use celerity_client::{Client, SendOptions};
use celerity_testsupport::{celerity_command, text, ChildGuard, Cleanup};

/// Broker and backend URLs whose passwords the tests look for.
const BROKER_PW: &str = "broker-secret-pw";
const BACKEND_PW: &str = "backend-secret-pw";

fn broker_url() -> String {
    format!("amqp://guest:{BROKER_PW}@127.0.0.1:1//")
}

fn backend_url() -> String {
    format!("redis://default:{BACKEND_PW}@127.0.0.1:1/0")
}

fn help(args: &[&str]) -> Output {
    celerity_command(env!("CARGO_BIN_EXE_celerity"))
        .args(args)
        .env("CELERITY_BROKER_URL", broker_url())
        .env("CELERITY_RESULT_BACKEND", backend_url())
        .output()
        .expect("run celerity")
}

#[test]
fn help_never_shows_the_urls_in_the_environment() {
    let verbs: &[&[&str]] = &[
        &[],
        &["worker"],
        &["beat"],
        &["call"],
        &["result"],
        &["purge"],
        &["queues"],
        &["revoke"],
        &["demo"],
        &["inspect"],
        &["inspect", "ping"],
        &["control"],
        &["control", "shutdown"],
    ];
    for verb in verbs {
        for flag in ["--help", "-h"] {
            let args: Vec<&str> = verb.iter().copied().chain([flag]).collect();
            let out = help(&args);
            let shown = format!("{}{}", text(&out.stdout), text(&out.stderr));
            assert!(out.status.success(), "{args:?}: {shown}");
            assert!(shown.contains("CELERITY_BROKER_URL"), "{args:?}: {shown}");
            for secret in [BROKER_PW, BACKEND_PW] {
                assert!(!shown.contains(secret), "{args:?} shows {secret}: {shown}");
            }
        }
        let args: Vec<&str> = ["help"].iter().chain(verb.iter()).copied().collect();
        let out = help(&args);
        let shown = format!("{}{}", text(&out.stdout), text(&out.stderr));
        for secret in [BROKER_PW, BACKEND_PW] {
            assert!(!shown.contains(secret), "{args:?} shows {secret}: {shown}");
        }
    }
}

/// The pids of `parent`'s children.
fn children_of(parent: u32) -> Vec<u32> {
    let out = std::process::Command::new("pgrep")
        .arg("-P")
        .arg(parent.to_string())
        .output()
        .expect("pgrep");
    text(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// A process's command line as `ps` shows it (arguments joined by spaces).
fn cmdline(pid: u32) -> String {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    text(&raw).replace('\0', " ")
}

/// The local Redis has no password, and accepts any for the user `default` (`nopass`): the URLs carry
/// passwords that must not show on the worker processes' command lines, and still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_processes_do_not_show_the_urls_on_their_command_lines() {
    let q = celerity_testsupport::unique("secretstest");
    let _cleanup = Cleanup::new().redis_prefix(format!("{q}:"));
    let broker = format!("redis://default:{BROKER_PW}@127.0.0.1:6379/0?global_keyprefix={q}:");
    let backend = format!("redis://default:{BACKEND_PW}@127.0.0.1:6379/0?global_keyprefix={q}:");
    let mut pool = ChildGuard::spawn(
        celerity_command(env!("CARGO_BIN_EXE_celerity"))
            .args(["--broker", &broker])
            .args(["worker", "-Q", &q, "-P", "2", "-c", "2"])
            .arg(format!("--backend={backend}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        "celerity worker -P 2",
    );
    let supervisor = pool.id();
    let until = Instant::now() + Duration::from_secs(20);
    let children = loop {
        let c = children_of(supervisor);
        if c.len() == 2 || Instant::now() > until {
            break c;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // Killed with the supervisor too (they die with their parent), but at once.
    let _children = children
        .iter()
        .map(|pid| KillOnDrop(*pid))
        .collect::<Vec<_>>();
    assert_eq!(children.len(), 2, "the pool did not start 2 processes");

    // What the user typed shows on the supervisor's own command line: that is theirs to choose.
    assert!(cmdline(supervisor).contains(BROKER_PW));
    for pid in &children {
        let line = cmdline(*pid);
        assert!(line.contains("worker"), "{pid}: {line}");
        for secret in [BROKER_PW, BACKEND_PW] {
            assert!(
                !line.contains(secret),
                "process {pid} shows {secret}: {line}"
            );
        }
    }

    // The processes got the URLs all the same (the key prefix included): the pool serves.
    let c = Client::connect(&broker, Some(&backend)).await.unwrap();
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
    let _ = c.broker().close().await;
    pool.kill();
}

/// SIGKILLs a process when dropped (a pool's worker process, also when the test fails).
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0) {
            // SAFETY: kill(2) with a pid and a signal number.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}
