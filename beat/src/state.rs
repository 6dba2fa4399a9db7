//! Where beat keeps its leader lock and last-run times, by broker: on Redis a fenced lease and a
//! hash (see `redis_state`); on RabbitMQ a single-active-consumer lock queue (see
//! `amqp_lock`) and a local state file (see `state_file`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use celerity_broker::url::{BrokerUrl, Scheme};

use crate::amqp_lock::AmqpLock;
use crate::error::{BeatError, Result};
use crate::redis_state::RedisStore;
use crate::state_file::StateFile;

pub use crate::lock::Lease;

/// Default state file (AMQP brokers), relative to the working directory.
pub const DEFAULT_STATE_FILE: &str = "celerity-beat.state.json";
/// Default RabbitMQ lock queue.
pub const DEFAULT_LOCK_QUEUE: &str = "celerity.beat.lock";

/// What recording a tick found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// Ours now: send the job.
    Fresh,
    /// This tick (or a later one) was already recorded: do not send.
    AlreadySent,
    /// We no longer hold the lock: do not send, stand by.
    NotLeader,
}

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
    Redis(RedisStore),
    Amqp {
        lock: Box<AmqpLock>,
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
            Scheme::Redis => Ok(Store(Place::Redis(RedisStore::connect(&url).await?))),
            Scheme::Amqp => Ok(Store(Place::Amqp {
                lock: Box::new(AmqpLock::new(&url, &amqp.lock_queue)),
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
            Place::Redis(r) => r.try_acquire(lease).await,
            Place::Amqp { lock, .. } => lock.try_acquire().await,
        }
    }

    /// Keeps the lock (Redis: resets the lease); `false` if it is no longer ours.
    pub async fn renew(&self, held: &Lease, lease: Duration) -> Result<bool> {
        match &self.0 {
            Place::Redis(r) => r.renew(held, lease).await,
            Place::Amqp { lock, .. } => lock.check(held).await,
        }
    }

    /// Gives the lock up; harmless if it is no longer ours.
    pub async fn release(&self, held: &Lease) -> Result<()> {
        match &self.0 {
            Place::Redis(r) => r.release(held).await,
            Place::Amqp { lock, .. } => lock.release().await,
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
            Place::Redis(r) => r.last_runs().await,
            Place::Amqp { lock, file } => {
                // A beat on another host may have led last: the later tick wins per entry.
                let mut all = file.read()?;
                let mut changed = false;
                for (entry, tick) in lock.read_state().await? {
                    let t = all.entry(entry).or_insert(i64::MIN);
                    if tick > *t {
                        *t = tick;
                        changed = true;
                    }
                }
                if changed {
                    file.write(&all)?;
                }
                Ok(all)
            }
        }
    }

    /// Claims `tick` for `entry` under `lease` (see [`Recorded`]); fenced on both brokers.
    pub async fn record(&self, lease: &Lease, entry: &str, tick: i64) -> Result<Recorded> {
        match &self.0 {
            Place::Redis(r) => r.record(lease, entry, tick).await,
            Place::Amqp { lock, file } => {
                if !lock.check(lease).await? {
                    return Ok(Recorded::NotLeader);
                }
                let Some(all) = file.record(entry, tick)? else {
                    return Ok(Recorded::AlreadySent);
                };
                lock.write_state(&all).await?;
                Ok(Recorded::Fresh)
            }
        }
    }
}
