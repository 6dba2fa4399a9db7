//! Schedule reloading: a background task that re-reads the schedule file on SIGHUP and whenever the
//! file's modification time changes, publishing each valid new schedule. An invalid file is refused
//! with one error line and the schedule already running stays in force.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::schedule::{self, Entry};

/// How often the file's modification time is checked.
const POLL: Duration = Duration::from_secs(2);

/// Watches `path` (whose current contents are `initial`) until `shutdown`; the receiver always
/// holds the latest valid schedule.
pub fn watch(
    path: PathBuf,
    initial: Vec<Entry>,
    shutdown: CancellationToken,
) -> watch::Receiver<Vec<Entry>> {
    let (tx, rx) = watch::channel(initial);
    let hup = hangup();
    tokio::spawn(async move { run(&path, hup, &tx, &shutdown).await });
    rx
}

async fn run(
    path: &Path,
    mut hup: Hangup,
    tx: &watch::Sender<Vec<Entry>>,
    shutdown: &CancellationToken,
) {
    let mut seen = modified(path);
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let why = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = recv(&mut hup) => "SIGHUP",
            _ = poll.tick() => {
                let now = modified(path);
                if now == seen {
                    continue;
                }
                seen = now;
                "file changed"
            }
        };
        match schedule::load(path) {
            Ok(entries) => {
                info!(
                    reason = why,
                    entries = entries.iter().filter(|e| e.enabled).count(),
                    "beat: schedule reloaded"
                );
                tx.send_replace(entries);
            }
            Err(e) => error!(
                reason = why,
                "beat: new schedule refused, keeping the old one: {e}"
            ),
        }
    }
}

/// The file's modification time (`None` while it cannot be read).
fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = ();

#[cfg(unix)]
fn hangup() -> Hangup {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!("beat: cannot listen for SIGHUP (file changes still reload): {e}");
            None
        }
    }
}

#[cfg(not(unix))]
fn hangup() -> Hangup {}

/// Waits for the next SIGHUP (forever where there is none).
#[cfg(unix)]
async fn recv(hup: &mut Hangup) {
    match hup {
        Some(s) => {
            if s.recv().await.is_none() {
                *hup = None;
            }
        }
        None => std::future::pending().await,
    }
}

#[cfg(not(unix))]
async fn recv(_: &mut Hangup) {
    std::future::pending().await
}
