//! The Lamport clock Celery keeps per process: events carry it in `clock`, control messages in the
//! `clock` header. `forward` ticks it; `adjust` merges a clock seen on a message.

use std::sync::atomic::{AtomicU64, Ordering};

/// One process's (or one node's) logical clock.
#[derive(Debug, Default)]
pub struct LamportClock(AtomicU64);

impl LamportClock {
    /// A clock at 0.
    pub const fn new() -> Self {
        LamportClock(AtomicU64::new(0))
    }

    /// Ticks and returns the new value.
    pub fn forward(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Merges a value seen on a message: the clock becomes `max(own, seen) + 1`. Returns it.
    pub fn adjust(&self, seen: u64) -> u64 {
        let mut current = self.0.load(Ordering::Relaxed);
        loop {
            let next = current.max(seen) + 1;
            match self
                .0
                .compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(now) => current = now,
            }
        }
    }

    /// The current value.
    pub fn value(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_and_adjust_follow_lamport() {
        let c = LamportClock::new();
        assert_eq!(c.forward(), 1);
        assert_eq!(c.adjust(10), 11);
        assert_eq!(c.adjust(3), 12);
        assert_eq!(c.value(), 12);
    }
}
