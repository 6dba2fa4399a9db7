//! Broker and backend URLs: which transport, where, and with which options.
//!
//! Forms: `memory://[name]`, `redis://[:password@]host[:port][/db]`, `rediss://…` (TLS),
//! `amqp://user:pass@host[:port][/vhost]`, `amqps://…` (TLS). Options go in the query string
//! (`redis://localhost/0?global_keyprefix=app1:&visibility_timeout=600`); an option a transport does
//! not know is an error, so a typo does not silently do nothing. The TLS options of `rediss://` and
//! `amqps://` (CA file, client certificate) are read by [`crate::tls`]. A `/`, `?`, `#` or `@` in a
//! password must be percent-encoded (`%2F`, `%3F`, `%23`, `%40`); an `@` after the host is an error.
//!
//! kombu's failover list, `amqp://u:p@h1//;amqp://u:p@h2//` (URLs joined by `;`), parses into the
//! first URL with the others as [`BrokerUrl::alternates`]; only the AMQP transport takes one.
//!
//! A URL may hold a password: every error and log line shows it through [`redact`]
//! (`amqp://user:****@host//`), which hides the password also in a URL that does not parse.
//!
//! A leaf: it parses and classifies only. Opening the transport or backend a URL names is
//! [`crate::connect`]'s job, so the transports can read their options from here without a cycle.

use std::str::FromStr;

use crate::error::{BrokerError, Result};

/// The kind of transport a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Memory,
    Redis,
    Amqp,
}

/// A parsed broker or backend URL. Its `Debug` shows the URL redacted.
#[derive(Clone)]
pub struct BrokerUrl {
    /// The URL as given (may hold a password: print [`BrokerUrl::redacted`] instead).
    pub raw: String,
    pub scheme: Scheme,
    /// `rediss://` or `amqps://`.
    pub tls: bool,
    /// The parsed URL with the query string removed.
    pub base: url::Url,
    options: Vec<(String, String)>,
    /// The other URLs of a failover list (`url1;url2;…`), in order; empty for one URL. Each is
    /// parsed on its own; its `raw` is that URL alone.
    pub alternates: Vec<BrokerUrl>,
}

impl std::fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerUrl")
            .field("url", &self.redacted())
            .field("scheme", &self.scheme)
            .field("tls", &self.tls)
            .field("alternates", &self.alternates.len())
            .finish_non_exhaustive()
    }
}

impl BrokerUrl {
    /// Parses and classifies a URL, or a failover list of URLs of one scheme (see [`split_list`]).
    pub fn parse(raw: &str) -> Result<Self> {
        let parts = split_list(raw);
        let Some((first, rest)) = parts.split_first() else {
            return Self::parse_one(raw);
        };
        let mut url = Self::parse_one(first)?;
        for part in rest {
            let alternate = Self::parse_one(part)?;
            if (alternate.scheme, alternate.tls) != (url.scheme, url.tls) {
                return Err(BrokerError::InvalidUrl {
                    url: redact(raw),
                    reason: "every URL of a failover list (`;`) must use the same scheme".into(),
                });
            }
            url.alternates.push(alternate);
        }
        url.raw = raw.to_owned();
        Ok(url)
    }

    /// Fails if this is a failover list: for transports that connect to one server only.
    pub fn reject_list(&self) -> Result<()> {
        if self.alternates.is_empty() {
            return Ok(());
        }
        Err(BrokerError::InvalidUrl {
            url: self.redacted(),
            reason: "a failover list of URLs (`url1;url2`) is supported for amqp:// only".into(),
        })
    }

    /// True if the URL has a query string.
    pub(crate) fn has_options(&self) -> bool {
        !self.options.is_empty()
    }

    /// True if `other` was given the same query options (in the same order).
    pub(crate) fn same_options(&self, other: &BrokerUrl) -> bool {
        self.options == other.options
    }

