//! Broker and backend URLs: which transport, where, and with which options.
//!
//! Forms: `memory://[name]`, `redis://[:password@]host[:port][/db]`, `rediss://…` (TLS),
//! `redis+cluster://[:password@]host:port[,host:port…][/]` (a Redis Cluster: the seed nodes, comma
//! separated; classified as [`Scheme::Redis`] with [`BrokerUrl::cluster_nodes`] set),
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
//! Redis Sentinel is kombu's form: `sentinel://h1:26379;sentinel://h2:26379/0?master_name=mymaster`,
//! one `sentinel://` per sentinel joined by `;`, the master's password and database in any (the
//! first that gives them), the options once (see [`SENTINEL_OPTIONS`]). It parses as a
//! [`Scheme::Redis`] URL whose [`BrokerUrl::sentinels`] is not empty.
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
    /// `db+postgresql://`, `postgresql://`, `postgres://`: a result backend only.
    Postgres,
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
    /// The sentinels (host, port) of a `sentinel://` URL, in the order given; empty otherwise. Then
    /// `base` is `redis://[user:password@]<first sentinel>/<db>`: the master's credentials and
    /// database, at an address only a placeholder until the sentinels name the master.
    pub sentinels: Vec<(String, u16)>,
    /// `redis+cluster://`: every seed node (`host:port`) as written; empty for any other URL.
    /// `base` then names the first one.
    cluster_nodes: Vec<String>,
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
        if raw.starts_with(SENTINEL_PREFIX) {
            return parse_sentinel(raw);
        }
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
        let (first_node, cluster_nodes) = split_cluster_nodes(raw).map_err(invalid)?;
        let parsed = first_node.as_deref().unwrap_or(raw);
        let mut base = url::Url::parse(parsed).map_err(|e| invalid(e.to_string()))?;
        check_no_at_after_host(&base).map_err(invalid)?;
        let (scheme, tls) = match base.scheme() {
            "memory" => (Scheme::Memory, false),
            "redis" | "redis+socket" | "unix" | CLUSTER_SCHEME => (Scheme::Redis, false),
            "rediss" => (Scheme::Redis, true),
            "amqp" | "pyamqp" => (Scheme::Amqp, false),
            "amqps" => (Scheme::Amqp, true),
            "db+postgresql" | "postgresql" | "postgres" => (Scheme::Postgres, false),
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
            sentinels: Vec::new(),
            cluster_nodes,
            alternates: Vec::new(),
        })
    }

    /// The seed nodes (`host:port`) of a `redis+cluster://` URL; empty for any other URL.
    pub fn cluster_nodes(&self) -> &[String] {
        &self.cluster_nodes
    }

    /// True for a `redis+cluster://` URL.
    pub fn is_cluster(&self) -> bool {
        !self.cluster_nodes.is_empty()
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

    /// Fails if the query string holds an option not in `known` (nor, on a `sentinel://` URL, in
    /// [`SENTINEL_OPTIONS`]).
    pub fn check_options(&self, known: &[&str]) -> Result<()> {
        let sentinel = |k: &str| !self.sentinels.is_empty() && SENTINEL_OPTIONS.contains(&k);
        match self
            .options
            .iter()
            .find(|(k, _)| !known.contains(&k.as_str()) && !sentinel(k))
        {
            None => Ok(()),
            Some((k, _)) => Err(BrokerError::InvalidUrl {
                url: self.redacted(),
                reason: format!("unknown option `{k}` (known: {})", known.join(", ")),
            }),
        }
    }
}

/// `amqp://user:12/x@host` parses as host `user`, port 12, path `/x@host`: a password holding `/`,
/// `?` or `#`, written unescaped. Connecting there would fail obscurely, and the password would show
/// wherever the path or query is quoted.
fn check_no_at_after_host(base: &url::Url) -> std::result::Result<(), String> {
    let after_host = [Some(base.path()), base.query(), base.fragment()];
    if after_host
        .into_iter()
        .flatten()
        .any(|part| part.contains('@'))
    {
        return Err(
            "`@` after the host: write a `/`, `?`, `#` or `@` in a password or anywhere \
             else as %2F, %3F, %23 or %40"
                .into(),
        );
    }
    Ok(())
}

