//! Size bounds every transport shares, read from the broker URL: the largest message body it will
//! publish or hand to a worker as a job (`max_message_size`, bytes, default [`DEFAULT_MAX_MESSAGE_SIZE`]),
//! and how many messages a dead-letter queue or list keeps (`max_dead_letters`, default
//! [`DEFAULT_MAX_DEAD_LETTERS`]; the newest are kept, the oldest dropped).
//!
//! A leaf: the transports read it from their URL; the worker asks its broker for it
//! ([`crate::Broker::limits`]).

use crate::error::{BrokerError, Result};
use crate::message::Message;
use crate::url::BrokerUrl;

/// The URL options read here; every transport accepts them.
pub const OPTIONS: &[&str] = &["max_message_size", "max_dead_letters"];

/// 16 MiB.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 16 * 1024 * 1024;
/// Dead letters kept per dead-letter queue unless the URL says otherwise.
pub const DEFAULT_MAX_DEAD_LETTERS: u32 = 10_000;
/// The largest `max_message_size` accepted: 1 GiB (RabbitMQ's own ceiling is 512 MiB; Redis
/// strings stop at 512 MiB too).
const MAX_MESSAGE_SIZE_CEILING: usize = 1024 * 1024 * 1024;
/// RabbitMQ's `x-max-length` is a signed 32-bit count.
const MAX_DEAD_LETTERS_CEILING: u32 = i32::MAX as u32;

/// The bounds a broker applies (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest body published or accepted as a job, in bytes.
    pub max_message_size: usize,
    /// Messages a dead-letter queue keeps (the newest).
    pub max_dead_letters: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            max_dead_letters: DEFAULT_MAX_DEAD_LETTERS,
        }
    }
}

/// A body over the limit, for the publisher's error and the worker's dead-letter reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("message body of {size} bytes is over the limit of {limit} bytes (max_message_size)")]
pub struct TooLarge {
    pub size: usize,
    pub limit: usize,
}

impl Limits {
    /// Reads `max_message_size` and `max_dead_letters` from `url` (the caller checks for unknown
    /// options). Zero, a negative number, a fraction or a value over the ceiling is an error.
    pub fn from_url(url: &BrokerUrl) -> Result<Self> {
        let invalid = |reason: String| BrokerError::InvalidUrl {
            url: url.redacted(),
            reason,
        };
        let mut limits = Limits::default();
        if let Some(size) = url.option::<usize>("max_message_size")? {
            if !(1..=MAX_MESSAGE_SIZE_CEILING).contains(&size) {
                return Err(invalid(format!(
                    "option `max_message_size={size}`: must be a number of bytes from 1 to {MAX_MESSAGE_SIZE_CEILING}"
                )));
            }
            limits.max_message_size = size;
        }
        if let Some(kept) = url.option::<u32>("max_dead_letters")? {
            if !(1..=MAX_DEAD_LETTERS_CEILING).contains(&kept) {
                return Err(invalid(format!(
                    "option `max_dead_letters={kept}`: must be a count from 1 to {MAX_DEAD_LETTERS_CEILING}"
                )));
            }
            limits.max_dead_letters = kept;
        }
        Ok(limits)
    }

    /// `Err` if `message`'s body is over `max_message_size`.
    pub fn check(&self, message: &Message) -> std::result::Result<(), TooLarge> {
        let size = message.body.len();
        if size > self.max_message_size {
            Err(TooLarge {
                size,
                limit: self.max_message_size,
            })
        } else {
            Ok(())
        }
    }

    /// Refuses to publish a message over the limit to `queue` (nothing is sent).
    pub fn check_publish(&self, queue: &str, message: &Message) -> Result<()> {
        self.check(message).map_err(|e| BrokerError::TooLarge {
            queue: queue.to_owned(),
            size: e.size,
            limit: e.limit,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(raw: &str) -> Result<Limits> {
        Limits::from_url(&BrokerUrl::parse(raw)?)
    }

    #[test]
    fn defaults_and_options() {
        assert_eq!(limits("memory://").unwrap(), Limits::default());
        let l = limits("redis://h/0?max_message_size=1024&max_dead_letters=5").unwrap();
        assert_eq!(l.max_message_size, 1024);
        assert_eq!(l.max_dead_letters, 5);
        for bad in [
            "max_message_size=0",
            "max_message_size=-1",
            "max_message_size=1.5",
            "max_message_size=big",
            "max_message_size=99999999999",
            "max_dead_letters=0",
            "max_dead_letters=-3",
            "max_dead_letters=3000000000",
        ] {
            let e = limits(&format!("amqp://h//?{bad}"))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(bad.split('=').next().unwrap_or_default()),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn check_names_the_size_and_the_limit() {
        let l = Limits {
            max_message_size: 10,
            ..Limits::default()
        };
        let mut m = Message {
            body: vec![b'x'; 10],
            ..Message::default()
        };
        assert!(l.check(&m).is_ok());
        m.body.push(b'x');
        let e = l.check_publish("q", &m).unwrap_err().to_string();
        assert!(e.contains("11 bytes") && e.contains("10 bytes"), "{e}");
    }
}
