//! Broker and backend URLs: which transport, where, and with which options.
//!
//! Forms: `memory://[name]`, `redis://[:password@]host[:port][/db]`, `rediss://…` (TLS),
//! `amqp://user:pass@host[:port][/vhost]`, `amqps://…` (TLS). Options go in the query string
//! (`redis://localhost/0?global_keyprefix=app1:&visibility_timeout=600`); an option a transport does
//! not know is an error, so a typo does not silently do nothing.
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

/// A parsed broker or backend URL.
#[derive(Debug, Clone)]
pub struct BrokerUrl {
    /// The URL as given (may hold a password: print [`BrokerUrl::redacted`] instead).
    pub raw: String,
    pub scheme: Scheme,
    /// `rediss://` or `amqps://`.
    pub tls: bool,
    /// The parsed URL with the query string removed.
    pub base: url::Url,
    options: Vec<(String, String)>,
}

impl BrokerUrl {
    /// Parses and classifies a URL.
    pub fn parse(raw: &str) -> Result<Self> {
        let invalid = |reason: String| BrokerError::InvalidUrl {
            url: redact(raw),
            reason,
        };
        let mut base = url::Url::parse(raw).map_err(|e| invalid(e.to_string()))?;
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
        })
    }

    /// The URL with any password replaced by `***`, for logs and error messages.
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

/// Replaces the password of a URL with `***`.
pub fn redact(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(_) => raw.to_owned(),
        Err(_) => raw.split('@').next_back().unwrap_or(raw).to_owned(),
    }
}

#[cfg(test)]
mod tests {
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
    fn redacts_passwords() {
        let r = redact("amqp://guest:secret@localhost:5672/");
        assert!(!r.contains("secret") && r.contains("***"));
        assert_eq!(redact("redis://localhost/0"), "redis://localhost/0");
    }
}
