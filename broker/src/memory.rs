//! The in-process `memory://` transport: the embedded default, with the same semantics as the
//! network transports.
//!
//! Queues live in this process, one set per URL name (`memory://` and `memory://other` are separate),
//! shared by every handle that connects to the same name. Deliveries wait for an ack; a rejected
//! message with `requeue` goes to the back of its queue, and a closed (or dropped) consumer puts its
//! unacked deliveries back at the front, marked redelivered. Priorities follow AMQP: 9 is served first.
//! The URL options `max_message_size` and `max_dead_letters` ([`crate::limits`]) bound each handle.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use async_trait::async_trait;
use tokio::sync::Notify;

use crate::error::{BrokerError, Result};
use crate::limits::Limits;
use crate::message::Message;
use crate::transport::{AckHandle, Broker, Consumer, Delivery, PrefetchWindow, Subscription};
use crate::url::BrokerUrl;

const PRIORITY_LEVELS: usize = 10;

/// A handle on one named set of in-process queues.
#[derive(Clone)]
pub struct MemoryBroker {
    shared: Arc<Shared>,
    /// This handle's bounds (from its URL): handles on one set of queues may differ.
    limits: Limits,
}

struct Shared {
    queues: Mutex<HashMap<String, Queue>>,
    /// Fanout exchanges: every subscriber gets a copy of each message (with its routing key).
    fanout: Mutex<HashMap<String, tokio::sync::broadcast::Sender<(String, Message)>>>,
    /// Woken on every publish and requeue.
    arrived: Notify,
    closed: AtomicBool,
}

#[derive(Default)]
struct Queue {
    /// One FIFO per priority level.
    levels: [VecDeque<(Message, bool)>; PRIORITY_LEVELS],
}

impl Queue {
    fn push_back(&mut self, m: Message, redelivered: bool) {
        let p = usize::from(m.properties.priority).min(PRIORITY_LEVELS - 1);
        self.levels[p].push_back((m, redelivered));
    }
    fn push_front(&mut self, m: Message) {
        let p = usize::from(m.properties.priority).min(PRIORITY_LEVELS - 1);
        self.levels[p].push_front((m, true));
    }
    fn pop(&mut self) -> Option<(Message, bool)> {
        self.levels.iter_mut().rev().find_map(VecDeque::pop_front)
    }
    fn len(&self) -> usize {
        self.levels.iter().map(VecDeque::len).sum()
    }
    /// Drops the oldest messages (lowest priority first) until at most `max` are left.
    fn trim_to(&mut self, max: usize) {
        let mut excess = self.len().saturating_sub(max);
        for level in &mut self.levels {
            let n = excess.min(level.len());
            level.drain(..n);
            excess -= n;
        }
    }
}

fn registry() -> &'static Mutex<HashMap<String, Arc<Shared>>> {
    static REGISTRY: OnceLock<Mutex<HashMap<String, Arc<Shared>>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// Locks a mutex, recovering the data if a panicking thread poisoned it (our critical sections leave
