//! The schedule file (TOML) parsed into checked [`Entry`] values; pure, no I/O beyond the read.
//!
//! ```toml
//! [[entry]]
//! name = "cleanup"
//! task = "app.cleanup"
//! cron = "0 30 2 * * *"        # the `cron` crate's syntax (seconds first); 5-field cron also works
//! timezone = "Europe/Berlin"   # IANA name; UTC by default
//! args = [1, 2]
//! kwargs = { dry_run = false }
//! queue = "maintenance"
//! priority = 3
//! expires = 600                # seconds
//! catch_up = "once"            # or "skip"
//!
//! [[entry]]
//! name = "ping"
//! task = "app.ping"
//! every = "1h30m"
//! enabled = false
//! ```

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use chrono_tz::Tz;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::{BeatError, Result};

/// When an entry fires.
#[derive(Debug, Clone)]
pub enum When {
    /// A cron expression, evaluated in the entry's timezone.
    Cron(Box<cron::Schedule>),
    /// Every so often, on multiples of the period since the Unix epoch.
    Every(Duration),
}

/// What to do with ticks that passed while no beat ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CatchUp {
    /// Send the latest missed tick once.
    Once,
    /// Send nothing for missed ticks.
    Skip,
}

/// One checked schedule entry.
#[derive(Debug, Clone)]
pub struct Entry {
    pub name: String,
    pub task: String,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    pub when: When,
    pub timezone: Tz,
    pub queue: Option<String>,
    pub priority: Option<u8>,
    pub expires: Option<Duration>,
    pub enabled: bool,
    pub catch_up: CatchUp,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    entry: Vec<RawEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    name: String,
    task: String,
    #[serde(default)]
    args: Option<toml::Value>,
    #[serde(default)]
    kwargs: Option<toml::Value>,
    cron: Option<String>,
    every: Option<String>,
    queue: Option<String>,
    priority: Option<u8>,
    expires: Option<f64>,
    timezone: Option<String>,
    enabled: Option<bool>,
    catch_up: Option<String>,
}

/// Reads and checks a schedule file.
pub(crate) fn load(path: &Path) -> Result<Vec<Entry>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| BeatError::Schedule(format!("cannot read {}: {e}", path.display())))?;
    parse(&text).map_err(|e| match e {
        BeatError::Schedule(m) => BeatError::Schedule(format!("{}: {m}", path.display())),
        other => other,
    })
}

/// Parses and checks schedule text. Disabled entries are kept (with `enabled = false`).
pub(crate) fn parse(text: &str) -> Result<Vec<Entry>> {
    let file: File =
        toml::from_str(text).map_err(|e| BeatError::Schedule(one_line(&e.to_string())))?;
    let mut out: Vec<Entry> = Vec::with_capacity(file.entry.len());
    for raw in file.entry {
        let entry = check(raw)?;
        if out.iter().any(|e| e.name == entry.name) {
            return Err(bad(&entry.name, "the name is used by another entry"));
        }
        out.push(entry);
    }
    Ok(out)
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn bad(name: &str, what: impl std::fmt::Display) -> BeatError {
    BeatError::Schedule(format!("entry `{name}`: {what}"))
}

fn check(raw: RawEntry) -> Result<Entry> {
    let n = raw.name.as_str();
    if n.is_empty() {
        return Err(BeatError::Schedule("an entry has an empty name".into()));
    }
    if raw.task.is_empty() {
        return Err(bad(n, "`task` is empty"));
    }
    let when = match (&raw.cron, &raw.every) {
        (Some(c), None) => When::Cron(Box::new(parse_cron(c).map_err(|e| bad(n, e))?)),
        (None, Some(e)) => When::Every(parse_every(e).map_err(|e| bad(n, e))?),
        (Some(_), Some(_)) => return Err(bad(n, "give `cron` or `every`, not both")),
        (None, None) => return Err(bad(n, "needs `cron = \"…\"` or `every = \"…\"`")),
    };
    let args = match raw.args.map(to_json) {
        None => Vec::new(),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(bad(n, "`args` must be a list")),
    };
    let kwargs = match raw.kwargs.map(to_json) {
        None => Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(bad(n, "`kwargs` must be a table")),
    };
    let timezone = match &raw.timezone {
        None => Tz::UTC,
        Some(z) => Tz::from_str(z)
            .map_err(|_| bad(n, format!("unknown timezone `{z}` (want an IANA name)")))?,
    };
    let expires = match raw.expires {
        None => None,
        Some(s) => Some(
            Duration::try_from_secs_f64(s)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| bad(n, format!("`expires` must be seconds > 0, got {s}")))?,
        ),
    };
    let catch_up = match raw.catch_up.as_deref() {
        None | Some("once") => CatchUp::Once,
        Some("skip") => CatchUp::Skip,
        Some(o) => {
            return Err(bad(
                n,
                format!("`catch_up` must be \"once\" or \"skip\", got `{o}`"),
            ))
        }
    };
    Ok(Entry {
        name: raw.name,
        task: raw.task,
        args,
        kwargs,
        when,
        timezone,
        queue: raw.queue,
        priority: raw.priority,
        expires,
        enabled: raw.enabled.unwrap_or(true),
        catch_up,
    })
}

