//! Taking turns at waiting: the processes of one worker pool let only one of them at a time block on
//! the broker for new work.
//!
//! An idle Redis consumer waits with a non-consuming `BLMOVE` (see `redis/waiter.rs`), and Redis
//! serves every client blocked on a key whenever the key has an element. With N idle processes every
//! message woke all N, and N−1 of them fetched nothing — on a small machine that work competes with
//! the job itself. With a [`WaitLock`] shared by the pool, an idle consumer first takes the lock;
//! the others wait for it (and, as a fallback, look for work themselves every second). The holder
//! keeps it while it goes on waiting and lets go once it is busy, so the next idle process takes
//! over the wait.
//!
//! The lock is an advisory `flock` on one file that every process of the pool opens for itself, so
//! the kernel releases it when a holder dies: a killed process cannot leave the others without a
//! waiter. A lock that is never taken only costs latency (the fallback look), never a message.

use std::fs::{File, TryLockError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

/// How long a holder keeps the lock after a wait ended with the queues empty, for the next wait it
/// is about to start; if that does not come (the process stopped fetching), the lock is let go.
const KEEP_FOR: Duration = Duration::from_millis(5);

/// One process's handle on the pool's wait lock (see the module doc). Cheap to share.
#[derive(Debug)]
pub struct WaitLock {
    file: File,
    state: Mutex<State>,
    granted: Notify,
}

#[derive(Debug, Default)]
struct State {
    /// This handle holds the lock.
    held: bool,
    /// The consumer wants the lock: a grant from the blocking thread is kept, not returned.
    wanted: bool,
    /// A thread is blocked taking the lock for this handle.
    taking: bool,
    /// Bumped by every take and release, so a deferred release knows it is stale.
    generation: u64,
}

impl WaitLock {
    /// A handle on the lock file `file`, which must be this handle's own open file description
    /// (opened by this process, not inherited or duplicated: `flock` locks belong to descriptions).
    pub fn new(file: File) -> Arc<Self> {
        Arc::new(WaitLock {
            file,
            state: Mutex::new(State::default()),
            granted: Notify::new(),
        })
    }

    /// Opens the pool's lock file inherited as descriptor `fd` anew, as this process's own
    /// description (Linux: through `/proc/self/fd`).
    pub fn reopen_inherited(fd: i32) -> std::io::Result<Arc<Self>> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/self/fd/{fd}"))?;
        Ok(Self::new(file))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether this handle holds the lock now.
    pub fn is_held(&self) -> bool {
        self.lock().held
    }

    /// Takes the lock if it is free; true if this handle holds it afterwards. A deferred release
    /// still pending is cancelled.
    pub fn try_take(&self) -> bool {
        self.claim(&mut self.lock()).is_ok_and(|held| held)
    }

    /// Under the state lock: marks the lock wanted (cancelling a deferred release) and takes it if
    /// it is free. `Ok(true)` if this handle holds it afterwards, `Ok(false)` if another does.
    fn claim(&self, st: &mut State) -> std::io::Result<bool> {
        st.generation += 1;
        st.wanted = true;
        if st.held {
            return Ok(true);
        }
        match self.file.try_lock() {
            Ok(()) => {
                st.held = true;
                Ok(true)
            }
            Err(TryLockError::WouldBlock) => Ok(false),
            Err(TryLockError::Error(e)) => Err(e),
        }
    }

    /// Waits until this handle holds the lock. Cancel-safe: a grant that arrives after the caller
    /// stopped waiting is kept (the handle still wants it) until [`WaitLock::release`].
    pub async fn take(self: &Arc<Self>) {
        loop {
            let granted = self.granted.notified();
            tokio::pin!(granted);
            granted.as_mut().enable();
            let unusable = {
                let mut st = self.lock();
                match self.claim(&mut st) {
                    Ok(true) => return,
                    Ok(false) => {
                        if !st.taking {
                            st.taking = true;
                            let me = self.clone();
                            std::thread::spawn(move || me.block_until_granted());
                        }
                        false
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "wait lock unusable");
                        true
                    }
                }
            };
            if unusable {
                // Not expected for a regular file; waiting without the lock still works (the
                // caller's fallback look finds the work).
                std::future::pending::<()>().await;
            }
            granted.await;
        }
    }

    /// The body of the thread that blocks in `flock` for this handle.
    fn block_until_granted(&self) {
        let got = self.file.lock();
        let mut st = self.lock();
        st.taking = false;
        match got {
            // Taken meanwhile through try_lock on the same description: nothing to add.
            Ok(()) if st.held => {}
            Ok(()) if st.wanted => {
                st.held = true;
                self.granted.notify_one();
            }
            Ok(()) => {
                let _ = self.file.unlock();
            }
            Err(e) => tracing::debug!(error = %e, "waiting for the wait lock failed"),
        }
    }

    /// Lets go of the lock (if held) and stops wanting it.
    pub fn release(&self) {
        let mut st = self.lock();
        st.generation += 1;
        st.wanted = false;
        if st.held {
            st.held = false;
            let _ = self.file.unlock();
        }
    }

    /// Lets go of the lock after [`KEEP_FOR`] unless it is taken again (or released) before then.
    /// Needs a Tokio runtime.
    pub(crate) fn release_soon(self: &Arc<Self>) {
        let generation = {
            let mut st = self.lock();
            st.generation += 1;
            st.generation
        };
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(KEEP_FOR).await;
            if me.lock().generation == generation {
                me.release();
            }
        });
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// Two handles on one lock file, each its own description (as two processes have).
    fn pair() -> (Arc<WaitLock>, Arc<WaitLock>) {
        let path = std::env::temp_dir().join(format!("celerity-wait-{}", uuid::Uuid::new_v4()));
        let file = File::create(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        let a = WaitLock::reopen_inherited(file.as_raw_fd()).unwrap();
        let b = WaitLock::reopen_inherited(file.as_raw_fd()).unwrap();
        (a, b)
    }

    #[tokio::test]
    async fn one_holder_at_a_time_and_the_waiter_is_granted_on_release() {
        let (a, b) = pair();
        assert!(a.try_take());
        assert!(!b.try_take());
        let waiting = tokio::spawn({
            let b = b.clone();
            async move { b.take().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiting.is_finished(),
            "granted while another handle held it"
        );
        a.release();
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("not granted after the release")
            .unwrap();
        assert!(b.is_held() && !a.is_held());
        assert!(!a.try_take());
    }

    #[tokio::test]
    async fn a_dropped_holder_frees_the_lock() {
        let (a, b) = pair();
        assert!(a.try_take());
        drop(a);
        tokio::time::timeout(Duration::from_secs(5), b.take())
            .await
            .expect("the lock of a closed handle was not freed");
        assert!(b.is_held());
    }

    #[tokio::test]
    async fn a_deferred_release_is_cancelled_by_taking_again() {
        let (a, b) = pair();
        assert!(a.try_take());
        a.release_soon();
        assert!(a.try_take());
        tokio::time::sleep(KEEP_FOR * 4).await;
        assert!(a.is_held(), "a stale deferred release let go of the lock");
        a.release_soon();
        tokio::time::sleep(KEEP_FOR * 4).await;
        assert!(!a.is_held());
        assert!(b.try_take());
    }

    #[tokio::test]
    async fn a_grant_after_the_waiter_gave_up_is_returned() {
        let (a, b) = pair();
        assert!(a.try_take());
        // b starts waiting, then stops wanting the lock.
        let _ = tokio::time::timeout(Duration::from_millis(20), b.take()).await;
        b.release();
        a.release();
        // b's blocked thread gets the lock, sees it is not wanted and gives it back.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !a.try_take() {
            assert!(
                std::time::Instant::now() < deadline,
                "the unwanted grant was kept"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(!b.is_held());
    }
}
