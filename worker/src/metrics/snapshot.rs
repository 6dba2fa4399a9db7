//! A worker's metrics as plain values ([`Snapshot`]): what a process serves at `/metrics`, what a
//! pool child sends its supervisor every second, and what the supervisor adds up for the whole pool
//! ([`Snapshot::merge`]). [`Snapshot::render`] writes one in the Prometheus/OpenMetrics text format
//! with `prometheus-client`'s encoder.

use std::collections::BTreeMap;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use serde::{Deserialize, Serialize};

/// Label pairs of one series, in a fixed order.
pub type Labels = Vec<(String, String)>;

/// One series: a metric's name (counters without `_total`, which the encoder adds), its labels
/// and its value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Series<V> {
    pub name: String,
    pub labels: Labels,
    pub value: V,
}

/// A histogram's state: upper bounds (without `+Inf`), the count in each bucket (not cumulative;
/// one more than the bounds, the last for `+Inf`), the sum and the count of observations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hist {
    pub bounds: Vec<f64>,
    pub buckets: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Hist {
    fn add(&mut self, other: &Hist) {
        if self.bounds != other.bounds || self.buckets.len() != other.buckets.len() {
            return;
        }
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a = a.saturating_add(*b);
        }
        self.sum += other.sum;
        self.count = self.count.saturating_add(other.count);
    }
}

/// Everything one process (or a whole pool) serves, plus its health.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    #[serde(default)]
    pub counters: Vec<Series<u64>>,
    #[serde(default)]
    pub gauges: Vec<Series<f64>>,
    #[serde(default)]
    pub histograms: Vec<Series<Hist>>,
    /// Ready: connected to the broker and the result backend, and consuming.
    #[serde(default)]
    pub ready: bool,
}

type Key = (String, Labels);

/// Series added up by name and labels.
#[derive(Debug, Default)]
pub struct Totals {
    counters: BTreeMap<Key, u64>,
    gauges: BTreeMap<Key, f64>,
    histograms: BTreeMap<Key, Hist>,
}

impl Totals {
    /// Adds `s`'s counters and histograms; with `gauges`, its gauges too (the largest value of a
    /// series wins: series of one process carry its `hostname`, so they never meet another's, and
    /// a pool's queue lengths are the same queue seen by several children).
    pub fn add(&mut self, s: &Snapshot, gauges: bool) {
        for c in &s.counters {
            let v = self
                .counters
                .entry((c.name.clone(), c.labels.clone()))
                .or_default();
            *v = v.saturating_add(c.value);
        }
        for h in &s.histograms {
            self.histograms
                .entry((h.name.clone(), h.labels.clone()))
                .and_modify(|t| t.add(&h.value))
                .or_insert_with(|| h.value.clone());
        }
        if gauges {
            for g in &s.gauges {
                self.gauges
                    .entry((g.name.clone(), g.labels.clone()))
                    .and_modify(|v| *v = v.max(g.value))
                    .or_insert(g.value);
            }
        }
    }

    /// The totals as a snapshot (`ready` false: the caller decides it).
    pub fn snapshot(&self) -> Snapshot {
        fn series<V: Clone>(m: &BTreeMap<Key, V>) -> Vec<Series<V>> {
            m.iter()
                .map(|((name, labels), v)| Series {
                    name: name.clone(),
                    labels: labels.clone(),
                    value: v.clone(),
                })
                .collect()
        }
        Snapshot {
            counters: series(&self.counters),
            gauges: series(&self.gauges),
            histograms: series(&self.histograms),
            ready: false,
        }
    }
}

impl Snapshot {
    /// `parts` added up (see [`Totals::add`]).
    pub fn merge<'a>(parts: impl IntoIterator<Item = &'a Snapshot>) -> Snapshot {
        let mut t = Totals::default();
        for p in parts {
            t.add(p, true);
        }
        t.snapshot()
    }

    /// The OpenMetrics text of this snapshot (ends with `# EOF`).
    pub fn render(&self) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(Collector(Snapshot {
            ready: self.ready,
            ..self.clone()
        })));
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Feeds a snapshot to the encoder, one descriptor per metric name.
#[derive(Debug)]
struct Collector(Snapshot);

impl prometheus_client::collector::Collector for Collector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        family(
            &mut encoder,
            &self.0.counters,
            MetricType::Counter,
            |s, e| prometheus_client::metrics::counter::ConstCounter::new(s.value).encode(e),
        )?;
        family(&mut encoder, &self.0.gauges, MetricType::Gauge, |s, e| {
            prometheus_client::metrics::gauge::ConstGauge::new(s.value).encode(e)
        })?;
        family(
            &mut encoder,
            &self.0.histograms,
            MetricType::Histogram,
            |s, mut e| {
                let h = &s.value;
                let buckets: Vec<(f64, u64)> = h
                    .bounds
                    .iter()
                    .copied()
                    .chain(std::iter::once(f64::MAX))
                    .zip(h.buckets.iter().copied())
                    .collect();
                e.encode_histogram::<NoLabelSet>(h.sum, h.count, &buckets, None)
            },
        )
    }
}