fn to_json(v: toml::Value) -> Value {
    match v {
        toml::Value::String(s) => Value::String(s),
        toml::Value::Integer(i) => Value::from(i),
        toml::Value::Float(f) => Value::from(f),
        toml::Value::Boolean(b) => Value::Bool(b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(a) => Value::Array(a.into_iter().map(to_json).collect()),
        toml::Value::Table(t) => {
            Value::Object(t.into_iter().map(|(k, v)| (k, to_json(v))).collect())
        }
    }
}

/// Parses a cron expression: the `cron` crate's 6/7 fields (seconds first), or classic 5-field cron
/// (minute first; its day-of-week numbers 0–7 with 0 and 7 = Sunday are translated).
pub(crate) fn parse_cron(expr: &str) -> std::result::Result<cron::Schedule, String> {
    let fields: Vec<&str> = expr.split_whitespace().collect();
    let full = if fields.len() == 5 {
        let dow = classic_dow(fields[4])?;
        format!(
            "0 {} {} {} {} {dow}",
            fields[0], fields[1], fields[2], fields[3]
        )
    } else {
        fields.join(" ")
    };
    cron::Schedule::from_str(&full).map_err(|e| {
        // The crate's message repeats the expression with a caret; its last line is the reason.
        let msg = e.to_string();
        let reason = msg
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("invalid");
        format!("bad cron expression `{expr}`: {}", reason.trim())
    })
}

/// Classic cron counts weekdays 0–7 from Sunday; the `cron` crate counts 1–7 from Sunday.
fn classic_dow(field: &str) -> std::result::Result<String, String> {
    let mut out = String::new();
    let mut num = String::new();
    let mut after_slash = false;
    let mut in_range = false;
    let flush = |num: &mut String, out: &mut String, after_slash: bool, in_range: bool| {
        if num.is_empty() {
            return Ok(());
        }
        let n: u32 = num
            .parse()
            .map_err(|_| format!("bad day of week `{num}`"))?;
        let mapped = if after_slash {
            n
        } else {
            match n {
                0..=6 => n + 1,
                7 if !in_range => 1,
                _ => {
                    return Err(format!(
                        "day of week `{field}`: use 0–6 (0 = Sunday) or names in ranges"
                    ))
                }
            }
        };
        out.push_str(&mapped.to_string());
        num.clear();
        Ok(())
    };
    for c in field.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        flush(&mut num, &mut out, after_slash, in_range)?;
        match c {
            '/' => after_slash = true,
            '-' => in_range = true,
            ',' => {
                after_slash = false;
                in_range = false;
            }
            _ => {}
        }
        out.push(c);
    }
    flush(&mut num, &mut out, after_slash, in_range)?;
    Ok(out)
}

