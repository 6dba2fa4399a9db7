//! What beat tells whoever watches it ([`BeatObserver`]): leading or standing by, each tick sent and
//! how late, lease renewals and losses. The `celerity` binary turns these into Prometheus metrics
//! and `/readyz`; this crate knows nothing of either. Calls are made from the beat loop and must
//! return at once.

use std::time::Duration;

/// Watches one beat. Every method has an empty default.
pub trait BeatObserver: Send + Sync + std::fmt::Debug {
    /// This beat took the leader lock.
    fn leading(&self) {}
    /// Another beat holds the lock and this one reached it: a healthy standby.
    fn standing_by(&self) {}
    /// The lock could not be reached (`why`): neither leading nor a healthy standby.
    fn unreachable(&self, why: &str) {
        let _ = why;
    }
    /// The leader renewed its lease.
    fn renewed(&self) {}
    /// The leader lost its lease (another took it, or it lapsed).
    fn lost(&self) {}
    /// A tick of `entry` was sent, `late` after its scheduled time.
    fn sent(&self, entry: &str, late: Duration) {
        let _ = (entry, late);
    }
    /// Beat stopped.
    fn stopped(&self) {}
}
