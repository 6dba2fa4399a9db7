//! Where beat keeps its leader lock and last-run times, by broker: on Redis a fenced lease and a
//! hash ([`RedisLease`], keys `<prefix>celerity.beat.lock` / `.epoch` / `.last_run`); on RabbitMQ a
//! single-active-consumer lock queue ([`AmqpLease`]) and a local state file (see
//! [`crate::state_file`]), merged with the copy the last leader mirrored. A local file that cannot
//! be read or written never stops beat from leading: the broker's copy is the one that must be
//! written before a tick is sent. The wire-level parts live
//! in `celerity_broker::lease`; this module picks one by URL and decides how they combine.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use celerity_broker::lease::amqp::AmqpLease;
use celerity_broker::lease::redis::RedisLease;
use celerity_broker::url::{BrokerUrl, Scheme};

use tracing::warn;

use crate::error::{BeatError, Result};
use crate::state_file::StateFile;

pub use celerity_broker::lease::{Lease, Recorded};

/// Default state file (AMQP brokers), relative to the working directory.
pub const DEFAULT_STATE_FILE: &str = "celerity-beat.state.json";
/// Default RabbitMQ lock queue.
pub const DEFAULT_LOCK_QUEUE: &str = "celerity.beat.lock";
/// The stem of beat's Redis keys (after the broker's `global_keyprefix`).
const REDIS_STEM: &str = "celerity.beat";
/// How beat's RabbitMQ connections are named (`celerity-beat <lock queue> <uuid>`).
const AMQP_ROLE: &str = "celerity-beat";

/// Where a beat's lock and state live, for AMQP brokers.
#[derive(Debug, Clone)]
pub struct AmqpPlaces {
    /// The last-run state file.
    pub state_file: PathBuf,
    /// The single-active-consumer lock queue.
    pub lock_queue: String,
}

impl Default for AmqpPlaces {
    fn default() -> Self {
        AmqpPlaces {
            state_file: PathBuf::from(DEFAULT_STATE_FILE),
            lock_queue: DEFAULT_LOCK_QUEUE.to_owned(),
        }
    }
}

/// A beat's lock and last-run state.
#[derive(Debug)]
pub struct Store(Place);

/// Where they live, by broker.
#[derive(Debug)]
enum Place {
    Redis(RedisLease),
    Amqp {
        lock: Box<AmqpLease>,
        file: StateFile,
    },
}

impl Store {
    /// The store for a broker URL (AMQP with the default places).
    pub async fn connect(raw: &str) -> Result<Self> {
        Self::connect_with(raw, &AmqpPlaces::default()).await
    }

    /// The store for a broker URL; `amqp` says where AMQP brokers keep lock and state.
    pub(crate) async fn connect_with(raw: &str, amqp: &AmqpPlaces) -> Result<Self> {
        let url = BrokerUrl::parse(raw)?;
        match url.scheme {
            Scheme::Redis => Ok(Store(Place::Redis(
                RedisLease::connect(&url, REDIS_STEM).await?,
            ))),
            Scheme::Amqp => Ok(Store(Place::Amqp {
                lock: Box::new(AmqpLease::new(&url, &amqp.lock_queue, AMQP_ROLE)),
                file: StateFile::new(Path::new(&amqp.state_file)),
            })),
            _ => Err(BeatError::Unsupported(
                "beat needs a redis:// or amqp:// broker for its lock and state".into(),
            )),
        }
    }

    /// Takes the lock (Redis: for `lease`) if it is free.
    pub async fn try_acquire(&self, lease: Duration) -> Result<Option<Lease>> {
        match &self.0 {
            Place::Redis(r) => Ok(r.try_acquire(lease).await?),
            Place::Amqp { lock, .. } => Ok(lock.try_acquire().await?),
        }
    }

    /// Keeps the lock (Redis: resets the lease); `false` if it is no longer ours.
    pub async fn renew(&self, held: &Lease, lease: Duration) -> Result<bool> {
        match &self.0 {
            Place::Redis(r) => Ok(r.renew(held, lease).await?),
            Place::Amqp { lock, .. } => Ok(lock.check(held).await?),
        }
    }

    /// Gives the lock up; harmless if it is no longer ours.
    pub async fn release(&self, held: &Lease) -> Result<()> {
        match &self.0 {
            Place::Redis(r) => Ok(r.release(held).await?),
            Place::Amqp { lock, .. } => Ok(lock.release().await?),
        }
    }

    /// Lets go of the broker (AMQP: leaves the lock queue's consumers, giving up a held token).
    pub(crate) async fn close(&self) {
        if let Place::Amqp { lock, .. } = &self.0 {
            let _ = lock.release().await;
        }
    }

    /// Every entry's last recorded tick (Unix seconds).
    pub(crate) async fn last_runs(&self) -> Result<HashMap<String, i64>> {
        match &self.0 {
            Place::Redis(r) => Ok(r.last_runs().await?),
            Place::Amqp { lock, file } => {
                // A beat on another host may have led last: the later tick wins per entry.
                let mut all = file.read();
                let mut changed = false;
                for (entry, tick) in lock.read_state().await? {
                    let t = all.entry(entry).or_insert(i64::MIN);
                    if tick > *t {
                        *t = tick;
                        changed = true;
                    }
                }
                if changed {
                    // The broker's copy holds it anyway: a file we cannot write does not stop us.
                    if let Err(e) = file.write(&all) {
                        warn!("beat: {e}; going on with the broker's copy of the last runs");
                    }
                }
                Ok(all)
            }
        }
    }

    /// Claims `tick` for `entry` under `lease` (see [`Recorded`]); fenced on both brokers.
    pub async fn record(&self, lease: &Lease, entry: &str, tick: i64) -> Result<Recorded> {
        match &self.0 {
            Place::Redis(r) => Ok(r.record(lease, entry, tick).await?),
            Place::Amqp { lock, file } => {
                if !lock.check(lease).await? {
                    return Ok(Recorded::NotLeader);
                }
                let mut all = file.read();
                if all.get(entry).is_some_and(|t| *t >= tick) {
                    return Ok(Recorded::AlreadySent);
                }
                all.insert(entry.to_owned(), tick);
                // Recorded once either copy holds it; only the broker's copy is required (a disk
                // that cannot be written must not stop beat, the warning repeats every tick).
                if let Err(e) = file.write(&all) {
                    warn!(
                        entry,
                        tick, "beat: {e}; the tick is recorded in the broker's copy only"
                    );
                }
                lock.write_state(&all).await?;
                Ok(Recorded::Fresh)
            }
        }
    }
}