/// the data consistent at every step).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl MemoryBroker {
    /// The broker named by a `memory://NAME` URL (options: `max_message_size`, `max_dead_letters`).
    pub fn from_url(url: &BrokerUrl) -> Result<Self> {
        url.check_options(crate::limits::OPTIONS)?;
        let limits = Limits::from_url(url)?;
        Ok(Self::named(url.base.host_str().unwrap_or("")).with_limits(limits))
    }

    /// This handle with other bounds.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The in-process broker called `name`, created on first use.
    pub fn named(name: &str) -> Self {
        let shared = lock(registry())
            .entry(name.to_owned())
            .or_insert_with(|| {
                Arc::new(Shared {
                    queues: Mutex::default(),
                    fanout: Mutex::default(),
                    arrived: Notify::new(),
                    closed: AtomicBool::new(false),
                })
            })
            .clone();
        shared.closed.store(false, Ordering::SeqCst);
        MemoryBroker {
            shared,
            limits: Limits::default(),
        }
    }

    fn push(&self, queue: &str, messages: impl IntoIterator<Item = Message>) {
        {
            let mut queues = lock(&self.shared.queues);
            let q = queues.entry(queue.to_owned()).or_default();
            for m in messages {
                q.push_back(m, false);
            }
        }
        self.shared.arrived.notify_waiters();
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    fn transport(&self) -> &'static str {
        "memory"
    }

    async fn declare_queue(&self, queue: &str) -> Result<()> {
        lock(&self.shared.queues)
            .entry(queue.to_owned())
            .or_default();
        Ok(())
    }

    async fn publish(&self, queue: &str, message: &Message) -> Result<()> {
        self.limits.check_publish(queue, message)?;
        self.push(queue, std::iter::once(message.clone()));
        Ok(())
    }

    async fn publish_batch(&self, queue: &str, messages: &[Message]) -> Result<()> {
        for m in messages {
            self.limits.check_publish(queue, m)?;
        }
        self.push(queue, messages.iter().cloned());
        Ok(())
    }

    fn limits(&self) -> Limits {
        self.limits
    }

    async fn dead_letter(&self, queue: &str, message: &Message) -> Result<()> {
        let mut m = message.clone();
        m.properties.priority = 0;
        {
            let mut queues = lock(&self.shared.queues);
            let q = queues.entry(queue.to_owned()).or_default();
            q.push_back(m, false);
            q.trim_to(usize::try_from(self.limits.max_dead_letters).unwrap_or(usize::MAX));
        }
        self.shared.arrived.notify_waiters();
        Ok(())
    }

    async fn consume(&self, queues: &[String], prefetch: usize) -> Result<Box<dyn Consumer>> {
        if queues.is_empty() {
            return Err(BrokerError::malformed("consume needs at least one queue"));
        }
        for q in queues {
            self.declare_queue(q).await?;
        }
        Ok(Box::new(MemoryConsumer {
            shared: self.shared.clone(),
            queues: queues.to_vec(),
            next_queue: 0,
            window: PrefetchWindow::new(prefetch),
            unacked: Arc::new(Unacked::default()),
            closed: false,
        }))
    }

    async fn purge(&self, queue: &str) -> Result<u64> {
        let mut queues = lock(&self.shared.queues);
        Ok(queues.get_mut(queue).map_or(0, |q| {
            let n = q.len();
            *q = Queue::default();
            n as u64
        }))
    }

    async fn queue_len(&self, queue: &str) -> Result<u64> {
        Ok(lock(&self.shared.queues)
            .get(queue)
            .map_or(0, |q| q.len() as u64))
    }

    async fn close(&self) -> Result<()> {
        self.shared.closed.store(true, Ordering::SeqCst);
        self.shared.arrived.notify_waiters();
        lock(&self.shared.fanout).clear();
        Ok(())
    }

    async fn broadcast(&self, exchange: &str, routing_key: &str, message: &Message) -> Result<()> {
        if let Some(tx) = lock(&self.shared.fanout).get(exchange) {
            // No receivers is fine: a broadcast nobody listens to is dropped.
            let _ = tx.send((routing_key.to_owned(), message.clone()));
        }
        Ok(())
    }

    async fn subscribe(
        &self,
        exchange: &str,
        binding_key: &str,
        _name: &str,
    ) -> Result<Box<dyn Subscription>> {
        let rx = lock(&self.shared.fanout)
            .entry(exchange.to_owned())
            .or_insert_with(|| tokio::sync::broadcast::channel(1024).0)
            .subscribe();
        Ok(Box::new(MemorySubscription {
            rx,
            binding_key: binding_key.to_owned(),
        }))
    }
}

struct MemorySubscription {
    rx: tokio::sync::broadcast::Receiver<(String, Message)>,
    binding_key: String,
}

