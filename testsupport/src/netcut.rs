//! A TCP proxy the test owns ([`CutProxy`]), put between one client (a worker pool, a producer)
//! and a server, to play a network cut for that client alone:
//!
//! - [`Cut::BlackHole`]: nothing is forwarded in either direction, and no socket is closed — a
//!   pulled cable. Bytes already read are held; the kernel buffers fill and writers block. New
//!   connections are accepted (the kernel would complete the handshake anyway) and held the same
//!   way. On [`CutProxy::restore`] everything held flows on, as TCP retransmission would deliver
//!   it; a side that gave up meanwhile is then seen closing by the other.
//! - [`Cut::Reset`]: every open connection is reset (RST to both sides, `SO_LINGER` 0), and new
//!   ones are reset as soon as accepted, until restored.
//!
//! A black hole ends either with [`CutProxy::restore`] (the held connections flow on) or with
//! [`CutProxy::restore_new_only`]: new connections are served, but the ones from before stay in
//! the black hole for good, as when a cut outlasts the far end's patience or a NAT or firewall in
//! between forgets them — only a client that notices the silence (a timeout, a heartbeat) and dials
//! again gets through.
//!
//! The proxy listens on 127.0.0.1 only and stops (with every connection it carries) when dropped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What the proxy does to the connections it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Forwarding (no cut).
    Open,
    /// A pulled cable: nothing moves, nothing closes.
    BlackHole,
    /// Every connection reset, new ones refused.
    Reset,
}

/// A proxy from a local port to `target`; see the module doc.
pub struct CutProxy {
    port: u16,
    state: watch::Sender<Mode>,
    stop: CancellationToken,
    accepted: Arc<AtomicU64>,
}

impl CutProxy {
    /// Listens on `127.0.0.1:<port>` (0: a free port) and forwards to `target` (`host:port`).
    pub async fn start(port: u16, target: &str) -> std::io::Result<CutProxy> {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        let port = listener.local_addr()?.port();
        let (state, watch) = watch::channel(Mode {
            cut: Cut::Open,
            era: 0,
        });
        let stop = CancellationToken::new();
        let accepted = Arc::new(AtomicU64::new(0));
        let accept = Accept {
            listener,
            target: target.to_owned(),
            state: watch,
            stop: stop.clone(),
            accepted: accepted.clone(),
        };
        tokio::spawn(accept.run());
        Ok(CutProxy {
            port,
            state,
            stop,
            accepted,
        })
    }

    /// The local port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Starts a cut of the given kind (or ends it, with [`Cut::Open`]).
    pub fn set(&self, cut: Cut) {
        self.state.send_modify(|m| m.cut = cut);
    }

    /// Ends the cut for new connections only: those open now stay cut for good (see the module
    /// doc).
    pub fn restore_new_only(&self) {
        self.state.send_modify(|m| {
            m.cut = Cut::Open;
            m.era += 1;
        });
    }

    /// Ends the cut: forwarding resumes, new connections are served.
    pub fn restore(&self) {
        self.set(Cut::Open);
    }

    /// Connections accepted so far (a client that reconnects counts again).
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The proxy's state as its connections see it.
#[derive(Debug, Clone, Copy)]
struct Mode {
    cut: Cut,
    /// Connections accepted before this era was entered stay in the black hole.
    era: u64,
}

/// The accept loop.
struct Accept {
    listener: TcpListener,
    target: String,
    state: watch::Receiver<Mode>,
    stop: CancellationToken,
    accepted: Arc<AtomicU64>,
}

impl Accept {
    async fn run(self) {
        loop {
            let inbound = tokio::select! {
                () = self.stop.cancelled() => return,
                accepted = self.listener.accept() => match accepted {
                    Ok((s, _)) => s,
                    Err(_) => {
                        // Out of descriptors or the like: wait a little rather than spin.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            self.accepted.fetch_add(1, Ordering::SeqCst);
            let link = Link {
                target: self.target.clone(),
                era: self.state.borrow().era,
                state: self.state.clone(),
                stop: self.stop.clone(),
            };
            tokio::spawn(link.run(inbound));
        }
    }
}

/// One proxied connection.
struct Link {
    target: String,
    /// The era it was accepted in.
    era: u64,
    state: watch::Receiver<Mode>,
    stop: CancellationToken,
}

impl Link {
    async fn run(mut self, mut inbound: TcpStream) {
        // A connection made during a black hole waits, as its first bytes would, until restored.
        if wait_open(&mut self.state, self.era, &self.stop)
            .await
            .is_err()
        {
            reset(inbound);
            return;
        }
        let Ok(mut outbound) = TcpStream::connect(&self.target).await else {
            reset(inbound);
            return;
        };
        let _ = inbound.set_nodelay(true);
        let _ = outbound.set_nodelay(true);
        let (in_read, in_write) = inbound.split();
        let (out_read, out_write) = outbound.split();
        let up = pump(in_read, out_write, self.state.clone(), self.era, &self.stop);
        let down = pump(out_read, in_write, self.state.clone(), self.era, &self.stop);
        let (up, down) = tokio::join!(up, down);
        if up == Ended::Reset || down == Ended::Reset {
            reset(inbound);
            reset(outbound);
        }
    }
}

/// Why forwarding stopped for good.
struct Stopped;

/// How one direction of a connection ended.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// By itself: end of stream or an error (the close is passed on).
    Closed,
    /// The proxy resets it (or stops).
    Reset,
}

/// Waits until the proxy forwards for a connection of `era`; `Err` if it resets or stops.
async fn wait_open(
    state: &mut watch::Receiver<Mode>,
    era: u64,
    stop: &CancellationToken,
) -> Result<(), Stopped> {
    loop {
        let now = *state.borrow_and_update();
        match now.cut {
            Cut::Open if now.era == era => return Ok(()),
            Cut::Open => {}
            Cut::Reset => return Err(Stopped),
            Cut::BlackHole => {}
        }
        tokio::select! {
            () = stop.cancelled() => return Err(Stopped),
            changed = state.changed() => if changed.is_err() { return Err(Stopped) },
        }
    }
}

/// Copies `from` to `to` while the proxy forwards, pausing in a black hole (mid-write too).
async fn pump(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    mut state: watch::Receiver<Mode>,
    era: u64,
    stop: &CancellationToken,
) -> Ended {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if wait_open(&mut state, era, stop).await.is_err() {
            return Ended::Reset;
        }
        let n = tokio::select! {
            () = stop.cancelled() => return Ended::Reset,
            _ = state.changed() => continue,
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => {
                    let _ = to.shutdown().await;
                    return Ended::Closed;
                }
                Ok(n) => n,
            },
        };
        let mut sent = 0;
        while sent < n {
            if wait_open(&mut state, era, stop).await.is_err() {
                return Ended::Reset;
            }
            tokio::select! {
                () = stop.cancelled() => return Ended::Reset,
                _ = state.changed() => {}
                written = to.write(&buf[sent..n]) => match written {
                    Ok(0) | Err(_) => return Ended::Closed,
                    Ok(k) => sent += k,
                },
            }
        }
    }
}

/// Closes `stream` with an RST (`SO_LINGER` 0).
/// Tokio deprecates `set_linger` because a positive linger blocks the thread on drop; a zero linger
/// never does (the kernel drops the socket at once), which is the point here.
#[allow(deprecated)]
fn reset(stream: TcpStream) {
    let _ = stream.set_linger(Some(Duration::ZERO));
    drop(stream);
}
