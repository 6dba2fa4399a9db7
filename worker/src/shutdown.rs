//! The two stop signals of a worker process (and of a supervisor): **warm** — stop fetching and
//! let running jobs finish within the grace period — and **cold** — stop running jobs now and give
//! them back to the broker. The caller decides what fires them (signals, a remote `shutdown`, a
//! test); the library never installs signal handlers.

use tokio_util::sync::CancellationToken;

/// The two stop signals of a worker.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    /// Stop fetching; finish running jobs.
    pub warm: CancellationToken,
    /// Stop running jobs now and give them back.
    pub cold: CancellationToken,
}