/// How a Redis Sentinel URL starts (kombu's and Celery's spelling).
const SENTINEL_PREFIX: &str = "sentinel://";
/// A sentinel's port when the URL gives none.
const SENTINEL_DEFAULT_PORT: u16 = 26379;
/// The options of a `sentinel://` URL, beside the Redis transport's own: `master_name` (required:
/// the name the sentinels monitor the master under), and `sentinel_username` / `sentinel_password`
/// for sentinels that require a password (kombu's `sentinel_kwargs={'password': …}`). The master's
/// own password is the URL's (`sentinel://:password@host:26379`), as in kombu.
pub const SENTINEL_OPTIONS: &[&str] = &["master_name", "sentinel_username", "sentinel_password"];

/// Parses kombu's `sentinel://h1:26379;sentinel://h2:26379/0?master_name=…` (see the module doc).
fn parse_sentinel(raw: &str) -> Result<BrokerUrl> {
    let invalid = |reason: String| BrokerError::InvalidUrl {
        url: redact(raw),
        reason,
    };
    let mut sentinels = Vec::new();
    let mut options = Vec::new();
    let mut userinfo: Option<(String, Option<String>)> = None;
    let mut db: Option<String> = None;
    for chunk in raw.split(';') {
        if !chunk.starts_with(SENTINEL_PREFIX) {
            return Err(invalid(
                "each sentinel must be written `sentinel://host[:port]`, joined by `;` \
                 (a `;` in a password must be written %3B)"
                    .into(),
            ));
        }
        let one = url::Url::parse(chunk).map_err(|e| invalid(e.to_string()))?;
        check_no_at_after_host(&one).map_err(invalid)?;
        let host = match one.host_str() {
            Some(h) if !h.is_empty() => h.to_owned(),
            _ => return Err(invalid("a sentinel without a host".into())),
        };
        sentinels.push((host, one.port().unwrap_or(SENTINEL_DEFAULT_PORT)));
        options.extend(
            one.query_pairs()
                .map(|(k, v)| (k.into_owned(), v.into_owned())),
        );
        let given = (one.username().to_owned(), one.password().map(str::to_owned));
        if !given.0.is_empty() || given.1.is_some() {
            match &userinfo {
                None => userinfo = Some(given),
                Some(first) if *first == given => {}
                Some(_) => return Err(invalid("the sentinels give different passwords".into())),
            }
        }
        let path = one.path().trim_matches('/');
        if !path.is_empty() {
            match &db {
                None => db = Some(path.to_owned()),
                Some(first) if first == path => {}
                Some(_) => return Err(invalid("the sentinels give different databases".into())),
            }
        }
    }
    let Some((host, port)) = sentinels.first() else {
        return Err(invalid("no sentinel".into()));
    };
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.clone()
    };
    let mut base = url::Url::parse(&format!("redis://{host}:{port}/{}", db.unwrap_or_default()))
        .map_err(|e| invalid(e.to_string()))?;
    if let Some((user, password)) = userinfo {
        let refused = || invalid("the master's user or password cannot be set".into());
        base.set_username(&user).map_err(|()| refused())?;
        base.set_password(password.as_deref())
            .map_err(|()| refused())?;
    }
    let url = BrokerUrl {
        raw: raw.to_owned(),
        scheme: Scheme::Redis,
        tls: false,
        base,
        options,
        sentinels,
        cluster_nodes: Vec::new(),
        alternates: Vec::new(),
    };
    match url.option::<String>("master_name")? {
        Some(name) if !name.is_empty() => Ok(url),
        _ => Err(invalid(
            "a sentinel:// URL needs `master_name` (the name the sentinels monitor the master \
             under), e.g. `?master_name=mymaster`"
                .into(),
        )),
    }
}

