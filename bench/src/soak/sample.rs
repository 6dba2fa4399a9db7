//! What the soak records of each process: its resident memory (`VmRSS`) and open file descriptors
//! at every sample, keyed by pid so a restarted child is a new row; the least-squares slope of both
//! over the second half of the run; and the text of the running table and the final summary.

use crate::procs;

/// One look at one process.
#[derive(Debug, Clone, Copy)]
pub struct Point {
    /// Seconds since the soak started.
    pub t: f64,
    pub rss_kib: u64,
    pub fds: u64,
}

/// The role of a process in its pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Supervisor,
    Child,
    /// The soak process itself (producer and checker of every pool).
    Harness,
}

impl Role {
    fn label(self) -> &'static str {
        match self {
            Role::Supervisor => "supervisor",
            Role::Child => "child",
            Role::Harness => "harness",
        }
    }
}

/// Every sample of one process.
#[derive(Debug, Clone)]
pub struct Series {
    /// The pool it belongs to (`redis`, `amqp`; `-` for the harness).
    pub pool: String,
    pub role: Role,
    pub pid: u32,
    pub points: Vec<Point>,
}

impl Series {
    pub fn new(pool: &str, role: Role, pid: u32) -> Series {
        Series {
            pool: pool.to_owned(),
            role,
            pid,
            points: Vec::new(),
        }
    }

    /// Reads the process now; false if it has gone.
    pub fn sample(&mut self, t: f64) -> bool {
        match (procs::rss_kib(self.pid), procs::fd_count(self.pid)) {
            (Some(rss_kib), Some(fds)) => {
                self.points.push(Point { t, rss_kib, fds });
                true
            }
            _ => false,
        }
    }

    /// `12345K/41` of the latest sample.
    pub fn cell(&self) -> String {
        self.points
            .last()
            .map_or_else(|| "gone".into(), |p| format!("{}K/{}", p.rss_kib, p.fds))
    }
}

/// The least-squares slope of `y` over `x`; `None` with fewer than 3 points or no spread in `x`.
pub fn slope(points: &[(f64, f64)]) -> Option<f64> {
    if points.len() < 3 {
        return None;
    }
    let n = points.len() as f64;
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

/// One process's line of the summary, its slopes over the samples taken at or after `from` seconds.
pub fn summary_row(s: &Series, from: f64) -> String {
    let (Some(first), Some(last)) = (s.points.first(), s.points.last()) else {
        return format!(
            "| {} | {} | {} | 0 | — | — | — | — | — | — | — |\n",
            s.pool,
            s.role.label(),
            s.pid
        );
    };
    let max = s.points.iter().map(|p| p.rss_kib).max().unwrap_or(0);
    let late: Vec<&Point> = s.points.iter().filter(|p| p.t >= from).collect();
    let per_hour = |f: fn(&Point) -> f64| {
        let xy: Vec<(f64, f64)> = late.iter().map(|p| (p.t / 3600.0, f(p))).collect();
        slope(&xy).map_or_else(|| "—".into(), |v| format!("{v:+.0}"))
    };
    format!(
        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
        s.pool,
        s.role.label(),
        s.pid,
        s.points.len(),
        first.rss_kib,
        last.rss_kib,
        max,
        per_hour(|p| p.rss_kib as f64),
        first.fds,
        last.fds,
        per_hour(|p| p.fds as f64),
    )
}

/// The summary table's header.
pub const SUMMARY_HEADER: &str =
    "| pool | process | pid | samples | RSS first KiB | RSS last KiB | \
RSS max KiB | RSS slope KiB/h | fds first | fds last | fd slope /h |\n\
|---|---|---|---|---|---|---|---|---|---|---|\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slope_of_a_line_is_its_gradient_and_of_a_flat_series_zero() {
        let line: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 3.0 * i as f64 + 7.0)).collect();
        assert!((slope(&line).unwrap() - 3.0).abs() < 1e-9);
        let flat: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 5.0)).collect();
        assert_eq!(slope(&flat), Some(0.0));
        assert_eq!(slope(&line[..2]), None);
        assert_eq!(slope(&[(1.0, 1.0), (1.0, 2.0), (1.0, 3.0)]), None);
    }

    #[test]
    fn the_summary_slope_uses_only_the_second_half() {
        let mut s = Series::new("redis", Role::Child, 42);
        // Grows 1000 KiB per sample in the first half (warm-up), flat after.
        for i in 0..20u64 {
            let rss_kib = 10_000 + 1000 * i.min(10);
            s.points.push(Point {
                t: i as f64 * 360.0,
                rss_kib,
                fds: 30,
            });
        }
        let row = summary_row(&s, 3600.0);
        assert!(row.contains("| +0 | 30 | 30 | +0 |"), "{row}");
    }
}
