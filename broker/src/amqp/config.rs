//! What an `amqp://` / `amqps://` URL asks for: where to connect (as lapin's [`AMQPUri`]) and how to
//! declare task queues.
//!
//! The vhost follows kombu: `amqp://host//` and `amqp://host/` both mean vhost `/`, `amqp://host/%2f`
//! too, and `amqp://host/app` means `app`. Missing credentials default to `guest:guest`.
//! Query options: `max_priority` (declare queues with `x-max-priority`), `queue_type`
//! (`classic` | `quorum`), `delivery_limit` (quorum only: `x-delivery-limit`), `heartbeat` (seconds, default 60), `connect_timeout` (seconds, default 5),
//! `consumer_timeout` (seconds; asks RabbitMQ to allow a consumer's delivery that long unacked, see
//! [`AmqpConfig::consumer_args`]), and lapin's own `frame_max` (default here [`DEFAULT_FRAME_MAX`],
//! see there), `channel_max`, `auth_mechanism`, and `max_message_size`, `max_dead_letters`
//! ([`crate::limits`]). On `amqps://`, the TLS options of [`crate::tls`]:
//! `ssl_ca_certs` (added to the system's roots), `ssl_certfile` and `ssl_keyfile` (a client
//! certificate), `ssl_cert_reqs` (`required`/`optional` only: lapin cannot turn verification off).
//! kombu takes these as `broker_use_ssl` transport options, not in the URL; the names are the same
//! as its `ssl` dictionary's keys (`ca_certs`, `certfile`, `keyfile`, `cert_reqs`), with redis-py's
//! `ssl_` prefix, so one spelling serves both brokers.
//!
//! A failover list (`amqp://h1//?options;amqp://h2//`, kombu's spelling) gives one [`Node`] per URL:
//! each its own credentials, host, port and vhost; the options are the first URL's (a later URL may
//! repeat them exactly, or have none).

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::uri::{
    AMQPAuthority, AMQPQueryString, AMQPScheme, AMQPUri, AMQPUserInfo, SASLMechanism,
};

use crate::error::{BrokerError, Result};
use crate::limits::Limits;
use crate::tls::TlsOptions;
use crate::url::{percent_decode, BrokerUrl};

const KNOWN_OPTIONS: &[&str] = &[
    "max_priority",
    "queue_type",
    "delivery_limit",
    "heartbeat",
    "connect_timeout",
    "consumer_timeout",
    "frame_max",
    "channel_max",
    "auth_mechanism",
];

/// The largest AMQP frame we offer the server unless the URL sets `frame_max` (the lower of ours and
/// the server's wins). lapin keeps a zero-filled receive and a send buffer of 32 frames per
/// connection, so RabbitMQ's default of 128 KiB costs 8 MiB per connection (a worker process holds
/// several); 16 KiB costs 1 MiB. Task messages are far smaller than a frame, and a larger body is
/// split into more body frames, which changes nothing on the wire that a consumer sees.
pub(crate) const DEFAULT_FRAME_MAX: u32 = 16 * 1024;

/// What a *consuming* connection offers unless the URL sets `frame_max`: RabbitMQ's (and py-amqp's)
/// default. A message's header frame (properties and headers) is never split, and RabbitMQ sends it
/// whole whatever the consumer's `frame_max`; a Celery producer may publish headers up to 128 KiB,
/// and one over our 16 KiB used to make every consumer that took it lose its connection, get it
/// again, and never receive anything else. Costs ~7 MiB more per worker process (lapin's buffers).
pub(crate) const CONSUMER_FRAME_MAX: u32 = 128 * 1024;

