//! `celerity beat --metrics-addr`: beat's [`BeatObserver`] events as Prometheus metrics and
//! readiness. Ticks sent by entry (`celerity_beat_ticks_sent_total`), how late they went out
//! (`celerity_beat_lateness_seconds`), `celerity_beat_leader` (1 on the leader, 0 on a standby), and
//! lease renewals and losses. Ready (`/readyz`): leading, or a standby that reaches the lock.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use celerity_beat::BeatObserver;
use celerity_worker::metrics::{
    Health, Histogram, MetricsSource, Series, Snapshot, RUNTIME_BUCKETS,
};

/// Where beat stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Standing {
    Starting,
    Leading,
    Standby,
    Unreachable(String),
    Stopped,
}

/// Beat's metrics.
#[derive(Debug)]
pub struct BeatMetrics {
    standing: Mutex<Standing>,
    ticks: Mutex<BTreeMap<String, u64>>,
    lateness: Histogram,
    renewals: AtomicU64,
    losses: AtomicU64,
}

impl Default for BeatMetrics {
    fn default() -> Self {
        BeatMetrics {
            standing: Mutex::new(Standing::Starting),
            ticks: Mutex::default(),
            lateness: Histogram::new(&RUNTIME_BUCKETS),
            renewals: AtomicU64::new(0),
            losses: AtomicU64::new(0),
        }
    }
}

impl BeatMetrics {
    fn set(&self, s: Standing) {
        *self.standing.lock().unwrap_or_else(|e| e.into_inner()) = s;
    }

    fn standing(&self) -> Standing {
        self.standing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The values now.
    pub fn snapshot(&self) -> Snapshot {
        let series = |name: &str, labels: Vec<(String, String)>, value: u64| Series {
            name: name.to_owned(),
            labels,
            value,
        };
        let mut counters: Vec<Series<u64>> = self
            .ticks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(entry, n)| {
                series(
                    "celerity_beat_ticks_sent",
                    vec![("entry".to_owned(), entry.clone())],
                    *n,
                )
            })
            .collect();
        counters.push(series(
            "celerity_beat_lease_renewals",
            vec![],
            self.renewals.load(Relaxed),
        ));
        counters.push(series(
            "celerity_beat_lease_losses",
            vec![],
            self.losses.load(Relaxed),
        ));
        let leader = f64::from(u8::from(self.standing() == Standing::Leading));
        Snapshot {
            counters,
            gauges: vec![Series {
                name: "celerity_beat_leader".to_owned(),
                labels: vec![],
                value: leader,
            }],
            histograms: vec![Series {
                name: "celerity_beat_lateness_seconds".to_owned(),
                labels: vec![],
                value: self.lateness.value(),
            }],
            ready: self.ready().is_ok(),
        }
    }

    fn ready(&self) -> Result<(), String> {
        match self.standing() {
            Standing::Leading | Standing::Standby => Ok(()),
            Standing::Starting => Err("starting".into()),
            Standing::Unreachable(why) => Err(format!("cannot reach the leader lock: {why}")),
            Standing::Stopped => Err("stopped".into()),
        }
    }
}

impl BeatObserver for BeatMetrics {
    fn leading(&self) {
        self.set(Standing::Leading);
    }

    fn standing_by(&self) {
        self.set(Standing::Standby);
    }

    fn unreachable(&self, why: &str) {
        self.set(Standing::Unreachable(why.to_owned()));
    }

    fn renewed(&self) {
        self.renewals.fetch_add(1, Relaxed);
    }

    fn lost(&self) {
        self.losses.fetch_add(1, Relaxed);
        self.set(Standing::Standby);
    }

    fn sent(&self, entry: &str, late: Duration) {
        let mut ticks = self.ticks.lock().unwrap_or_else(|e| e.into_inner());
        match ticks.get_mut(entry) {
            Some(n) => *n = n.saturating_add(1),
            None => {
                ticks.insert(entry.to_owned(), 1);
            }
        }
        drop(ticks);
        self.lateness.observe(late);
    }

    fn stopped(&self) {
        self.set(Standing::Stopped);
    }
}

impl MetricsSource for BeatMetrics {
    fn snapshot(&self) -> Snapshot {
        BeatMetrics::snapshot(self)
    }

    fn health(&self) -> Health {
        Health {
            live: Ok(()),
            ready: self.ready(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beat_events_become_metrics_and_readiness() {
        let m = BeatMetrics::default();
        assert!(m.health().ready.is_err());
        m.standing_by();
        assert_eq!(m.health().ready, Ok(()));
        assert!(m.metrics().contains("celerity_beat_leader 0.0"));
        m.leading();
        m.sent("every-second", Duration::from_millis(20));
        m.sent("every-second", Duration::from_millis(30));
        m.renewed();
        let text = m.metrics();
        for want in [
            "celerity_beat_leader 1.0",
            r#"celerity_beat_ticks_sent_total{entry="every-second"} 2"#,
            "celerity_beat_lease_renewals_total 1",
            "celerity_beat_lateness_seconds_count 2",
        ] {
            assert!(text.contains(want), "{want} not in\n{text}");
        }
        m.lost();
        m.unreachable("connection refused");
        assert!(m.health().ready.is_err_and(|w| w.contains("refused")));
        assert!(m.metrics().contains("celerity_beat_lease_losses_total 1"));
    }
}
