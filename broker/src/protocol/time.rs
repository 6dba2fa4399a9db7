//! Times on the wire: ISO-8601 as Python's `datetime.isoformat()` writes it, read leniently.

use chrono::{DateTime, FixedOffset, NaiveDateTime, SecondsFormat, TimeZone, Utc};

use crate::error::{BrokerError, Result};

/// Formats like Python's `isoformat()`: microseconds only when non-zero, offset as `+HH:MM`.
pub fn format_iso(t: &DateTime<FixedOffset>) -> String {
    let micros = t.timestamp_subsec_micros();
    if micros == 0 {
        t.to_rfc3339_opts(SecondsFormat::Secs, false)
    } else {
        // Truncate below the microsecond, as Python's datetime has no finer resolution.
        let t = t.with_timezone(t.offset());
        let base = t.format("%Y-%m-%dT%H:%M:%S");
        let off = t.format("%:z");
        format!("{base}.{micros:06}{off}")
    }
}

/// Formats a UTC time like Python's `isoformat()` on an aware UTC datetime.
pub fn format_utc(t: &DateTime<Utc>) -> String {
    format_iso(&t.fixed_offset())
}

/// Parses an ISO-8601 time with or without an offset (none means UTC), with or without fractional
/// seconds, with `T` or a space between date and time.
pub fn parse_iso(s: &str) -> Result<DateTime<FixedOffset>> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t);
    }
    let normalized = s.replacen(' ', "T", 1);
    if let Ok(t) = DateTime::parse_from_rfc3339(&normalized) {
        return Ok(t);
    }
    for fmt in [
        "%Y-%m-%dT%H:%M:%S%.f%:z",
        "%Y-%m-%dT%H:%M:%S%.f%z",
        "%Y-%m-%dT%H:%M%:z",
    ] {
        if let Ok(t) = DateTime::parse_from_str(&normalized, fmt) {
            return Ok(t);
        }
    }
    for fmt in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%dT%H:%M",
    ] {
        if let Ok(t) = NaiveDateTime::parse_from_str(&normalized, fmt) {
            return Ok(Utc.from_utc_datetime(&t).fixed_offset());
        }
    }
    Err(BrokerError::malformed(format_args!(
        "`{s}` is not an ISO-8601 time"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_python_isoformat() {
        let t = parse_iso("2024-05-01T12:00:05.123456+00:00").unwrap();
        assert_eq!(format_iso(&t), "2024-05-01T12:00:05.123456+00:00");
        let t = parse_iso("2024-05-01T12:00:05+02:00").unwrap();
        assert_eq!(format_iso(&t), "2024-05-01T12:00:05+02:00");
        let t = parse_iso("2024-05-01T12:00:05.000120-05:30").unwrap();
        assert_eq!(format_iso(&t), "2024-05-01T12:00:05.000120-05:30");
    }

    #[test]
    fn parses_lenient_forms() {
        let utc = parse_iso("2024-05-01T12:00:05").unwrap();
        assert_eq!(utc.offset().local_minus_utc(), 0);
        assert_eq!(
            parse_iso("2024-05-01 12:00:05.5")
                .unwrap()
                .timestamp_subsec_millis(),
            500
        );
        assert_eq!(parse_iso("2024-05-01T12:00:05Z").unwrap(), utc);
        assert!(parse_iso("yesterday").is_err());
        assert!(parse_iso("").is_err());
    }
}
