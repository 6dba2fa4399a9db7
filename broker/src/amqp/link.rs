//! A self-repairing connection and channel to publish on, shared by the task publisher (channel in
//! confirm mode) and the broadcaster (no confirms): opened on first use, given a new channel when
//! only the channel died, replaced by a new connection when the connection died. It also remembers
//! what was declared on the connection, so declarations are not repeated per message.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection};
use tokio::sync::Mutex as AsyncMutex;

use super::config::AmqpConfig;
use super::connection::{connect, lapin_err};
use crate::error::{BrokerError, Result};

/// Bound on closing a connection we are done with.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// One live connection with the channel published on.
pub(crate) struct Link {
    pub(crate) conn: Arc<Connection>,
    pub(crate) channel: Channel,
    /// Queues and exchanges declared on this connection.
    declared: Mutex<HashSet<String>>,
}

impl Link {
    fn declared(&self) -> MutexGuard<'_, HashSet<String>> {
        self.declared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True if `name` was declared on this connection.
    pub(crate) fn is_declared(&self, name: &str) -> bool {
        self.declared().contains(name)
    }

    /// Remembers that `name` is declared on this connection.
    pub(crate) fn mark_declared(&self, name: &str) {
        self.declared().insert(name.to_owned());
    }

    /// Forgets that `name` was declared (it was deleted behind our back): the next use declares it.
    pub(crate) fn forget_declared(&self, name: &str) {
        self.declared().remove(name);
    }
}

/// The current [`Link`] of one publishing role, repaired on demand.
pub(crate) struct LinkSlot {
    config: Arc<AmqpConfig>,
    /// `publisher`, `broadcaster`: for logs and the connection name.
    role: &'static str,
    /// Put the channel in publisher-confirm mode.
    confirms: bool,
    slot: AsyncMutex<Option<Arc<Link>>>,
    closed: AtomicBool,
}

impl LinkSlot {
    pub(crate) fn new(config: Arc<AmqpConfig>, role: &'static str, confirms: bool) -> Self {
        LinkSlot {
            config,
            role,
            confirms,
            slot: AsyncMutex::new(None),
            closed: AtomicBool::new(false),
        }
    }

    /// True once [`LinkSlot::close`] was called.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    async fn channel(&self, conn: &Connection) -> lapin::Result<Channel> {
        let channel = conn.create_channel().await?;
        if self.confirms {
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
        }
        Ok(channel)
    }

    /// The current link, with a new channel if the old one died, or a new connection.
    pub(crate) async fn get(&self) -> Result<Arc<Link>> {
        if self.is_closed() {
            return Err(BrokerError::Closed);
        }
        let mut slot = self.slot.lock().await;
        if let Some(link) = slot.as_ref() {
            if link.channel.status().connected() {
                return Ok(link.clone());
            }
            if link.conn.status().connected() {
                match self.channel(&link.conn).await {
                    Ok(channel) => {
                        // Declarations live on the broker, not the channel: keep the record.
                        let declared = std::mem::take(&mut *link.declared());
                        let fresh = Arc::new(Link {
                            conn: link.conn.clone(),
                            channel,
                            declared: Mutex::new(declared),
                        });
                        *slot = Some(fresh.clone());
                        return Ok(fresh);
                    }
                    Err(e) => {
                        tracing::warn!(role = self.role, error = %e, "amqp: cannot reopen the channel; reconnecting")
                    }
                }
            }
        }
        let conn = connect(&self.config, self.role)
            .await
            .map_err(|f| f.error)?;
        let channel = self.channel(&conn).await.map_err(lapin_err)?;
        tracing::debug!(role = self.role, url = %self.config.redacted, "amqp: connected");
        let fresh = Arc::new(Link {
            conn: Arc::new(conn),
            channel,
            declared: Mutex::default(),
        });
        *slot = Some(fresh.clone());
        Ok(fresh)
    }

    /// Forgets `link` after a connection error (if it is still the current one).
    pub(crate) async fn discard(&self, link: &Arc<Link>) {
        let mut slot = self.slot.lock().await;
        if slot.as_ref().is_some_and(|l| Arc::ptr_eq(l, link)) {
            *slot = None;
        }
    }

    /// Closes `link`'s channel (if it is still the current one), so the next [`LinkSlot::get`] opens
    /// a new one on the same connection. After a nack: a channel's view of a quorum queue (which node
    /// leads it) is the channel's own, and a channel that kept a dead leader's may go on nacking.
    pub(crate) async fn renew_channel(&self, link: &Arc<Link>) {
        let slot = self.slot.lock().await;
        if slot.as_ref().is_some_and(|l| Arc::ptr_eq(l, link)) && link.channel.status().connected()
        {
            let closing = link.channel.close(200, "OK".into());
            if let Ok(Err(e)) = tokio::time::timeout(CLOSE_TIMEOUT, closing).await {
                tracing::debug!(role = self.role, error = %e, "amqp: closing a nacking channel");
            }
        }
    }

    /// Closes the connection; later [`LinkSlot::get`] calls fail with [`BrokerError::Closed`].
    pub(crate) async fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        if let Some(link) = self.slot.lock().await.take() {
            if link.conn.status().connected() {
                let closing = link.conn.close(200, "OK".into());
                if let Ok(Err(e)) = tokio::time::timeout(CLOSE_TIMEOUT, closing).await {
                    tracing::debug!(role = self.role, error = %e, "amqp: closing the connection");
                }
            }
        }
    }
}
