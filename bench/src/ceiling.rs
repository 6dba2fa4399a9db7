//! The broker's own limits, measured in the same run as the task queues, and each Celerity row's
//! place against them: Redis add+results against what a bare client moves through the same Redis
//! with as many commands per job (counted from `INFO commandstats` around Celerity's runs), RabbitMQ
//! rows against the bare lapin client, round trips against the floor of the same hops with no
//! task queue around them.

use std::collections::HashMap;

use crate::error::Result;
use crate::report::Row;
use crate::setup::REDIS_URL;

/// What the raw rows measured (medians), filled in as they run.
#[derive(Debug, Clone, Default)]
pub struct Ceilings {
    /// redis-benchmark, 50 clients, `-P 16`: (LPUSH ops/s, RPOP ops/s).
    pub redis_pipelined: Option<(f64, f64)>,
    /// Redis commands per job in Celerity's add-with-results runs (script bodies' commands
    /// counted one by one, the `EVALSHA` around them not).
    pub redis_commands_per_job: Option<f64>,
    /// The round-trip floor through Redis: (p50, p99) ms.
    pub redis_floor: Option<(f64, f64)>,
    /// The bare lapin client: publish, drain, both at once (msgs/s).
    pub amqp_rates: Option<(f64, f64, f64)>,
    /// The bare lapin client's one-way latency: (p50, p99) ms.
    pub amqp_one_way: Option<(f64, f64)>,
}

/// Commands that are the harness's own polling, not the system under test's.
const HARNESS: &[&str] = &[
    "info", "mget", "keys", "scan", "ping", "client", "hello", "select", "llen", "hlen", "exists",
    "evalsha", "eval", "script", "type", "command",
];

/// Calls per command since the server started (`INFO commandstats`), lower-case names.
pub async fn commandstats() -> Result<HashMap<String, u64>> {
    let client = redis::Client::open(REDIS_URL)?;
    let mut c = client.get_multiplexed_async_connection().await?;
    let text: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut c)
        .await?;
    Ok(parse_commandstats(&text))
}

/// `cmdstat_lpush:calls=12,usec=…` lines → {"lpush": 12}.
pub fn parse_commandstats(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (name, rest) = l.trim().strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name.to_ascii_lowercase(), calls))
        })
        .collect()
}

/// Commands per job between two `commandstats` snapshots around `jobs` jobs, leaving out the
/// harness's own polling. Other clients of the same Redis count too: a busy machine reads high.
pub fn commands_per_job(
    before: &HashMap<String, u64>,
    after: &HashMap<String, u64>,
    jobs: usize,
) -> Option<f64> {
    if jobs == 0 {
        return None;
    }
    let total: u64 = after
        .iter()
        .filter(|(name, _)| !HARNESS.contains(&name.as_str()))
        .map(|(name, calls)| calls.saturating_sub(before.get(name).copied().unwrap_or(0)))
        .sum();
    (total > 0).then(|| total as f64 / jobs as f64)
}

impl Ceilings {
    /// Sets each Celerity row's ceiling from what was measured.
    pub fn apply(&self, rows: &mut [Row]) {
        for r in rows {
            if let Some(c) = self.for_row(&r.shape, &r.setup, &r.metric) {
                r.ceiling = Some(c);
            }
        }
    }

    fn for_row(&self, shape: &str, setup: &str, metric: &str) -> Option<(f64, String)> {
        let redis = setup.starts_with("Redis");
        let amqp = setup.starts_with("RabbitMQ");
        let noop = shape.starts_with("noop ×");
        let add = shape.starts_with("add ×");
        let trip = shape.starts_with("round trip");
        match metric {
            "enqueue msgs/s" if noop && redis => {
                let (lpush, _) = self.redis_pipelined?;
                Some((lpush, "LPUSH -P 16".into()))
            }
            "drain jobs/s" if add && redis => {
                let (lpush, rpop) = self.redis_pipelined?;
                let k = self.redis_commands_per_job?;
                Some((
                    (lpush + rpop) / 2.0 / k,
                    format!("-P 16 ops/s ÷ {k:.1} cmds/job"),
                ))
            }
            "enqueue msgs/s" if noop && amqp => {
                Some((self.amqp_rates?.0, "bare lapin publish".into()))
            }
            "drain jobs/s" if noop && amqp => Some((self.amqp_rates?.1, "bare lapin drain".into())),
            "drain jobs/s" if add && amqp => {
                Some((self.amqp_rates?.2, "bare lapin publish+drain".into()))
            }
            "p50 ms" | "p99 ms" if trip => {
                let p50 = metric == "p50 ms";
                let pick = |(a, b): (f64, f64)| if p50 { a } else { b };
                let floor = pick(self.redis_floor?);
                if redis {
                    Some((floor, "Redis floor".into()))
                } else if amqp {
                    let one_way = pick(self.amqp_one_way?);
                    Some((one_way + floor, "lapin one-way + Redis floor".into()))
                } else {
                    None
                }
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commandstats_are_parsed_and_harness_calls_left_out() {
        let before = parse_commandstats(
            "# Commandstats\r\ncmdstat_lpush:calls=10,usec=5,usec_per_call=0.5\r\n\
             cmdstat_mget:calls=3,usec=1\r\n",
        );
        let after = parse_commandstats(
            "cmdstat_lpush:calls=110,usec=50\r\ncmdstat_zadd:calls=100,usec=9\r\n\
             cmdstat_mget:calls=500,usec=1\r\ncmdstat_evalsha:calls=7,usec=1\r\n",
        );
        assert_eq!(before.get("lpush"), Some(&10));
        assert_eq!(commands_per_job(&before, &after, 100), Some(2.0));
        assert_eq!(commands_per_job(&before, &after, 0), None);
    }

    #[test]
    fn rows_get_the_matching_ceiling() {
        let c = Ceilings {
            redis_pipelined: Some((800.0, 600.0)),
            redis_commands_per_job: Some(7.0),
            redis_floor: Some((0.2, 0.4)),
            amqp_rates: Some((10.0, 20.0, 11.0)),
            amqp_one_way: Some((0.3, 0.6)),
        };
        let mut rows = vec![
            Row::new(
                "add ×20000, results checked",
                "Redis / Redis",
                "drain jobs/s",
            ),
            Row::new(
                "round trip, 200 sequential add",
                "RabbitMQ / Redis",
                "p99 ms",
            ),
            Row::new(
                "memory (RSS, worker + children)",
                "Redis / Redis",
                "idle MiB",
            ),
        ];
        c.apply(&mut rows);
        assert_eq!(rows[0].ceiling.as_ref().map(|c| c.0), Some(100.0));
        let p99 = rows[1].ceiling.as_ref().map(|c| c.0).unwrap_or_default();
        assert!((p99 - 1.0).abs() < 1e-9, "{p99}");
        assert!(rows[2].ceiling.is_none());
    }
}