/// The scheme of a Redis Cluster URL.
pub const CLUSTER_SCHEME: &str = "redis+cluster";

/// For a `redis+cluster://` URL: the URL rewritten to name its first node only (so it parses as
/// one URL, with the user info, path and query kept), and every node's `host:port`. `(None, [])`
/// for any other URL. The error names no password.
fn split_cluster_nodes(raw: &str) -> std::result::Result<(Option<String>, Vec<String>), String> {
    let Some(rest) = raw
        .strip_prefix(CLUSTER_SCHEME)
        .and_then(|r| r.strip_prefix("://"))
    else {
        return Ok((None, Vec::new()));
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (userinfo, hosts) = match authority.rfind('@') {
        Some(at) => (&authority[..=at], &authority[at + 1..]),
        None => ("", authority),
    };
    let nodes: Vec<String> = hosts.split(',').map(str::to_owned).collect();
    let well_formed = |n: &String| {
        n.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        })
    };
    // The node is not quoted: with a password holding `/`, `?` or `#` it would be part of it.
    if !nodes.iter().all(well_formed) {
        return Err(
            "every cluster node must be `host:port` (write the nodes as h1:7000,h2:7001; \
                    a `/`, `?`, `#` or `@` in a password as %2F, %3F, %23 or %40)"
                .into(),
        );
    }
    let first = format!("{CLUSTER_SCHEME}://{userinfo}{}{tail}", nodes[0]);
    Ok((Some(first), nodes))
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
/// the values of `pass` and `…password` query options (`sentinel_password`). Each URL of a failover list is hidden on its
/// own.
pub fn redact(raw: &str) -> String {
    if raw.starts_with(SENTINEL_PREFIX) {
        return redact_sentinels(raw);
    }
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
            .is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit()))
        || (scheme.starts_with(CLUSTER_SCHEME) && is_node_list(authority));
    if port_ok {
        format!("{scheme}{authority}{}", redact_query(tail))
    } else {
        let host = &authority[..authority.len() - port.len()];
        format!("{scheme}{host}:{MASK}")
    }
}

/// Redacts a `sentinel://…;sentinel://…` URL sentinel by sentinel. A password may hold `;` (and then
/// `sentinel://`), so a part is not trusted to start a sentinel: the whole text between a part's
/// `sentinel://` and its last `@` is hidden, user name included, and a part that does not start
/// with `sentinel://` (the tail of a password cut at a `;`) is hidden whole.
fn redact_sentinels(raw: &str) -> String {
    let parts: Vec<String> = raw
        .split(';')
        .map(|part| match part.strip_prefix(SENTINEL_PREFIX) {
            None => MASK.to_owned(),
            Some(rest) => {
                // The query first: a password option's value may hold an `@`.
                let rest = redact_query(rest);
                match rest.rfind('@') {
                    Some(at) => format!("{SENTINEL_PREFIX}{MASK}@{}", &rest[at + 1..]),
                    None => {
                        redact(&format!("redis://{rest}")).replacen("redis://", SENTINEL_PREFIX, 1)
                    }
                }
            }
        })
        .collect();
    parts.join(";")
}