#[async_trait]
impl Subscription for MemorySubscription {
    async fn next(&mut self) -> Result<Option<Message>> {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            match self.rx.recv().await {
                Ok((key, m)) if crate::topic::binding_matches(&self.binding_key, &key) => {
                    return Ok(Some(m))
                }
                Ok(_) => {}
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "a slow subscriber missed broadcasts")
                }
                Err(RecvError::Closed) => return Ok(None),
            }
        }
    }
}

/// Deliveries a consumer handed out and that are not settled yet.
#[derive(Default)]
struct Unacked {
    next_tag: AtomicU64,
    open: Mutex<HashMap<u64, (String, Message)>>,
}

struct MemoryConsumer {
    shared: Arc<Shared>,
    queues: Vec<String>,
    next_queue: usize,
    window: PrefetchWindow,
    unacked: Arc<Unacked>,
    closed: bool,
}

impl MemoryConsumer {
    /// Pops the next message, visiting the queues round-robin.
    fn try_pop(&mut self) -> Option<(String, Message, bool)> {
        let mut queues = lock(&self.shared.queues);
        for i in 0..self.queues.len() {
            let idx = (self.next_queue + i) % self.queues.len();
            if let Some((m, redelivered)) = queues.get_mut(&self.queues[idx]).and_then(Queue::pop) {
                self.next_queue = (idx + 1) % self.queues.len();
                return Some((self.queues[idx].clone(), m, redelivered));
            }
        }
        None
    }

    fn restore_unacked(&self) {
        let open: Vec<(String, Message)> =
            lock(&self.unacked.open).drain().map(|(_, v)| v).collect();
        if open.is_empty() {
            return;
        }
        {
            let mut queues = lock(&self.shared.queues);
            for (queue, m) in open {
                queues.entry(queue).or_default().push_front(m);
            }
        }
        self.shared.arrived.notify_waiters();
    }
}

#[async_trait]
impl Consumer for MemoryConsumer {
    async fn next(&mut self) -> Result<Option<Delivery>> {
        if self.closed {
            return Ok(None);
        }
        let permit = self
            .window
            .permits()
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| BrokerError::Closed)?;
        let shared = self.shared.clone();
        loop {
            let arrived = shared.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if shared.closed.load(Ordering::SeqCst) {
                return Ok(None);
            }
            if let Some((queue, message, redelivered)) = self.try_pop() {
                let tag = self.unacked.next_tag.fetch_add(1, Ordering::Relaxed);
                lock(&self.unacked.open).insert(tag, (queue.clone(), message.clone()));
                let handle = MemoryAck {
                    shared: self.shared.clone(),
                    unacked: self.unacked.clone(),
                    tag,
                };
                return Ok(Some(Delivery::new(
                    message,
                    queue,
                    redelivered,
                    Box::new(handle),
                    Some(permit),
                )));
            }
            arrived.await;
        }
    }

    async fn set_prefetch(&mut self, prefetch: usize) -> Result<()> {
        self.window.resize(prefetch);
        Ok(())
    }

    async fn close(&mut self) -> Result<()> {
        if !self.closed {
            self.closed = true;
            self.restore_unacked();
        }
        Ok(())
    }
}

impl Drop for MemoryConsumer {
    fn drop(&mut self) {
        if !self.closed {
            self.restore_unacked();
        }
    }
}

struct MemoryAck {
    shared: Arc<Shared>,
    unacked: Arc<Unacked>,
    tag: u64,
}

#[async_trait]
impl AckHandle for MemoryAck {
    async fn ack(self: Box<Self>) -> Result<()> {
        lock(&self.unacked.open).remove(&self.tag);
        Ok(())
    }

    async fn reject(self: Box<Self>, requeue: bool) -> Result<()> {
        let entry = lock(&self.unacked.open).remove(&self.tag);
        if let (true, Some((queue, m))) = (requeue, entry) {
            lock(&self.shared.queues)
                .entry(queue)
                .or_default()
                .push_back(m, true);
            self.shared.arrived.notify_waiters();
        }
        Ok(())
    }
}