/// Everything the transport needs from its URL.
#[derive(Debug, Clone)]
pub(crate) struct AmqpConfig {
    /// Where and how to connect: one node, or the nodes of a failover list in order.
    pub nodes: Vec<Node>,
    /// The node tried first by the next connection: the last one that answered. Shared by every
    /// connection of a broker handle (clones of this config share it), so after a failover the
    /// consumer, the publisher and the subscriptions all start from the node that works.
    pub cursor: Arc<AtomicUsize>,
    /// The URL (or list) with its passwords hidden.
    pub redacted: String,
    /// Bound on TCP connect + AMQP handshake.
    pub connect_timeout: Duration,
    /// Arguments every task queue is declared with (`x-max-priority`, `x-queue-type`).
    pub queue_args: FieldTable,
    /// Quorum queues refuse a channel-wide (global) prefetch.
    pub quorum: bool,
    /// Arguments of every task consumer (`basic.consume`): `x-consumer-timeout` (milliseconds) when
    /// the URL sets `consumer_timeout`. RabbitMQ ≥ 3.12 holds a consumer's deliveries that long
    /// before it closes the channel (default: the server's `consumer_timeout`, 30 min); older
    /// servers ignore the argument. A consumer argument, unlike the queue argument of the same name,
    /// leaves the queue's declaration as Celery makes it.
    pub consumer_args: FieldTable,
    /// The URL's TLS options (`amqps://` only; its `Debug` hides the key).
    pub tls: Option<TlsOptions>,
    /// `frame_max` for consuming connections ([`CONSUMER_FRAME_MAX`] unless the URL sets one).
    pub consumer_frame_max: u32,
    /// `max_message_size` and `max_dead_letters` ([`crate::limits`]).
    pub limits: Limits,
}

/// RabbitMQ's largest consumer timeout, in milliseconds (a signed 32-bit count).
const MAX_CONSUMER_TIMEOUT_MS: f64 = 2_147_483_647.0;

impl AmqpConfig {
    /// Reads and checks the URL.
    pub fn from_url(url: &BrokerUrl) -> Result<Self> {
        url.check_options(&[KNOWN_OPTIONS, crate::tls::OPTIONS, crate::limits::OPTIONS].concat())?;
        let limits = Limits::from_url(url)?;
        let invalid = |reason: String| BrokerError::InvalidUrl {
            url: url.redacted(),
            reason,
        };
        let tls = TlsOptions::from_url(url)?;
        crate::tls::lapin_config(tls.as_ref()).map_err(invalid)?;
        let heartbeat = url.option::<u16>("heartbeat")?.unwrap_or(60);
        let connect_secs = url.option::<f64>("connect_timeout")?.unwrap_or(5.0);
        if !(connect_secs.is_finite() && connect_secs > 0.0) {
            return Err(invalid(format!(
                "option `connect_timeout={connect_secs}`: must be a positive number of seconds"
            )));
        }
        let connect_timeout = Duration::from_secs_f64(connect_secs);
        let auth_mechanism = match url.option::<String>("auth_mechanism")? {
            None => None,
            Some(m) => Some(m.parse::<SASLMechanism>().map_err(invalid)?),
        };
        let frame_max: Option<u32> = url.option("frame_max")?;
        let query = AMQPQueryString {
            frame_max: Some(frame_max.unwrap_or(DEFAULT_FRAME_MAX)),
            channel_max: url.option("channel_max")?,
            heartbeat: Some(heartbeat),
            connection_timeout: Some(connect_timeout.as_millis().try_into().unwrap_or(u64::MAX)),
            auth_mechanism,
        };
        let mut nodes = vec![Node::from_url(url, query.clone())?];
        for alternate in &url.alternates {
            if alternate.has_options() && !alternate.same_options(url) {
                return Err(invalid(
                    "options go on the first URL of a failover list; a later URL repeats them exactly or has none".into(),
                ));
            }
            nodes.push(Node::from_url(alternate, query.clone())?);
        }

        let mut queue_args = FieldTable::default();
        if let Some(p) = url.option::<u8>("max_priority")? {
            queue_args.insert(
                ShortString::from("x-max-priority"),
                AMQPValue::LongInt(i32::from(p)),
            );
        }
        let quorum = match url.option::<String>("queue_type")?.as_deref() {
            None | Some("classic") => false,
            Some("quorum") => true,
            Some(other) => {
                return Err(invalid(format!(
                    "option `queue_type={other}`: expected `classic` or `quorum`"
                )))
            }
        };
        if quorum {
            queue_args.insert(
                ShortString::from("x-queue-type"),
                AMQPValue::LongString("quorum".into()),
            );
        }
        check_quorum_options(url, quorum).map_err(invalid)?;
        if let Some(limit) = url.option::<u32>("delivery_limit")? {
            let limit = i32::try_from(limit).map_err(|_| {
                invalid(format!(
                    "option `delivery_limit={limit}`: at most {}",
                    i32::MAX
                ))
            })?;
            // py-amqp sends a Python int of this size as a signed 32-bit value, and RabbitMQ
            // compares the type too when the queue is declared again.
            queue_args.insert(
                ShortString::from("x-delivery-limit"),
                AMQPValue::LongInt(limit),
            );
        }
        let mut consumer_args = FieldTable::default();
        if let Some(secs) = url.option::<f64>("consumer_timeout")? {
            let ms = (secs * 1000.0).round();
            if !(1.0..=MAX_CONSUMER_TIMEOUT_MS).contains(&ms) {
                return Err(invalid(format!(
                    "option `consumer_timeout={secs}`: must be seconds between 0.001 and 2147483 (about 24 days)"
                )));
            }
            // In range, so the cast is exact.
            let ms = ms as i64;
            consumer_args.insert(
                ShortString::from("x-consumer-timeout"),
                AMQPValue::LongLongInt(ms),
            );
        }
        Ok(AmqpConfig {
            nodes,
            cursor: Arc::default(),
            redacted: url.redacted(),
            connect_timeout,
            queue_args,
            quorum,
            consumer_args,
            tls,
            consumer_frame_max: frame_max.unwrap_or(CONSUMER_FRAME_MAX),
            limits,
        })
    }