    fn parse_one(raw: &str) -> Result<Self> {
        let invalid = |reason: String| BrokerError::InvalidUrl {
            url: redact(raw),
            reason,
        };
        let mut base = url::Url::parse(raw).map_err(|e| invalid(e.to_string()))?;
        // `amqp://user:12/x@host` parses as host `user`, port 12, path `/x@host`: a password holding
        // `/`, `?` or `#`, written unescaped. Connecting there would fail obscurely, and the password
        // would show wherever the path or query is quoted.
        let after_host = [Some(base.path()), base.query(), base.fragment()];
        if after_host
            .into_iter()
            .flatten()
            .any(|part| part.contains('@'))
        {
            return Err(invalid(
                "`@` after the host: write a `/`, `?`, `#` or `@` in a password or anywhere \
                 else as %2F, %3F, %23 or %40"
                    .into(),
            ));
        }
        let (scheme, tls) = match base.scheme() {
            "memory" => (Scheme::Memory, false),
            "redis" | "redis+socket" | "unix" => (Scheme::Redis, false),
            "rediss" => (Scheme::Redis, true),
            "amqp" | "pyamqp" => (Scheme::Amqp, false),
            "amqps" => (Scheme::Amqp, true),
            other => return Err(BrokerError::UnsupportedScheme(other.to_owned())),
        };
        let options = base
            .query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        base.set_query(None);
        Ok(BrokerUrl {
            raw: raw.to_owned(),
            scheme,
            tls,
            base,
            options,
            alternates: Vec::new(),
        })
    }

    /// The URL with any password replaced by `****`, for logs and error messages (see [`redact`]).
    pub fn redacted(&self) -> String {
        redact(&self.raw)
    }

    /// Reads option `name`, parsed as `T`. A value that does not parse is an error naming the option.
    pub fn option<T: FromStr>(&self, name: &str) -> Result<Option<T>>
    where
        T::Err: std::fmt::Display,
    {
        match self.options.iter().rev().find(|(k, _)| k == name) {
            None => Ok(None),
            Some((_, v)) => v
                .parse::<T>()
                .map(Some)
                .map_err(|e| BrokerError::InvalidUrl {
                    url: self.redacted(),
                    reason: format!("option `{name}={v}`: {e}"),
                }),
        }
    }

    /// Fails if the query string holds an option not in `known`.
    pub fn check_options(&self, known: &[&str]) -> Result<()> {
        match self
            .options
            .iter()
            .find(|(k, _)| !known.contains(&k.as_str()))
        {
            None => Ok(()),
            Some((k, _)) => Err(BrokerError::InvalidUrl {
                url: self.redacted(),
                reason: format!("unknown option `{k}` (known: {})", known.join(", ")),
            }),
        }
    }
}

/// Splits kombu's failover list `amqp://h1//;amqp://h2//` into its URLs. A `;` splits only where a
/// `scheme://` follows it, so a `;` inside a password does not (kombu splits on every `;`: a list
/// that works there works here).
pub fn split_list(raw: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    for (i, _) in raw.match_indices(';') {
        let next = &raw[i + 1..];
        let starts_url = next
            .split_once("://")
            .is_some_and(|(scheme, _)| is_scheme(scheme));
        if starts_url {
            parts.push(&raw[start..i]);
            start = i + 1;
        }
    }
    parts.push(&raw[start..]);
    parts
}

/// True if `s` can be a URL scheme (`amqp`, `redis+socket`).
fn is_scheme(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
}

/// What stands for a hidden password.
const MASK: &str = "****";

/// Hides the password of a URL (`amqp://user:****@host/…`), for logs and error messages.
///
/// Works on the text as written, without parsing it as a URL, so a URL that does not parse (a
/// password with an unescaped `/`, `?`, `#` or `@`, a bad `%` escape) is hidden as well: everything
/// between the first `:` and the last `@` of what follows the scheme is the password. A `host:port`
/// whose port is not a number (`amqp://user:secret`, the host forgotten) is hidden too, and so are
/// the values of `pass` and `password` query options. Each URL of a failover list is hidden on its
/// own.
pub fn redact(raw: &str) -> String {
    let parts = split_list(raw);
    if parts.len() > 1 {
        return parts
            .into_iter()
            .map(redact_one)
            .collect::<Vec<_>>()
            .join(";");
    }
    redact_one(raw)
}

