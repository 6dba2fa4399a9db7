//! Helpers shared by the integration tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The python of the pinned Celery venv (made on first use by `scripts/celery-venv.sh`), or `None`
/// when `CELERITY_NO_PYTHON` is set (machines without Python).
#[allow(dead_code)]
pub fn celery_python() -> Option<PathBuf> {
    if std::env::var_os("CELERITY_NO_PYTHON").is_some() {
        eprintln!("CELERITY_NO_PYTHON is set: not asking Python Celery");
        return None;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/celery-venv.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(out.status.success(), "{} failed", script.display());
    let stdout = String::from_utf8(out.stdout).expect("utf-8 path");
    Some(PathBuf::from(
        stdout
            .lines()
            .last()
            .expect("celery-venv.sh printed no path")
            .trim(),
    ))
}
