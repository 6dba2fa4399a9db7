//! The concurrency of one worker process, resizable while it runs (the remote `pool_grow` /
//! `pool_shrink` commands): the slots running jobs take, and the prefetch window that follows them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, Semaphore};

/// The most jobs one process may run at once, however remote control grows it.
pub(crate) const MAX_SIZE: usize = 1_000_000;

/// Running-job slots and their count.
#[derive(Debug)]
pub(crate) struct Pool {
    slots: Arc<Semaphore>,
    size: AtomicUsize,
    /// Tells the fetch loop to widen (+n) or narrow (−n) the prefetch window.
    window: mpsc::UnboundedSender<isize>,
}

impl Pool {
    pub fn new(size: usize, window: mpsc::UnboundedSender<isize>) -> Self {
        Pool {
            slots: Arc::new(Semaphore::new(size)),
            size: AtomicUsize::new(size),
            window,
        }
    }

    /// The slots a job takes to run.
    pub fn slots(&self) -> &Arc<Semaphore> {
        &self.slots
    }

    /// Jobs that may run at once now.
    pub fn size(&self) -> usize {
        self.size.load(Ordering::Relaxed)
    }

    /// Adds `n` slots (and as much prefetch); refused past [`MAX_SIZE`] slots in all.
    pub fn grow(&self, n: usize) -> Result<(), String> {
        let grown = self
            .size
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                s.checked_add(n).filter(|t| *t <= MAX_SIZE)
            });
        if grown.is_err() {
            return Err(format!(
                "the pool cannot grow by {n}: at most {MAX_SIZE} jobs at once"
            ));
        }
        self.slots.add_permits(n);
        let _ = self.window.send(isize::try_from(n).unwrap_or(isize::MAX));
        Ok(())
    }

    /// Removes up to `n` slots, keeping at least one; running jobs finish first (a removed slot is
    /// taken away when it is next free). Returns how many were removed.
    pub fn shrink(&self, n: usize) -> usize {
        let mut removed = 0;
        let _ = self
            .size
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                removed = n.min(s.saturating_sub(1));
                Some(s - removed)
            });
        if removed > 0 {
            let slots = self.slots.clone();
            let take = u32::try_from(removed).unwrap_or(u32::MAX);
            tokio::spawn(async move {
                if let Ok(p) = slots.acquire_many_owned(take).await {
                    p.forget();
                }
            });
            let _ = self.window.send(-isize::try_from(removed).unwrap_or(0));
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn grows_and_shrinks_but_keeps_one() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let p = Pool::new(2, tx);
        assert!(p.grow(3).is_ok());
        assert_eq!(p.size(), 5);
        assert_eq!(rx.recv().await, Some(3));
        assert_eq!(p.shrink(10), 4);
        assert_eq!(p.size(), 1);
        assert_eq!(rx.recv().await, Some(-4));
        assert_eq!(p.shrink(1), 0);
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        assert_eq!(p.slots().available_permits(), 1);
    }

    #[tokio::test]
    async fn an_absurd_growth_is_refused_without_panicking() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let p = Pool::new(2, tx);
        assert!(p.grow(usize::MAX).is_err());
        assert!(p.grow(MAX_SIZE).is_err());
        assert_eq!(p.size(), 2);
        assert_eq!(p.slots().available_permits(), 2);
    }
}
