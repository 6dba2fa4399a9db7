//! Fire times of an entry; pure (the clock is a parameter).
//!
//! Cron entries are evaluated on the wall clock of the entry's timezone, the way cron users expect
//! across daylight-saving changes:
//! * spring forward: a wall time inside the skipped hour fires once, at the first instant after the
//!   gap (02:30 on a day where 02:00 jumps to 03:00 fires at 03:00 new time), so no day is skipped;
//! * fall back: a wall time that occurs twice fires only at its first occurrence, never twice.
//!
//! Interval (`every`) entries fire on multiples of their period since the Unix epoch, so their ticks
//! are the same for every beat process and across restarts. All fire times are whole seconds.

use chrono::{DateTime, Duration, LocalResult, NaiveDateTime, TimeZone, Timelike as _, Utc};
use chrono_tz::Tz;

use crate::schedule::{Entry, When};

/// Most cron candidates looked at in one search (guards against expressions that never fire).
const SEARCH_LIMIT: usize = 1_000_000;

impl Entry {
    /// The first fire time strictly after `t`, or `None` if the entry never fires again.
    pub(crate) fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match &self.when {
            When::Every(p) => {
                let p = i64::try_from(p.as_secs()).ok()?.max(1);
                let k = t.timestamp().div_euclid(p) + 1;
                DateTime::from_timestamp(k.checked_mul(p)?, 0)
            }
            When::Cron(s) => cron_next_after(s, self.timezone, t),
        }
    }

    /// The latest fire time in `(after, now]`, if any.
    pub(crate) fn latest_in(
        &self,
        after: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        if now <= after {
            return None;
        }
        if let When::Every(p) = &self.when {
            let p = i64::try_from(p.as_secs()).ok()?.max(1);
            let t = DateTime::from_timestamp(now.timestamp().div_euclid(p) * p, 0)?;
            return (t > after).then_some(t);
        }
        // Look back over growing windows so a dense expression does not walk a long outage.
        for window in [60, 3_600, 86_400, 32 * 86_400, 367 * 86_400, i64::MAX] {
            let start = match now
                .checked_sub_signed(Duration::try_seconds(window).unwrap_or(Duration::MAX))
            {
                Some(s) if s > after => s,
                _ => after,
            };
            let mut last = None;
            let mut cur = start;
            for _ in 0..SEARCH_LIMIT {
                match self.next_after(cur) {
                    Some(n) if n <= now => {
                        last = Some(n);
                        cur = n;
                    }
                    _ => break,
                }
            }
            if last.is_some() || start == after {
                return last;
            }
        }
        None
    }

    /// The next `n` fire times after `t`.
    pub(crate) fn upcoming(&self, t: DateTime<Utc>, n: usize) -> Vec<DateTime<Utc>> {
        let mut out = Vec::with_capacity(n);
        let mut cur = t;
        while out.len() < n {
            match self.next_after(cur) {
                Some(next) => {
                    out.push(next);
                    cur = next;
                }
                None => break,
            }
        }
        out
    }
}

fn cron_next_after(s: &cron::Schedule, tz: Tz, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
    // Walk wall-clock times (a naive clock, carried as UTC) and map each to a real instant.
    let wall = Utc.from_utc_datetime(&t.with_timezone(&tz).naive_local());
    s.after(&wall)
        .take(SEARCH_LIMIT)
        .filter_map(|c| resolve(tz, c.naive_utc()))
        .find(|i| *i > t)
}

