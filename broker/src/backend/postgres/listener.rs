//! Waiting for results with `LISTEN`/`NOTIFY`: one connection per backend listens on the task
//! table's channel (see [`super::schema::Tables::channel`]); the write statement notifies it with
//! the task id at commit. Waiters register a [`Watch`] for their id before they read the row, so a
//! result committed between the read and the wait still wakes them.
//!
//! Why LISTEN/NOTIFY rather than a short poll: a result is seen the moment it commits, with no
//! query per waiter per tick (a thousand waiters polling every 10 ms would be 100,000 queries a
//! second). The listening connection is made on the first wait and redialled with back-off when
//! it drops; every waiter is woken after a redial (a notification may have been missed meanwhile),
//! and waiters also read their row every `poll_interval` as a slow safety net.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::watch;
use tokio_postgres::{AsyncMessage, NoTls};

use super::schema::ident;

/// Back-off between redials of the listening connection.
const REDIAL_MIN: Duration = Duration::from_millis(100);
const REDIAL_MAX: Duration = Duration::from_secs(5);

type Watchers = HashMap<String, (usize, Arc<watch::Sender<u64>>)>;

/// The shared listening connection and the ids being waited for.
pub(super) struct Listener {
    inner: Arc<Inner>,
}

struct Inner {
    config: tokio_postgres::Config,
    channel: String,
    watchers: Mutex<Watchers>,
    /// True while the connection is listening.
    listening: watch::Sender<bool>,
    started: std::sync::Once,
    stop: tokio_util::sync::CancellationToken,
}

/// A registration for one task id; dropping it unregisters.
pub(super) struct Watch {
    inner: Arc<Inner>,
    task_id: String,
    rx: watch::Receiver<u64>,
}

impl Listener {
    pub(super) fn new(config: tokio_postgres::Config, channel: String) -> Listener {
        Listener {
            inner: Arc::new(Inner {
                config,
                channel,
                watchers: Mutex::new(HashMap::new()),
                listening: watch::channel(false).0,
                started: std::sync::Once::new(),
                stop: tokio_util::sync::CancellationToken::new(),
            }),
        }
    }

    /// Registers interest in `task_id` (starting the listening connection on first use).
    pub(super) fn watch(&self, task_id: &str) -> Watch {
        let inner = &self.inner;
        inner.started.call_once(|| {
            tokio::spawn(run(inner.clone()));
        });
        let rx = {
            let mut w = inner.watchers();
            let entry = w
                .entry(task_id.to_owned())
                .or_insert_with(|| (0, Arc::new(watch::channel(0).0)));
            entry.0 += 1;
            entry.1.subscribe()
        };
        Watch {
            inner: inner.clone(),
            task_id: task_id.to_owned(),
            rx,
        }
    }

    /// Waits (at most `limit`) until the connection is listening.
    pub(super) async fn ready(&self, limit: Duration) {
        let mut rx = self.inner.listening.subscribe();
        let _ = tokio::time::timeout(limit, rx.wait_for(|l| *l)).await;
    }

    pub(super) fn close(&self) {
        self.inner.stop.cancel();
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.inner.stop.cancel();
    }
}

impl Watch {
    /// Resolves when a notification for the id (or a redial) came since the last call.
    pub(super) async fn changed(&mut self) {
        if self.rx.changed().await.is_err() {
            // Cannot happen while registered (the sender lives in the map); never spin.
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut w = self.inner.watchers();
        if let Some(entry) = w.get_mut(&self.task_id) {
            entry.0 = entry.0.saturating_sub(1);
            if entry.0 == 0 {
                w.remove(&self.task_id);
            }
        }
    }
}

impl Inner {
    fn watchers(&self) -> MutexGuard<'_, Watchers> {
        self.watchers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wake(&self, task_id: &str) {
        if let Some((_, tx)) = self.watchers().get(task_id) {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    fn wake_all(&self) {
        for (_, tx) in self.watchers().values() {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }
}

/// Keeps a connection listening until the backend closes.
async fn run(inner: Arc<Inner>) {
    let mut delay = REDIAL_MIN;
    while !inner.stop.is_cancelled() {
        match listen_once(&inner).await {
            Ok(()) => return,
            Err(e) => {
                inner.listening.send_replace(false);
                tracing::warn!(error = %e, ?delay, "postgresql result listener: connection lost, redialling");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = inner.stop.cancelled() => return,
        }
        delay = (delay * 2).min(REDIAL_MAX);
    }
}

/// One listening connection: Ok when stopped, Err when it failed.
async fn listen_once(inner: &Inner) -> Result<(), String> {
    let (client, mut conn) = inner
        .config
        .connect(NoTls)
        .await
        .map_err(|e| super::describe(&e))?;
    let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
    let sql = format!("LISTEN {}", ident(&inner.channel));
    let listen = client.batch_execute(&sql);
    tokio::pin!(listen);
    // The connection must be polled for the LISTEN to be answered.
    loop {
        tokio::select! {
            r = &mut listen => { r.map_err(|e| super::describe(&e))?; break; }
            m = messages.next() => if handle(inner, m)? { return Ok(()) },
            _ = inner.stop.cancelled() => return Ok(()),
        }
    }
    inner.listening.send_replace(true);
    inner.wake_all();
    loop {
        tokio::select! {
            m = messages.next() => if handle(inner, m)? { return Ok(()) },
            _ = inner.stop.cancelled() => return Ok(()),
        }
    }
}

/// Handles one message from the connection; Err when it ended.
fn handle(
    inner: &Inner,
    m: Option<Result<AsyncMessage, tokio_postgres::Error>>,
) -> Result<bool, String> {
    match m {
        Some(Ok(AsyncMessage::Notification(n))) => {
            inner.wake(n.payload());
            Ok(false)
        }
        Some(Ok(_)) => Ok(false),
        Some(Err(e)) => Err(super::describe(&e)),
        None => Err("the server closed the connection".into()),
    }
}