fn redact_one(raw: &str) -> String {
    let (scheme, rest) = match raw.split_once("://") {
        Some((scheme, rest)) if is_scheme(scheme) => (format!("{scheme}://"), rest),
        _ => (String::new(), raw),
    };
    if let Some(at) = rest.rfind('@') {
        let (userinfo, tail) = (&rest[..at], &rest[at + 1..]);
        let user = match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:{MASK}"),
            None => userinfo.to_owned(),
        };
        return format!("{scheme}{user}@{}", redact_query(tail));
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let port = match authority.strip_prefix('[') {
        Some(v6) => v6.split_once(']').map_or("", |(_, after)| after),
        None => authority.find(':').map_or("", |i| &authority[i..]),
    };
    let port_ok = port.is_empty()
        || port
            .strip_prefix(':')
            .is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit()));
    if port_ok {
        format!("{scheme}{authority}{}", redact_query(tail))
    } else {
        let host = &authority[..authority.len() - port.len()];
        format!("{scheme}{host}:{MASK}")
    }
}

/// Hides the values of `pass` and `password` in the query string of `tail` (a URL's path and on).
fn redact_query(tail: &str) -> String {
    let Some((path, query)) = tail.split_once('?') else {
        return tail.to_owned();
    };
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((k, _))
                if k.eq_ignore_ascii_case("pass") || k.eq_ignore_ascii_case("password") =>
            {
                format!("{k}={MASK}")
            }
            _ => pair.to_owned(),
        })
        .collect();
    format!("{path}?{}", pairs.join("&"))
}

