//! The pub/sub listener behind [`super::RedisBackend::wait`]: one dedicated connection per backend,
//! shared by every waiter.
//!
//! A waiter asks for a [`Subscription`] to a channel (the meta key). The first waiter of a channel
//! queues a `SUBSCRIBE`; later ones share it, and the last one to leave queues the `UNSUBSCRIBE`
//! (from `Drop`, so timeouts and dropped futures clean up too). Commands are queued under the same
//! lock that updates the table of channels, so the server sees them in the order the table changed.
//! The listener task sends queued commands in batches (one `SUBSCRIBE` for many channels), pipelined,
//! dispatches each message to the channel's waiters through a `watch` slot holding the latest
//! payload, and pings the connection now and then. It starts on first use; when the connection
//! drops it reconnects with backoff, subscribes again to every channel still wanted, and tells
//! their waiters to look again (a message may have been missed meanwhile).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use redis::aio::{PubSubSink, PubSubStream};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::backoff::Backoff;
use crate::error::{BrokerError, Result};
use crate::redis::sentinel::Dialer;

/// Time allowed to open the pub/sub connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the connection is checked with a `PING`.
const HEALTH_CHECK_INTERVAL: Duration = Duration::from_secs(30);
/// How long the server may take to confirm a (un)subscription or answer a ping.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// Most channels named in one `SUBSCRIBE`/`UNSUBSCRIBE`.
const MAX_BATCH: usize = 512;

/// The latest message of a channel; `None` means "something may have been missed: look again".
type Payload = Option<Arc<[u8]>>;

/// The shared pub/sub connection of one backend. Dropping it stops the listener task.
pub(super) struct Listener {
    inner: Arc<Inner>,
}

struct Inner {
    client: Dialer,
    /// The server, password hidden, for logs.
    server: String,
    state: Mutex<State>,
    shutdown: CancellationToken,
}

#[derive(Default)]
struct State {
    channels: HashMap<String, Entry>,
    /// The listener task's queue; `None` until the first subscription starts the task.
    commands: Option<mpsc::UnboundedSender<Command>>,
    closed: bool,
}

struct Entry {
    waiters: usize,
    slot: Arc<Slot>,
}

/// What the waiters of one channel watch.
struct Slot {
    payload: watch::Sender<Payload>,
    /// True once the server confirmed the subscription.
    subscribed: watch::Sender<bool>,
}

enum Command {
    Subscribe(String, Arc<Slot>),
    Unsubscribe(String),
}

impl Listener {
    /// A listener for `client`'s server; no connection is made until the first subscription.
    pub(super) fn new(client: Dialer, server: String) -> Self {
        Listener {
            inner: Arc::new(Inner {
                client,
                server,
                state: Mutex::new(State::default()),
                shutdown: CancellationToken::new(),
            }),
        }
    }

    /// Joins (or starts) the subscription to `channel`. Must be called within a Tokio runtime.
    pub(super) fn subscribe(&self, channel: &str) -> Result<Subscription> {
        let mut state = self.inner.lock();
        if state.closed {
            return Err(BrokerError::Closed);
        }
        if state.commands.is_none() {
            let (tx, rx) = mpsc::unbounded_channel();
            state.commands = Some(tx);
            tokio::spawn(run(self.inner.clone(), rx));
        }
        let slot = match state.channels.get_mut(channel) {
            Some(entry) => {
                entry.waiters += 1;
                entry.slot.clone()
            }
            None => {
                let slot = Arc::new(Slot {
                    payload: watch::Sender::new(None),
                    subscribed: watch::Sender::new(false),
                });
                state.channels.insert(
                    channel.to_owned(),
                    Entry {
                        waiters: 1,
                        slot: slot.clone(),
                    },
                );
                state.send(Command::Subscribe(channel.to_owned(), slot.clone()));
                slot
            }
        };
        Ok(Subscription {
            inner: self.inner.clone(),
            channel: channel.to_owned(),
            payload: slot.payload.subscribe(),
            subscribed: slot.subscribed.subscribe(),
            slot,
        })
    }