/// Parses `30s`, `5m`, `1h`, `1h30m`, `2d` (units d/h/m/s, each at most once, largest first).
pub(crate) fn parse_every(s: &str) -> std::result::Result<Duration, String> {
    let err = || format!("bad `every = \"{s}\"` (want e.g. \"30s\", \"5m\", \"1h30m\")");
    let mut total: u64 = 0;
    let mut num = String::new();
    let mut last_rank = 5;
    for c in s.trim().chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let (rank, unit) = match c {
            'd' => (4, 86_400),
            'h' => (3, 3_600),
            'm' => (2, 60),
            's' => (1, 1),
            _ => return Err(err()),
        };
        if rank >= last_rank || num.is_empty() {
            return Err(err());
        }
        last_rank = rank;
        let n: u64 = num.parse().map_err(|_| err())?;
        total = n
            .checked_mul(unit)
            .and_then(|x| total.checked_add(x))
            .ok_or_else(err)?;
        num.clear();
    }
    if !num.is_empty() || total == 0 {
        return Err(err());
    }
    Ok(Duration::from_secs(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_parses() {
        for (s, secs) in [
            ("30s", 30),
            ("5m", 300),
            ("1h", 3600),
            ("1h30m", 5400),
            ("1d2s", 86402),
        ] {
            assert_eq!(parse_every(s).unwrap(), Duration::from_secs(secs), "{s}");
        }
        for s in ["", "0s", "5", "m", "30m1h", "5x", "1h1h"] {
            assert!(parse_every(s).is_err(), "{s}");
        }
    }

    #[test]
    fn classic_weekdays_are_translated() {
        assert_eq!(classic_dow("1-5").unwrap(), "2-6");
        assert_eq!(classic_dow("0,6").unwrap(), "1,7");
        assert_eq!(classic_dow("7").unwrap(), "1");
        assert_eq!(classic_dow("*/2").unwrap(), "*/2");
        assert_eq!(classic_dow("MON-FRI").unwrap(), "MON-FRI");
        assert!(classic_dow("5-7").is_err());
        assert!(parse_cron("*/5 * * * *").is_ok());
        assert!(parse_cron("0 */5 * * * *").is_ok());
        assert!(parse_cron("61 * * * *").is_err());
    }

    #[test]
    fn a_full_file_parses() {
        let e = parse(
            r#"
            [[entry]]
            name = "a"
            task = "t.a"
            cron = "30 2 * * *"
            timezone = "Europe/Berlin"
            args = [1, "x"]
            kwargs = { k = 2 }
            queue = "q"
            priority = 3
            expires = 60
            catch_up = "skip"

            [[entry]]
            name = "b"
            task = "t.b"
            every = "5m"
            enabled = false
            "#,
        )
        .unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].args, vec![Value::from(1), Value::from("x")]);
        assert_eq!(e[0].kwargs["k"], Value::from(2));
        assert_eq!(e[0].timezone, chrono_tz::Europe::Berlin);
        assert_eq!(e[0].catch_up, CatchUp::Skip);
        assert_eq!(e[0].expires, Some(Duration::from_secs(60)));
        assert!(matches!(e[1].when, When::Every(d) if d == Duration::from_secs(300)));
        assert!(!e[1].enabled);
        assert_eq!(e[1].timezone, Tz::UTC);
        assert_eq!(e[1].catch_up, CatchUp::Once);
    }

    #[test]
    fn errors_name_the_entry_in_one_line() {
        let cases = [
            ("cron = \"99 * * * *\"", "bad cron expression"),
            ("every = \"5q\"", "bad `every"),
            (
                "every = \"5m\"\ntimezone = \"Mars/Olympus\"",
                "unknown timezone `Mars/Olympus`",
            ),
            ("", "needs `cron"),
            ("every = \"5m\"\ncron = \"* * * * *\"", "not both"),
            ("every = \"5m\"\ncatch_up = \"all\"", "`catch_up` must be"),
            ("every = \"5m\"\nargs = { a = 1 }", "`args` must be a list"),
        ];
        for (body, want) in cases {
            let text = format!("[[entry]]\nname = \"bad1\"\ntask = \"t\"\n{body}\n");
            let msg = parse(&text).unwrap_err().to_string();
            assert!(msg.contains("entry `bad1`") && msg.contains(want), "{msg}");
            assert!(!msg.contains('\n'), "{msg}");
        }
        let dup = "[[entry]]\nname = \"d\"\ntask = \"t\"\nevery = \"1s\"\n[[entry]]\nname = \"d\"\ntask = \"t\"\nevery = \"1s\"\n";
        assert!(parse(dup)
            .unwrap_err()
            .to_string()
            .contains("used by another"));
        let typo = parse("[[entry]]\nname = \"d\"\ntask = \"t\"\nevry = \"1s\"\n")
            .unwrap_err()
            .to_string();
        assert!(typo.contains("evry") && !typo.contains('\n'), "{typo}");
    }
}