/// The instant a wall time in `tz` stands for: the first one if it happens twice, the end of the gap
/// if the clock skips it.
fn resolve(tz: Tz, wall: NaiveDateTime) -> Option<DateTime<Utc>> {
    match tz.from_local_datetime(&wall) {
        LocalResult::Single(d) => Some(d.to_utc()),
        LocalResult::Ambiguous(a, b) => Some(a.to_utc().min(b.to_utc())),
        LocalResult::None => {
            // Skipped: find the first wall-clock minute after it that exists (gaps are < 2 days).
            let mut m = wall.checked_add_signed(Duration::minutes(1))?;
            m = m.with_second(0)?;
            for _ in 0..(48 * 60) {
                match tz.from_local_datetime(&m) {
                    LocalResult::Single(d) => return Some(d.to_utc()),
                    LocalResult::Ambiguous(a, b) => return Some(a.to_utc().min(b.to_utc())),
                    LocalResult::None => m = m.checked_add_signed(Duration::minutes(1))?,
                }
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::parse;

    fn entry(when: &str, tz: &str) -> Entry {
        let text = format!("[[entry]]\nname = \"e\"\ntask = \"t\"\n{when}\ntimezone = \"{tz}\"\n");
        parse(&text).unwrap().remove(0)
    }

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().to_utc()
    }

    /// (cron, timezone, start (UTC), expected next fire times (UTC)).
    #[test]
    fn cron_fire_times_across_dst() {
        let table: &[(&str, &str, &str, &[&str])] = &[
            // Berlin spring forward 2024-03-31 02:00 CET → 03:00 CEST: 02:30 fires once, at 03:00 CEST.
            (
                "cron = \"0 30 2 * * *\"",
                "Europe/Berlin",
                "2024-03-29T12:00:00Z",
                &[
                    "2024-03-30T01:30:00Z",
                    "2024-03-31T01:00:00Z",
                    "2024-04-01T00:30:00Z",
                ],
            ),
            // Berlin fall back 2024-10-27 03:00 CEST → 02:00 CET: 02:30 happens twice, fires once.
            (
                "cron = \"30 2 * * *\"",
                "Europe/Berlin",
                "2024-10-25T12:00:00Z",
                &[
                    "2024-10-26T00:30:00Z",
                    "2024-10-27T00:30:00Z",
                    "2024-10-28T01:30:00Z",
                ],
            ),
            // New York spring forward 2024-03-10 02:00 EST → 03:00 EDT.
            (
                "cron = \"30 2 * * *\"",
                "America/New_York",
                "2024-03-09T12:00:00Z",
                &["2024-03-10T07:00:00Z", "2024-03-11T06:30:00Z"],
            ),
            // New York fall back 2024-11-03 02:00 EDT → 01:00 EST: 01:30 fires once (EDT).
            (
                "cron = \"30 1 * * *\"",
                "America/New_York",
                "2024-11-02T12:00:00Z",
                &["2024-11-03T05:30:00Z", "2024-11-04T06:30:00Z"],
            ),
            // Hourly at :30 in New York around fall back: 01:30 is not repeated.
            (
                "cron = \"30 * * * *\"",
                "America/New_York",
                "2024-11-03T04:00:00Z",
                &[
                    "2024-11-03T04:30:00Z",
                    "2024-11-03T05:30:00Z",
                    "2024-11-03T07:30:00Z",
                ],
            ),
            // Classic weekdays: 1-5 = Monday to Friday. 2024-06-01 is a Saturday.
            (
                "cron = \"0 9 * * 1-5\"",
                "UTC",
                "2024-06-01T00:00:00Z",
                &["2024-06-03T09:00:00Z", "2024-06-04T09:00:00Z"],
            ),
            // Seconds field, in UTC.
            (
                "cron = \"*/20 * * * * *\"",
                "UTC",
                "2024-06-01T00:00:05Z",
                &[
                    "2024-06-01T00:00:20Z",
                    "2024-06-01T00:00:40Z",
                    "2024-06-01T00:01:00Z",
                ],
            ),
            // Intervals are aligned to the epoch and ignore the timezone.
            (
                "every = \"1h30m\"",
                "Europe/Berlin",
                "2024-03-31T00:10:00Z",
                &["2024-03-31T01:30:00Z", "2024-03-31T03:00:00Z"],
            ),
        ];
        for (when, tz, start, want) in table {
            let e = entry(when, tz);
            let got: Vec<_> = e.upcoming(utc(start), want.len());
            let want: Vec<_> = want.iter().map(|s| utc(s)).collect();
            assert_eq!(got, want, "{when} in {tz} from {start}");
        }
    }

    #[test]
    fn every_minute_through_fall_back_never_repeats_an_instant() {
        let e = entry("cron = \"0 * * * * *\"", "Europe/Berlin");
        let times = e.upcoming(utc("2024-10-26T23:00:00Z"), 240);
        assert!(times.windows(2).all(|w| w[0] < w[1]));
        let walls: std::collections::HashSet<_> = times
            .iter()
            .map(|t| t.with_timezone(&chrono_tz::Europe::Berlin).naive_local())
            .collect();
        assert_eq!(walls.len(), times.len(), "a wall time fired twice");
    }

    #[test]
    fn latest_in_finds_the_last_missed_tick() {
        let e = entry("every = \"10s\"", "UTC");
        let t = e.latest_in(utc("2024-01-01T00:00:00Z"), utc("2024-01-01T00:05:07Z"));
        assert_eq!(t, Some(utc("2024-01-01T00:05:00Z")));
        assert_eq!(
            e.latest_in(utc("2024-01-01T00:05:00Z"), utc("2024-01-01T00:05:07Z")),
            None
        );
        let c = entry("cron = \"0 0 4 * * *\"", "UTC");
        let t = c.latest_in(utc("2024-01-01T00:00:00Z"), utc("2024-03-01T12:00:00Z"));
        assert_eq!(t, Some(utc("2024-03-01T04:00:00Z")));
        let dense = entry("cron = \"* * * * * *\"", "UTC");
        let t = dense.latest_in(utc("2020-01-01T00:00:00Z"), utc("2024-03-01T12:00:00Z"));
        assert_eq!(t, Some(utc("2024-03-01T12:00:00Z")));
    }
}
