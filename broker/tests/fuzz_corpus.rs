//! Replays the fuzz corpus on stable: every file under `fuzz/corpus/<target>/` goes through the same
//! function its cargo-fuzz target calls (`celerity_broker::fuzzing`), and none may panic. The fuzz
//! runs themselves need nightly (`scripts/fuzz`); this keeps what they found in the normal test suite.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use celerity_broker::fuzzing::TARGETS;

/// libFuzzer runs the targets on the main thread, with the usual 8 MiB stack.
const STACK: usize = 8 << 20;
/// Corpus files are kept small (see README, Fuzzing).
const MAX_FILE: u64 = 64 << 10;

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

/// The files of one target's corpus, sorted, with their bytes.
fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            (path, bytes)
        })
        .collect()
}

/// Runs `f` on every file; returns the files it panicked on.
fn replay(f: fn(&[u8]), files: &[(PathBuf, Vec<u8>)]) -> Vec<String> {
    files
        .iter()
        .filter(|(_, bytes)| catch_unwind(AssertUnwindSafe(|| f(bytes))).is_err())
        .map(|(path, _)| path.display().to_string())
        .collect()
}

#[test]
fn every_corpus_file_of_every_target_decodes_without_a_panic() {
    let mut failed = Vec::new();
    for &(name, f) in TARGETS {
        let files = corpus(name);
        assert!(!files.is_empty(), "no corpus for fuzz target {name}");
        for (path, bytes) in &files {
            assert!(
                bytes.len() as u64 <= MAX_FILE,
                "{} is over 64 KiB",
                path.display()
            );
        }
        let panicked = std::thread::Builder::new()
            .stack_size(STACK)
            .spawn(move || replay(f, &files))
            .expect("spawn the replay thread")
            .join()
            .unwrap_or_else(|_| vec![format!("{name}: the replay thread itself died")]);
        failed.extend(panicked);
    }
    assert!(failed.is_empty(), "panicked on: {failed:#?}");
}

#[test]
fn every_target_has_a_fuzz_target_file() {
    let targets = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/fuzz_targets");
    for &(name, _) in TARGETS {
        let file = targets.join(format!("{name}.rs"));
        let text =
            std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert!(
            text.contains(&format!("celerity_broker::fuzzing::{name}(")),
            "{} does not call fuzzing::{name}",
            file.display()
        );
    }
}