    /// This configuration for a connection that receives what producers sent (a task consumer, a
    /// remote-control subscriber): it offers [`AmqpConfig::consumer_frame_max`], so a header frame
    /// of any size a Celery producer may send arrives instead of closing the connection.
    pub fn for_receiving(&self) -> AmqpConfig {
        let mut own = self.clone();
        for node in &mut own.nodes {
            node.uri.query.frame_max = Some(own.consumer_frame_max);
        }
        own
    }

    /// lapin's TLS settings: the URL's CA (added to the system roots) and client certificate.
    pub fn tls_config(&self) -> std::result::Result<OwnedTLSConfig, String> {
        crate::tls::lapin_config(self.tls.as_ref())
    }
}

/// The options quorum queues refuse or need: RabbitMQ refuses `x-max-priority` on a quorum queue
/// (406 at every declare), and `x-delivery-limit` exists only there.
fn check_quorum_options(url: &BrokerUrl, quorum: bool) -> std::result::Result<(), String> {
    let has = |name: &str| url.option::<String>(name).ok().flatten().is_some();
    if quorum && has("max_priority") {
        return Err(
            "`max_priority` with `queue_type=quorum`: RabbitMQ refuses `x-max-priority` on \
                    a quorum queue; use one queue per priority"
                .into(),
        );
    }
    if !quorum && has("delivery_limit") {
        return Err(
            "`delivery_limit` needs `queue_type=quorum` (`x-delivery-limit` is a quorum \
                    queue argument)"
                .into(),
        );
    }
    Ok(())
}

/// One RabbitMQ node to connect to.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    /// Where and how (credentials included: never log it, log `redacted`).
    pub uri: AMQPUri,
    /// This node's URL with its password hidden.
    pub redacted: String,
}

impl Node {
    /// The node one URL names (scheme, credentials, host, port, vhost), with the shared `query`.
    fn from_url(url: &BrokerUrl, query: AMQPQueryString) -> Result<Node> {
        let invalid = |reason: String| BrokerError::InvalidUrl {
            url: url.redacted(),
            reason,
        };
        let base = &url.base;
        let scheme = if url.tls {
            AMQPScheme::AMQPS
        } else {
            AMQPScheme::AMQP
        };
        let host = base
            .host_str()
            .filter(|h| !h.is_empty())
            .unwrap_or("localhost")
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = base.port().unwrap_or_else(|| scheme.default_port());
        let username = match base.username() {
            "" => "guest".to_owned(),
            u => decode_part("user name", u, false).map_err(invalid)?,
        };
        let password = match base.password() {
            None => "guest".to_owned(),
            Some(p) => decode_part("password", p, true).map_err(invalid)?,
        };
        let vhost = match base.path().strip_prefix('/').unwrap_or(base.path()) {
            "" => "/".to_owned(),
            v => decode_part("vhost", v, false).map_err(invalid)?,
        };
        Ok(Node {
            uri: AMQPUri {
                scheme,
                authority: AMQPAuthority {
                    userinfo: AMQPUserInfo { username, password },
                    host,
                    port,
                },
                vhost,
                query,
            },
            redacted: crate::url::redact(url.base.as_str()),
        })
    }
}