/// Decodes the `%XX` escapes of a URL part (user, password, vhost). `None` if an escape is not two
/// hex digits or the bytes are not UTF-8; the caller words the error, and must not quote a password.
pub fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn classifies_schemes() {
        assert_eq!(
            BrokerUrl::parse("memory://").unwrap().scheme,
            Scheme::Memory
        );
        let r = BrokerUrl::parse("rediss://:pw@h:6380/2?visibility_timeout=5").unwrap();
        assert!(r.tls && r.scheme == Scheme::Redis);
        assert_eq!(r.option::<u64>("visibility_timeout").unwrap(), Some(5));
        assert!(r.base.query().is_none());
        assert_eq!(
            BrokerUrl::parse("amqp://guest:guest@localhost:5672//")
                .unwrap()
                .scheme,
            Scheme::Amqp
        );
        assert!(matches!(
            BrokerUrl::parse("sqs://x"),
            Err(BrokerError::UnsupportedScheme(_))
        ));
        assert!(matches!(
            BrokerUrl::parse("not a url"),
            Err(BrokerError::InvalidUrl { .. })
        ));
    }

    #[test]
    fn options_are_checked_and_typed() {
        let u = BrokerUrl::parse("redis://h/0?visibility_timeout=abc&typo=1").unwrap();
        assert!(u.option::<u64>("visibility_timeout").is_err());
        assert!(u.check_options(&["visibility_timeout"]).is_err());
        assert!(u.check_options(&["visibility_timeout", "typo"]).is_ok());
    }

    #[test]
    fn failover_lists_parse_and_redact_url_by_url() {
        let raw = "amqp://u:Zq9x1@h1:5701//?heartbeat=5;amqp://u:Zq9x2@h2:5702//;amqps://x@h3";
        assert_eq!(split_list(raw).len(), 3);
        assert!(matches!(
            BrokerUrl::parse(raw),
            Err(BrokerError::InvalidUrl { .. })
        ));
        let raw = "amqp://u:Zq9x1@h1:5701//?heartbeat=5;amqp://u:Zq9x2@h2:5702//";
        let u = BrokerUrl::parse(raw).unwrap();
        assert_eq!(u.base.host_str(), Some("h1"));
        assert_eq!(u.option::<u16>("heartbeat").unwrap(), Some(5));
        assert_eq!(u.alternates.len(), 1);
        assert_eq!(u.alternates[0].base.port(), Some(5702));
        assert!(u.reject_list().is_err());
        assert_eq!(
            u.redacted(),
            "amqp://u:****@h1:5701//?heartbeat=5;amqp://u:****@h2:5702//"
        );
        assert!(!format!("{u:?}").contains("Zq9x"));
        // A `;` inside a password does not split.
        assert_eq!(split_list("amqp://u:a;b@h//").len(), 1);
        assert_eq!(redact("amqp://u:Zq9x;x@h//"), "amqp://u:****@h//");
        assert!(BrokerUrl::parse("amqp://h//")
            .unwrap()
            .reject_list()
            .is_ok());
        assert!(BrokerUrl::parse("redis://h/0;amqp://h//").is_err());
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("amqp://guest:secret@localhost:5672/"),
            "amqp://guest:****@localhost:5672/"
        );
        assert_eq!(redact("redis://:pw@h:6379/0"), "redis://:****@h:6379/0");
        assert_eq!(redact("redis://localhost/0"), "redis://localhost/0");
        assert_eq!(redact("amqp://[::1]:5673//"), "amqp://[::1]:5673//");
        assert_eq!(redact("redis://h/0?a=b@c"), "redis://h/0?a=b@c");
        assert_eq!(
            redact("redis://h/0?pass=pw&db=1"),
            "redis://h/0?pass=****&db=1"
        );
    }

    /// Passwords that break URL syntax or percent-decoding, each holding the marker `Zq9x`: where
    /// the URL is parsed, rejected or printed, the marker must never show.
    pub(crate) const HOSTILE_PASSWORDS: &[&str] = &[
        "Zq9x",
        "Zq9x%zz",
        "Zq9x%",
        "Zq9x%F",
        "Zq9x%FF%FE",
        "%C3Zq9x",
        "Zq9x/Zq9x",
        "Zq9x#Zq9x",
        "Zq9x?Zq9x",
        "Zq9x@Zq9x",
        "Zq9x:Zq9x",
        "12?Zq9x",
        "12#Zq9x",
        "12/Zq9x",
        "Zq9x Zq9x",
        "Zq9x\nZq9x",
        "Zq9x\\Zq9x",
        "Zq9x[Zq9x]",
        "Zq9x%2FZq9x",
        "Zq9x://Zq9x",
        "ünïcödé-Zq9x",
    ];

    /// Every URL form a hostile password can be written into.
    pub(crate) fn hostile_urls() -> Vec<String> {
        let mut urls = Vec::new();
        for pw in HOSTILE_PASSWORDS {
            urls.push(format!("amqp://user:{pw}@localhost:5672//"));
            urls.push(format!("amqps://user:{pw}@localhost/vhost?heartbeat=5"));
            urls.push(format!("redis://:{pw}@127.0.0.1:6379/0"));
            urls.push(format!("rediss://default:{pw}@h/1?visibility_timeout=5"));
            urls.push(format!("redis://user:{pw}@"));
            urls.push(format!("amqp://user:{pw}@h1//;amqp://user:{pw}@h2:5702//"));
            urls.push(format!("user:{pw}@localhost"));
            // The host forgotten: unless a password holding `@` names a host, or one starting with
            // digits a port, it does not parse.
            if !pw.contains('@') && !pw.starts_with(|c: char| c.is_ascii_digit()) {
                urls.push(format!("amqp://user:{pw}"));
            }
        }
        urls
    }

    #[test]
    fn hostile_passwords_never_show() {
        for raw in hostile_urls() {
            let r = redact(&raw);
            assert!(!r.contains("Zq9x"), "{raw:?} redacted as {r:?}");
            match BrokerUrl::parse(&raw) {
                Ok(u) => {
                    assert!(!u.redacted().contains("Zq9x"), "{raw:?}");
                    assert!(!format!("{u:?}").contains("Zq9x"), "{raw:?}: {u:?}");
                    let e = u.option::<u8>("heartbeat").err().map(|e| e.to_string());
                    assert!(!e.unwrap_or_default().contains("Zq9x"), "{raw:?}");
                }
                Err(e) => assert!(!e.to_string().contains("Zq9x"), "{raw:?}: {e}"),
            }
        }
    }
}
