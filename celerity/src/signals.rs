//! The one place the `celerity` processes listen for signals; the libraries only take a
//! cancellation token ([`Shutdown`] for a worker) or, for beat, a channel of reload requests.
//!
//! - SIGTERM / SIGINT: a worker's first is a warm shutdown, the second a cold one
//!   ([`warm_then_cold`]); beat stops at the first ([`cancel_on_stop`]).
//! - SIGHUP: beat re-reads its schedule file ([`reload_on_hangup`]).

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use celerity_worker::Shutdown;

/// SIGTERM and SIGINT: the signals that ask a process to stop.
struct StopSignals {
    term: Signal,
    int: Signal,
}

impl StopSignals {
    /// Listens for both, or `None` if either cannot be listened for.
    fn listen() -> Option<Self> {
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(term), Ok(int)) => Some(StopSignals { term, int }),
            _ => None,
        }
    }

    /// Waits for the next SIGTERM or SIGINT.
    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// A worker's stop signals: the first SIGINT/SIGTERM starts a warm shutdown, the second a cold one.
pub(crate) async fn warm_then_cold(shutdown: Shutdown) {
    let Some(mut signals) = StopSignals::listen() else {
        tracing::warn!("cannot listen for signals; stop the worker with SIGKILL");
        return;
    };
    signals.recv().await;
    tracing::warn!("warm shutdown: finishing running jobs (signal again to stop at once)");
    shutdown.warm.cancel();
    signals.recv().await;
    tracing::warn!("cold shutdown: giving running jobs back");
    shutdown.cold.cancel();
}

/// Cancels `stop` on the first SIGINT or SIGTERM.
pub(crate) async fn cancel_on_stop(stop: CancellationToken) {
    let Some(mut signals) = StopSignals::listen() else {
        return;
    };
    signals.recv().await;
    stop.cancel();
}

/// Beat's reload requests: one (reason `"SIGHUP"`) per SIGHUP until `until` is cancelled. The
/// handler is installed before this returns, so a SIGHUP from then on no longer ends the process.
pub(crate) fn reload_on_hangup(until: CancellationToken) -> mpsc::Receiver<&'static str> {
    let (tx, rx) = mpsc::channel(1);
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("beat: cannot listen for SIGHUP (file changes still reload): {e}");
            return rx;
        }
    };
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = until.cancelled() => return,
                got = hup.recv() => {
                    if got.is_none() {
                        return;
                    }
                    // Full: a reload is already pending, and it reads the file as it is now.
                    if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send("SIGHUP") {
                        return;
                    }
                }
            }
        }
    });
    rx
}