/// Decodes a percent-encoded part of the URL; an error names the part, and quotes it unless it is
/// the password.
fn decode_part(part: &str, value: &str, secret: bool) -> std::result::Result<String, String> {
    percent_decode(value).ok_or_else(|| {
        let what = if secret {
            format!("the {part}")
        } else {
            format!("the {part} `{value}`")
        };
        format!("{what} has a bad `%` escape or does not decode to UTF-8")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(raw: &str) -> Result<AmqpConfig> {
        AmqpConfig::from_url(&BrokerUrl::parse(raw)?)
    }

    #[test]
    fn vhost_follows_kombu() {
        assert_eq!(
            cfg("amqp://guest:guest@localhost:5672//").unwrap().nodes[0]
                .uri
                .vhost,
            "/"
        );
        assert_eq!(cfg("amqp://localhost/").unwrap().nodes[0].uri.vhost, "/");
        assert_eq!(cfg("amqp://localhost").unwrap().nodes[0].uri.vhost, "/");
        assert_eq!(cfg("amqp://localhost/%2f").unwrap().nodes[0].uri.vhost, "/");
        assert_eq!(
            cfg("amqp://localhost/app").unwrap().nodes[0].uri.vhost,
            "app"
        );
    }

    #[test]
    fn frame_max_defaults_small_and_the_url_overrides_it() {
        assert_eq!(
            cfg("amqp://localhost//").unwrap().nodes[0]
                .uri
                .query
                .frame_max,
            Some(DEFAULT_FRAME_MAX)
        );
        assert_eq!(
            cfg("amqp://localhost//?frame_max=131072").unwrap().nodes[0]
                .uri
                .query
                .frame_max,
            Some(131_072)
        );
        assert_eq!(
            cfg("amqp://localhost//").unwrap().consumer_frame_max,
            CONSUMER_FRAME_MAX
        );
        assert_eq!(
            cfg("amqp://localhost//?frame_max=8192")
                .unwrap()
                .consumer_frame_max,
            8192
        );
    }

    #[test]
    fn authority_and_defaults() {
        let c = cfg("amqps://us%40r:p%3Ass@10.0.0.1/v").unwrap();
        assert_eq!(c.nodes[0].uri.scheme, AMQPScheme::AMQPS);
        assert_eq!(c.nodes[0].uri.authority.port, 5671);
        assert_eq!(c.nodes[0].uri.authority.host, "10.0.0.1");
        assert_eq!(c.nodes[0].uri.authority.userinfo.username, "us@r");
        assert_eq!(c.nodes[0].uri.authority.userinfo.password, "p:ss");
        assert_eq!(c.nodes[0].uri.query.heartbeat, Some(60));
        assert_eq!(c.connect_timeout, Duration::from_secs(5));
        assert!(!c.redacted.contains("p%3Ass"));
        let d = cfg("amqp://[::1]:5673").unwrap();
        assert_eq!(d.nodes[0].uri.authority.host, "::1");
        assert_eq!(d.nodes[0].uri.authority.userinfo.username, "guest");
    }

    #[test]
    fn options() {
        let c = cfg("amqp://h//?max_priority=10&heartbeat=0&connect_timeout=0.5").unwrap();
        assert!(!c.quorum);
        assert_eq!(
            c.queue_args.inner().get("x-max-priority"),
            Some(&AMQPValue::LongInt(10))
        );
        assert_eq!(c.nodes[0].uri.query.heartbeat, Some(0));
        assert_eq!(c.connect_timeout, Duration::from_millis(500));
        assert!(cfg("amqp://h//?queue_type=stream").is_err());
        assert!(cfg("amqp://h//?max_priority=300").is_err());
        assert!(cfg("amqp://h//?typo=1").is_err());
        assert!(cfg("amqp://h//?connect_timeout=0").is_err());
        assert!(cfg("amqp://h/%zz").is_err());
        // TLS options: only on amqps://, and verification cannot be turned off.
        assert!(cfg("amqp://h//?ssl_cert_reqs=required").is_err());
        assert!(cfg("amqps://h//?ssl_cert_reqs=required")
            .unwrap()
            .tls
            .is_some());
        assert!(cfg("amqps://h//?ssl_cert_reqs=none").is_err());
        assert!(cfg("amqps://h//?ssl_ca_certs=/nonexistent/ca.pem").is_err());
    }

    #[test]
    fn quorum_options_follow_rabbitmq() {
        let c = cfg("amqp://h//?queue_type=quorum&delivery_limit=5").unwrap();
        assert!(c.quorum);
        assert!(c.queue_args.contains_key("x-queue-type"));
        assert_eq!(
            c.queue_args.inner().get("x-delivery-limit"),
            Some(&AMQPValue::LongInt(5))
        );
        assert!(!cfg("amqp://h//?queue_type=quorum")
            .unwrap()
            .queue_args
            .contains_key("x-delivery-limit"));
        // RabbitMQ refuses x-max-priority on a quorum queue; x-delivery-limit is quorum-only.
        assert!(cfg("amqp://h//?queue_type=quorum&max_priority=10").is_err());
        assert!(cfg("amqp://h//?delivery_limit=5").is_err());
        assert!(cfg("amqp://h//?queue_type=quorum&delivery_limit=-1").is_err());
        assert!(cfg("amqp://h//?queue_type=quorum&delivery_limit=3000000000").is_err());
    }

    #[test]
    fn a_failover_list_gives_one_node_per_url_with_the_first_urls_options() {
        let c = cfg("amqp://u:Zq9x@h1:5701//?heartbeat=7;amqp://v:Zq9y@h2:5702/app").unwrap();
        assert_eq!(c.nodes.len(), 2);
        assert_eq!(c.nodes[1].uri.authority.host, "h2");
        assert_eq!(c.nodes[1].uri.authority.port, 5702);
        assert_eq!(c.nodes[1].uri.authority.userinfo.username, "v");
        assert_eq!(c.nodes[1].uri.vhost, "app");
        assert_eq!(c.nodes[1].uri.query.heartbeat, Some(7));
        assert!(!c.redacted.contains("Zq9") && c.redacted.contains("h2:5702"));
        assert!(c.nodes.iter().all(|n| !n.redacted.contains("Zq9")));
        let r = c.for_receiving();
        assert!(r
            .nodes
            .iter()
            .all(|n| n.uri.query.frame_max == Some(CONSUMER_FRAME_MAX)));
        // Options repeated exactly on a later URL are fine; other ones are an error.
        assert!(cfg("amqp://h1//?heartbeat=7;amqp://h2//?heartbeat=7").is_ok());
        assert!(cfg("amqp://h1//?heartbeat=7;amqp://h2//?heartbeat=8").is_err());
    }

    #[test]
    fn consumer_timeout_becomes_a_consumer_argument_in_milliseconds() {
        let c = cfg("amqp://h//?consumer_timeout=7200").unwrap();
        assert_eq!(
            c.consumer_args.inner().get("x-consumer-timeout"),
            Some(&AMQPValue::LongLongInt(7_200_000))
        );
        // The queue's own arguments stay as Celery declares them.
        assert!(!c.queue_args.contains_key("x-consumer-timeout"));
        assert!(cfg("amqp://h//").unwrap().consumer_args.inner().is_empty());
        for bad in ["0", "-1", "nan", "inf", "3000000", "soon"] {
            assert!(
                cfg(&format!("amqp://h//?consumer_timeout={bad}")).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_password_that_does_not_decode_is_an_error_that_does_not_show_it() {
        for raw in [
            "amqp://user:Zq9x%zz@h//",
            "amqp://user:Zq9x%FF@h//",
            "amqp://user:Zq9x%@h//",
        ] {
            let e = cfg(raw).unwrap_err().to_string();
            assert!(e.contains("password") && !e.contains("Zq9x"), "{raw}: {e}");
        }
        for raw in crate::url::tests::hostile_urls() {
            match cfg(&raw) {
                Ok(c) => {
                    assert!(!c.redacted.contains("Zq9x"), "{raw:?}");
                    for node in &c.nodes {
                        assert!(!node.redacted.contains("Zq9x"), "{raw:?}");
                    }
                    let debug = format!("{:?}", c.redacted);
                    assert!(!debug.contains("Zq9x"), "{raw:?}");
                }
                Err(e) => assert!(!e.to_string().contains("Zq9x"), "{raw:?}: {e}"),
            }
        }
    }
}
