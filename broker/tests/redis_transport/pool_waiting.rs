//! The wait lock a pool's consumers share: one waits on Redis at a time, and one without its turn
//! still finds work.

use super::*;

/// Handles on one wait lock, each its own open file description, as each process of a pool has.
fn wait_locks(n: usize) -> Vec<Arc<celerity_broker::WaitLock>> {
    use std::os::fd::AsRawFd;
    let path = std::env::temp_dir().join(format!("celtest-wait-{}", uuid::Uuid::new_v4()));
    let file = std::fs::File::create(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    (0..n)
        .map(|_| celerity_broker::WaitLock::reopen_inherited(file.as_raw_fd()).unwrap())
        .collect()
}

/// Polls `cond` until it holds (a bound so a broken test fails instead of hanging).
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {PATIENCE:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Two consumers of a pool (own brokers, one wait lock): only one waits on Redis at a time; the
/// holder gets the message, and once its prefetch window is full the other one takes over the wait
/// and gets the next.
#[tokio::test]
async fn pool_consumers_take_turns_waiting() {
    let s = Space::new().await;
    let locks = wait_locks(2);
    let (l0, l1) = (locks[0].clone(), locks[1].clone());
    let (b0, b1) = (s.broker("").await, s.broker("").await);
    b0.share_wait_lock(l0.clone());
    b1.share_wait_lock(l1.clone());
    let c0 = b0.consume(&queue("turns"), 1).await.unwrap();
    let mut c1 = b1.consume(&queue("turns"), 1).await.unwrap();
    let spawn_next = |mut c: Box<dyn Consumer>| {
        tokio::spawn(async move {
            let d = tokio::time::timeout(PATIENCE, c.next()).await;
            (c, d)
        })
    };
    let w0 = spawn_next(c0);
    eventually("the first consumer waits holding the lock", || l0.is_held()).await;
    let w1 = spawn_next(c1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !l1.is_held(),
        "both consumers of the pool hold the wait lock"
    );

    b0.publish("turns", &message(1, 0)).await.unwrap();
    let (c0, d) = w0.await.unwrap();
    let first = d.expect("the holder got nothing").unwrap().unwrap();
    assert_eq!(task_id(&first), "task-1");
    // c0's window (1) is full while `first` is unacked: its next fetch cannot start, so it lets go
    // and the other consumer takes over the wait.
    let w0 = spawn_next(c0);
    eventually("the sibling takes over the wait", || l1.is_held()).await;
    assert!(!l0.is_held());
    b0.publish("turns", &message(2, 0)).await.unwrap();
    let (c, d) = w1.await.unwrap();
    c1 = c;
    let second = d.expect("the sibling got nothing").unwrap().unwrap();
    assert_eq!(task_id(&second), "task-2");

    first.ack().await.unwrap();
    second.ack().await.unwrap();
    w0.abort();
    let _ = w0.await;
    c1.close().await.unwrap();
    assert!(!l1.is_held(), "a closed consumer kept the wait lock");
    assert_eq!(s.unacked().await, (0, 0));
    let _ = (b0.close().await, b1.close().await);
}

/// A consumer whose pool's wait lock is held elsewhere for good (a stuck sibling) still finds the
/// work by looking for itself.
#[tokio::test]
async fn a_consumer_without_its_turn_still_finds_work() {
    let s = Space::new().await;
    let locks = wait_locks(2);
    let b = s.broker("").await;
    b.share_wait_lock(locks[0].clone());
    let stuck = locks[1].clone();
    assert!(stuck.try_take());
    let mut c = b.consume(&queue("stuck"), 4).await.unwrap();
    b.publish("stuck", &message(7, 0)).await.unwrap();
    let d = next(&mut c).await;
    assert_eq!(task_id(&d), "task-7");
    d.ack().await.unwrap();
    // And later ones too, while the lock stays taken.
    let later = tokio::spawn({
        let b = s.broker("").await;
        async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            b.publish("stuck", &message(8, 0)).await.unwrap();
        }
    });
    let d = next(&mut c).await;
    assert_eq!(task_id(&d), "task-8");
    d.ack().await.unwrap();
    later.await.unwrap();
    assert!(stuck.is_held() && !locks[0].is_held());
    c.close().await.unwrap();
    assert_eq!(s.unacked().await, (0, 0));
}
