//! Child processes of a test: the `celerity` binary's command line, and a guard that kills and
//! reaps a child (by its pid) when dropped, also when the test panics.

use std::ffi::OsStr;
use std::process::{Child, Command, Stdio};

/// Lossy UTF-8 of a process's output.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `celerity` at `exe` (a test passes `env!("CARGO_BIN_EXE_celerity")`), with no broker, backend or
/// config file from the environment and no standard input.
pub fn celerity_command(exe: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(exe);
    cmd.env_remove("CELERITY_BROKER_URL")
        .env_remove("CELERITY_RESULT_BACKEND")
        .env_remove("CELERITY_CONFIG")
        .stdin(Stdio::null());
    cmd
}

/// A child process that is SIGKILLed and reaped when dropped (or by [`ChildGuard::kill`]).
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    reaped: bool,
}

impl ChildGuard {
    pub fn new(child: Child) -> ChildGuard {
        ChildGuard {
            child,
            reaped: false,
        }
    }

    /// Spawns `cmd`; panics (naming `what`) if it cannot be started.
    pub fn spawn(cmd: &mut Command, what: &str) -> ChildGuard {
        ChildGuard::new(cmd.spawn().unwrap_or_else(|e| panic!("start {what}: {e}")))
    }

    /// The child itself (for its pid, `try_wait`, …).
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL and reap, once.
    pub fn kill(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.reaped = true;
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}