/// Encodes `series` of one type, one descriptor per name; a series without labels is written
/// without braces.
fn family<V>(
    encoder: &mut DescriptorEncoder<'_>,
    series: &[Series<V>],
    kind: MetricType,
    value: impl Fn(&Series<V>, MetricEncoder<'_>) -> Result<(), std::fmt::Error>,
) -> Result<(), std::fmt::Error> {
    for (name, series) in by_name(series) {
        let mut metric = encoder.encode_descriptor(name, help(name), None, kind)?;
        if let [only] = series.as_slice() {
            if only.labels.is_empty() {
                value(only, metric)?;
                continue;
            }
        }
        for s in series {
            value(s, metric.encode_family(&s.labels)?)?;
        }
    }
    Ok(())
}

fn by_name<V>(series: &[Series<V>]) -> BTreeMap<&str, Vec<&Series<V>>> {
    let mut m: BTreeMap<&str, Vec<&Series<V>>> = BTreeMap::new();
    for s in series {
        m.entry(s.name.as_str()).or_default().push(s);
    }
    m
}

/// The help text of each metric we serve.
fn help(name: &str) -> &'static str {
    match name {
        "celery_task_sent" => "Tasks sent by this worker (retries and workflow steps).",
        "celery_task_received" => "Tasks received.",
        "celery_task_started" => "Tasks started.",
        "celery_task_succeeded" => "Tasks that succeeded.",
        "celery_task_failed" => "Tasks that failed, by exception.",
        "celery_task_rejected" => "Tasks rejected (undecodable, dead-lettered).",
        "celery_task_revoked" => "Tasks revoked (including expired and terminated).",
        "celery_task_retried" => "Tasks retried.",
        "celery_task_runtime" => "Task runtime in seconds.",
        "celery_worker_up" => "1 while the worker runs.",
        "celery_worker_tasks_active" => "Tasks running now.",
        "celery_queue_length" => "Messages waiting in a consumed queue (all priorities).",
        "celerity_process_restarts" => "Pool processes replaced, by cause.",
        "celerity_prefetched_jobs" => "Jobs held by a process but not started.",
        "celerity_broker_reconnects" => "Times fetching from the broker failed and was retried.",
        "celerity_events_dropped" => "Task events dropped because the broker fell behind.",
        "celerity_result_store_seconds" => "Time to store a job's outcome in the result backend.",
        "celerity_publish_seconds" => {
            "Time to publish (and have confirmed) a message the worker sends."
        }
        "celerity_dead_lettered" => "Messages moved to the dead-letter queue, by reason.",
        "celerity_beat_ticks_sent" => "Periodic ticks sent, by schedule entry.",
        "celerity_beat_lateness_seconds" => "How late a tick was sent after its scheduled time.",
        "celerity_beat_leader" => "1 on the beat that holds the leader lock, 0 on a standby.",
        "celerity_beat_lease_renewals" => "Leader lease renewals.",
        "celerity_beat_lease_losses" => "Times the leader lost its lease.",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn snap(n: u64, active: f64) -> Snapshot {
        Snapshot {
            counters: vec![Series {
                name: "celery_task_succeeded".into(),
                labels: labels(&[("name", "t"), ("hostname", "h"), ("queue_name", "q")]),
                value: n,
            }],
            gauges: vec![Series {
                name: "celery_queue_length".into(),
                labels: labels(&[("queue_name", "q")]),
                value: active,
            }],
            histograms: vec![Series {
                name: "celery_task_runtime".into(),
                labels: labels(&[("name", "t")]),
                value: Hist {
                    bounds: vec![0.1, 1.0],
                    buckets: vec![n, 0, 1],
                    sum: 2.5,
                    count: n + 1,
                },
            }],
            ready: true,
        }
    }

    #[test]
    fn snapshots_add_up_and_render_as_openmetrics() {
        let merged = Snapshot::merge([&snap(2, 3.0), &snap(5, 7.0)]);
        let text = merged.render();
        assert!(
            text.contains(r#"celery_task_succeeded_total{name="t",hostname="h",queue_name="q"} 7"#),
            "{text}"
        );
        assert!(
            text.contains(r#"celery_queue_length{queue_name="q"} 7"#),
            "{text}"
        );
        assert!(
            text.contains(r#"celery_task_runtime_bucket{le="0.1",name="t"} 7"#),
            "{text}"
        );
        assert!(
            text.contains(r#"celery_task_runtime_bucket{le="+Inf",name="t"} 9"#),
            "{text}"
        );
        assert!(
            text.contains("celery_task_runtime_sum{name=\"t\"} 5"),
            "{text}"
        );
        assert!(text.trim_end().ends_with("# EOF"));
        let line = serde_json::to_string(&merged).unwrap_or_default();
        assert_eq!(serde_json::from_str::<Snapshot>(&line).ok(), Some(merged));
    }
}
