//! No password where another user or a log can read it: not in `--help` (clap shows the values of
//! environment variables), not on the command line of a pool's worker processes (`ps` shows them).

use std::process::Output;

use celerity_testsupport::{celerity_command, text};

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
