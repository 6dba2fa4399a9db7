//! Schedule reloading: a background task that re-reads the schedule file on request (the `celerity`
//! binary requests it on SIGHUP) and whenever the file's modification time changes, publishing each
//! valid new schedule. An invalid file is refused with one error line and the schedule already
//! running stays in force.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::schedule::{self, Entry};

/// How often the file's modification time is checked.
const POLL: Duration = Duration::from_secs(2);

/// Watches `path` (whose current contents are `initial`) until `shutdown`, re-reading it also on
/// each message from `reloads` (the reason logged); the receiver always holds the latest valid
/// schedule.
pub(crate) fn watch(
    path: PathBuf,
    initial: Vec<Entry>,
    reloads: mpsc::Receiver<&'static str>,
    shutdown: CancellationToken,
) -> watch::Receiver<Vec<Entry>> {
    let (tx, rx) = watch::channel(initial);
    tokio::spawn(async move { run(&path, Some(reloads), &tx, &shutdown).await });
    rx
}

async fn run(
    path: &Path,
    mut reloads: Option<mpsc::Receiver<&'static str>>,
    tx: &watch::Sender<Vec<Entry>>,
    shutdown: &CancellationToken,
) {
    let mut seen = modified(path);
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let why = tokio::select! {
            _ = shutdown.cancelled() => return,
            why = requested(&mut reloads) => why,
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

/// The reason of the next reload request (forever pending once no one can send one).
async fn requested(reloads: &mut Option<mpsc::Receiver<&'static str>>) -> &'static str {
    if let Some(rx) = reloads.as_mut() {
        if let Some(why) = rx.recv().await {
            return why;
        }
        *reloads = None;
    }
    std::future::pending().await
}
