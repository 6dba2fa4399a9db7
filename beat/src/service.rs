//! One beat from start to stop: [`run`] loads the schedule file, connects the broker's lock and
//! state store and a client, keeps the schedule reloaded (file changes, and each reload request the
//! caller sends), and runs the [`Ticker`] until shutdown. [`BeatConfig`] holds the settings.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use celerity_broker::connect_broker;
use celerity_client::Client;

use crate::error::Result;
use crate::observe::BeatObserver;
use crate::reload;
use crate::schedule;
use crate::state::{AmqpPlaces, Store};
use crate::ticker::Ticker;

/// The leader lease when none is given.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

/// What a beat runs and how.
#[derive(Debug, Clone)]
pub struct BeatConfig {
    /// The schedule file (TOML).
    pub schedule: PathBuf,
    /// Leader lock lease: a standby takes over at most this long after the leader dies (at least
    /// 0.3 s is used).
    pub lease: Duration,
    /// Where the lock and the last-run state live when the broker is amqp:// (Redis keeps them in
    /// its own keys).
    pub amqp: AmqpPlaces,
    /// Told what beat does (for metrics and readiness); none: nobody watches.
    pub observer: Option<Arc<dyn BeatObserver>>,
}

impl BeatConfig {
    /// Runs `schedule` with the default lease and AMQP places.
    pub fn new(schedule: impl Into<PathBuf>) -> Self {
        BeatConfig {
            schedule: schedule.into(),
            lease: DEFAULT_LEASE,
            amqp: AmqpPlaces::default(),
            observer: None,
        }
    }
}

/// Runs beat on the broker at `broker_url` until `shutdown` is cancelled. The schedule is re-read
/// whenever its file changes and on each message from `reloads` (the message is the reason logged,
/// e.g. `"SIGHUP"`); drop the sender if there is nothing to send.
pub async fn run(
    config: &BeatConfig,
    broker_url: &str,
    reloads: mpsc::Receiver<&'static str>,
    shutdown: CancellationToken,
) -> Result<()> {
    let path = config.schedule.as_path();
    let entries = schedule::load(path)?;
    let store = Store::connect_with(broker_url, &config.amqp).await?;
    let client = Client::new(connect_broker(broker_url).await?, None);
    tracing::info!(
        entries = entries.iter().filter(|e| e.enabled).count(),
        schedule = %path.display(),
        "beat: starting"
    );
    // The watcher stops with beat, whether beat was shut down or failed.
    let watching = shutdown.child_token();
    let entries = reload::watch(path.to_path_buf(), entries, reloads, watching.clone());
    let ticker = Ticker::new(entries, client.clone(), store, config.lease)
        .observed_by(config.observer.clone());
    let out = ticker.run(shutdown).await;
    watching.cancel();
    let _ = client.close().await;
    out
}
