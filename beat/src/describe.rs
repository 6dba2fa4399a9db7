//! What `celerity beat --check` prints: each entry of a schedule and its next five fire times, in
//! the entry's timezone. Pure apart from reading the file.

use std::fmt::Write as _;
use std::path::Path;

use chrono::{DateTime, SecondsFormat, Utc};

use crate::error::Result;
use crate::schedule::{self, Entry, When};

/// Checks a schedule file; the text lists each entry with its next five fire times.
pub fn check(path: &Path) -> Result<String> {
    Ok(describe(&schedule::load(path)?, Utc::now()))
}

/// Each entry and its next five fire times after `now` (in the entry's timezone).
pub(crate) fn describe(entries: &[Entry], now: DateTime<Utc>) -> String {
    let mut out = String::new();
    for e in entries {
        let when = match &e.when {
            When::Cron(s) => format!("cron \"{}\"", s.source()),
            When::Every(d) => format!("every {}s", d.as_secs()),
        };
        let off = if e.enabled { "" } else { " (disabled)" };
        let _ = writeln!(out, "{}: {} — {when}, {}{off}", e.name, e.task, e.timezone);
        let times = e.upcoming(now, 5);
        if times.is_empty() {
            let _ = writeln!(out, "  never fires again");
        }
        for t in times {
            let local = t.with_timezone(&e.timezone);
            let _ = writeln!(
                out,
                "  {}",
                local.to_rfc3339_opts(SecondsFormat::Secs, true)
            );
        }
    }
    if entries.is_empty() {
        out.push_str("no entries\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_lists_five_local_times() {
        let e = schedule::parse(
            "[[entry]]\nname = \"n\"\ntask = \"t.x\"\ncron = \"0 9 * * *\"\ntimezone = \"Europe/Berlin\"\n",
        )
        .unwrap();
        let now = DateTime::parse_from_rfc3339("2024-01-01T12:00:00Z")
            .unwrap()
            .to_utc();
        let text = describe(&e, now);
        assert!(
            text.starts_with("n: t.x — cron \"0 0 9 * * *\", Europe/Berlin\n"),
            "{text}"
        );
        assert!(text.contains("  2024-01-02T09:00:00+01:00\n"), "{text}");
        assert!(text.contains("  2024-01-06T09:00:00+01:00\n"), "{text}");
        assert_eq!(text.lines().count(), 6);
    }
}