    /// Stops the listener task and refuses new subscriptions.
    pub(super) fn close(&self) {
        self.inner.lock().closed = true;
        self.inner.shutdown.cancel();
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.close();
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl State {
    fn send(&self, command: Command) {
        if let Some(tx) = &self.commands {
            // Fails only once the task has stopped (closed): nothing left to tell it.
            let _ = tx.send(command);
        }
    }
}

/// One waiter's interest in a channel; leaving it (drop) unsubscribes when it was the last one.
pub(super) struct Subscription {
    inner: Arc<Inner>,
    channel: String,
    slot: Arc<Slot>,
    payload: watch::Receiver<Payload>,
    subscribed: watch::Receiver<bool>,
}

impl Subscription {
    /// Resolves once the server has confirmed the subscription.
    pub(super) async fn confirmed(&mut self) {
        if self.subscribed.wait_for(|s| *s).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// The next message on the channel (`None`: look again, one may have been missed).
    pub(super) async fn next(&mut self) -> Payload {
        if self.payload.changed().await.is_err() {
            // The slot lives as long as `self`, so its sender cannot be gone.
            std::future::pending::<()>().await;
        }
        self.payload.borrow_and_update().clone()
    }

    /// Resolves when the backend is closed (does not borrow the subscription).
    pub(super) fn closed(&self) -> WaitForCancellationFutureOwned {
        self.inner.shutdown.clone().cancelled_owned()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut state = self.inner.lock();
        let Some(entry) = state.channels.get_mut(&self.channel) else {
            return;
        };
        if !Arc::ptr_eq(&entry.slot, &self.slot) {
            return;
        }
        entry.waiters -= 1;
        if entry.waiters == 0 {
            state.channels.remove(&self.channel);
            state.send(Command::Unsubscribe(std::mem::take(&mut self.channel)));
        }
    }
}

/// Why a connection stopped being served.
enum Stop {
    Shutdown,
    Lost(String),
}

/// The listener task: connect, resubscribe, serve; again after each loss, until shutdown.
async fn run(inner: Arc<Inner>, mut commands: mpsc::UnboundedReceiver<Command>) {
    let mut backoff = Backoff::default();
    let mut reconnect = false;
    loop {
        let connected = tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            c = connect(&inner.client) => c,
        };
        let (mut sink, mut stream) = match connected {
            Ok(pair) => pair,
            Err(reason) => {
                let delay = backoff.next();
                tracing::warn!(server = %inner.server, %reason, retry_in = ?delay, "result backend pub/sub: cannot connect, retrying");
                if !pause(&inner, delay).await {
                    return;
                }
                continue;
            }
        };
        // Everything queued so far is reflected in the table: subscribe to the table instead.
        let wanted: Vec<(String, Arc<Slot>)> = {
            let state = inner.lock();
            while commands.try_recv().is_ok() {}
            state
                .channels
                .iter()
                .map(|(name, entry)| (name.clone(), entry.slot.clone()))
                .collect()
        };
        if let Err(e) = bounded("resubscribe", subscribe_all(&mut sink, &wanted)).await {
            let delay = backoff.next();
            tracing::warn!(server = %inner.server, error = %e, retry_in = ?delay, "result backend pub/sub: resubscribe failed, reconnecting");
            if !pause(&inner, delay).await {
                return;
            }
            continue;
        }
        for (_, slot) in &wanted {
            slot.subscribed.send_replace(true);
            if reconnect {
                slot.payload.send_replace(None);
            }
        }
        if reconnect {
            tracing::info!(server = %inner.server, channels = wanted.len(), "result backend pub/sub: reconnected");
        }
        backoff.reset();
        reconnect = true;
        match serve(&inner, &mut sink, &mut stream, &mut commands).await {
            Stop::Shutdown => return,
            // After close() the connection may die under an in-flight command (the runtime is going
            // away): that is not a loss to report or repair.
            Stop::Lost(_) if inner.shutdown.is_cancelled() => return,
            Stop::Lost(reason) => {
                tracing::warn!(server = %inner.server, %reason, "result backend pub/sub: connection lost, reconnecting");
            }
        }
    }
}

/// Sleeps for `delay` (the backoff's next); false if the listener was shut down meanwhile.
async fn pause(inner: &Inner, delay: Duration) -> bool {
    tokio::select! {
        _ = inner.shutdown.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

async fn connect(client: &Dialer) -> Result<(PubSubSink, PubSubStream), String> {
    match tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_pubsub()).await {
        Ok(Ok(pubsub)) => Ok(pubsub.split()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no connection after {CONNECT_TIMEOUT:?}")),
    }
}

async fn subscribe_all(
    sink: &mut PubSubSink,
    wanted: &[(String, Arc<Slot>)],
) -> redis::RedisResult<()> {
    for chunk in wanted.chunks(MAX_BATCH) {
        let names: Vec<&str> = chunk.iter().map(|(name, _)| name.as_str()).collect();
        sink.subscribe(names).await?;
    }
    Ok(())
}

/// Serves one connection: messages to waiters, queued commands to the server, periodic pings.
async fn serve(
    inner: &Inner,
    sink: &mut PubSubSink,
    stream: &mut PubSubStream,
    commands: &mut mpsc::UnboundedReceiver<Command>,
) -> Stop {
    let mut health = tokio::time::interval(HEALTH_CHECK_INTERVAL);
    health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    health.reset();
    loop {
        tokio::select! {
            _ = inner.shutdown.cancelled() => return Stop::Shutdown,
            message = stream.next() => match message {
                Some(message) => dispatch(inner, &message),
                None => return Stop::Lost("connection closed".into()),
            },
            command = commands.recv() => {
                let Some(first) = command else { return Stop::Shutdown };
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match commands.try_recv() {
                        Ok(c) => batch.push(c),
                        Err(_) => break,
                    }
                }
                if let Err(e) = bounded("subscribe", apply(sink, batch)).await {
                    return Stop::Lost(e);
                }
            }
            _ = health.tick() => {
                if let Err(e) = bounded("ping", sink.ping::<redis::Value>()).await {
                    return Stop::Lost(e);
                }
            }
        }
    }
}

/// Runs a request to the server, giving up after [`COMMAND_TIMEOUT`] (a half-open connection
/// would otherwise never answer).
async fn bounded<T>(
    what: &str,
    request: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(COMMAND_TIMEOUT, request).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(format!("{what} failed: {e}")),
        Err(_) => Err(format!("{what}: no answer in {COMMAND_TIMEOUT:?}")),
    }
}

/// Sends a batch of commands in order, merging runs of the same kind into one command, and all of
/// them in one go: each is handed to the connection before the reply to the one before it is in,
/// so an `UNSUBSCRIBE` of the last call does not hold back the `SUBSCRIBE` of the next by a round
/// trip. The connection keeps them in order; each subscription counts as confirmed once its own
/// reply is in.
async fn apply(sink: &mut PubSubSink, batch: Vec<Command>) -> redis::RedisResult<()> {
    let mut in_flight = Vec::new();
    let mut rest = batch.as_slice();
    while let Some(first) = rest.first() {
        let subscribe = matches!(first, Command::Subscribe(..));
        let run = rest
            .iter()
            .take_while(|c| matches!(c, Command::Subscribe(..)) == subscribe)
            .count();
        let (now, later) = rest.split_at(run);
        rest = later;
        let names: Vec<&str> = now
            .iter()
            .map(|c| match c {
                Command::Subscribe(name, _) | Command::Unsubscribe(name) => name.as_str(),
            })
            .collect();
        let mut sink = sink.clone();
        let mut request: BoxFuture<'_, redis::RedisResult<()>> = if subscribe {
            Box::pin(async move { sink.subscribe(names).await })
        } else {
            Box::pin(async move { sink.unsubscribe(names).await })
        };
        // The first poll queues the command on the connection (it cannot have its reply yet).
        match (&mut request).now_or_never() {
            Some(done) => {
                done?;
                confirm(now);
            }
            None => in_flight.push((request, now)),
        }
    }
    for (request, commands) in in_flight {
        request.await?;
        confirm(commands);
    }
    Ok(())
}

/// Marks the subscriptions among `commands` as confirmed by the server.
fn confirm(commands: &[Command]) {
    for c in commands {
        if let Command::Subscribe(_, slot) = c {
            slot.subscribed.send_replace(true);
        }
    }
}

/// Hands a message to the waiters of its channel, if any are left.
fn dispatch(inner: &Inner, message: &redis::Msg) {
    let slot = inner
        .lock()
        .channels
        .get(message.get_channel_name())
        .map(|entry| entry.slot.clone());
    if let Some(slot) = slot {
        slot.payload
            .send_replace(Some(Arc::from(message.get_payload_bytes())));
    }
}