/// Hides the values of `pass` and any `…password` option in the query string of `tail` (a URL's path and on).
/// True for `host:port[,host:port…]` with numeric ports (a cluster URL's node list).
fn is_node_list(authority: &str) -> bool {
    authority.split(',').all(|node| {
        node.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit())
        })
    })
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
                if k.eq_ignore_ascii_case("pass")
                    || k.to_ascii_lowercase().ends_with("password") =>
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
    fn cluster_urls_list_their_nodes() {
        let u =
            BrokerUrl::parse("redis+cluster://:pw@h1:7000,h2:7001/?visibility_timeout=5").unwrap();
        assert_eq!(u.scheme, Scheme::Redis);
        assert!(u.is_cluster());
        assert_eq!(u.cluster_nodes(), ["h1:7000", "h2:7001"]);
        assert_eq!(u.base.host_str(), Some("h1"));
        assert_eq!(u.base.password(), Some("pw"));
        assert_eq!(u.option::<u64>("visibility_timeout").unwrap(), Some(5));
        assert_eq!(
            u.redacted(),
            "redis+cluster://:****@h1:7000,h2:7001/?visibility_timeout=5"
        );
        assert_eq!(
            redact("redis+cluster://127.0.0.1:7000,127.0.0.1:7001"),
            "redis+cluster://127.0.0.1:7000,127.0.0.1:7001"
        );
        assert!(!BrokerUrl::parse("redis://h/0").unwrap().is_cluster());
        for bad in [
            "redis+cluster://h1,h2:7001",
            "redis+cluster://h1:7000,",
            "redis+cluster://:0",
        ] {
            assert!(
                matches!(BrokerUrl::parse(bad), Err(BrokerError::InvalidUrl { .. })),
                "{bad}"
            );
        }
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

    #[test]
    fn sentinel_urls_parse_as_kombu_writes_them() {
        let u = BrokerUrl::parse(
            "sentinel://:pw@h1:26379;sentinel://h2/0;sentinel://[::1]:26381/0?master_name=mymaster&visibility_timeout=5",
        )
        .unwrap();
        assert_eq!(u.scheme, Scheme::Redis);
        assert!(!u.tls);
        assert_eq!(
            u.sentinels,
            vec![
                ("h1".to_owned(), 26379),
                ("h2".to_owned(), 26379),
                ("[::1]".to_owned(), 26381)
            ]
        );
        assert_eq!(u.base.as_str(), "redis://:pw@h1:26379/0");
        assert_eq!(
            u.option::<String>("master_name").unwrap().unwrap(),
            "mymaster"
        );
        assert_eq!(u.option::<u64>("visibility_timeout").unwrap(), Some(5));
        assert!(u.check_options(&["visibility_timeout"]).is_ok());
        assert!(
            u.check_options(&[]).is_err(),
            "visibility_timeout is not a sentinel option"
        );
        assert_eq!(
            u.redacted(),
            "sentinel://****@h1:26379;sentinel://h2/0;sentinel://[::1]:26381/0?master_name=mymaster&visibility_timeout=5"
        );
        // Sentinel options are refused on a plain redis:// URL.
        let plain = BrokerUrl::parse("redis://h/0?master_name=m").unwrap();
        assert!(plain.check_options(&["visibility_timeout"]).is_err());
        for bad in [
            "sentinel://h1:26379",
            "sentinel://h1?master_name=",
            "sentinel://h1;redis://h2?master_name=m",
            "sentinel://h1/1;sentinel://h2/2?master_name=m",
            "sentinel://:a@h1;sentinel://:b@h2?master_name=m",
            "sentinel://?master_name=m",
        ] {
            assert!(
                matches!(BrokerUrl::parse(bad), Err(BrokerError::InvalidUrl { .. })),
                "{bad}"
            );
        }
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
            urls.push(format!(
                "sentinel://:{pw}@h1:26379;sentinel://h2:26380/1?master_name=m&sentinel_password={pw}"
            ));
            urls.push(format!(
                "sentinel://h1;sentinel://u:{pw}@h2/0?master_name=m"
            ));
            urls.push(format!("redis+cluster://:{pw}@h1:7000,h2:7001/?x=1"));
            // The host forgotten: unless a password holding `@` names a host, or one starting with
            // digits a port, it does not parse.
            if !pw.contains('@') && !pw.starts_with(|c: char| c.is_ascii_digit()) {
                urls.push(format!("amqp://user:{pw}"));
                urls.push(format!("sentinel://:{pw};sentinel://h2?master_name=m"));
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
