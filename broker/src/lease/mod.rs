//! Leader leases on the broker: at most one holder at a time, each holding proven by a token and
//! a fencing epoch, plus a fenced "last run" record a holder claims before acting. Beat uses it for
//! its one-active-scheduler rule; anything else that needs a single leader per broker may too.
//!
//! - [`redis`] (feature `redis`): [`redis::RedisLease`], a fenced lease (`SET NX PX` + an `INCR`
//!   epoch, renew/release only by the holder) and a last-run hash whose writes are fenced by that
//!   lease, all in Lua scripts under `lease/scripts/`.
//! - [`amqp`] (feature `amqp`): [`amqp::AmqpLease`], a single-active-consumer queue holding one token
//!   message (holding the unacked token is leadership; the holder hands it back and gets it again
//!   every minute so RabbitMQ's `consumer_timeout` never fires on it), with a second queue mirroring
//!   the holder's last-run map for the next leader.
//!
//! Both hand out a [`Lease`]; [`Recorded`] is what claiming a run found.

#[cfg(feature = "amqp")]
pub mod amqp;
#[cfg(feature = "redis")]
pub mod redis;

/// A held leader lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// This holder's token (Redis: the lock key's random value; AMQP: the lock queue's name).
    pub token: String,
    /// The fencing epoch taken at acquisition; higher than every earlier holder's (AMQP: the token
    /// delivery that made this holder leader, on its channel; refreshes of the token keep it).
    pub epoch: i64,
}

/// What claiming a run (an entry's tick) under a lease found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// Ours now: go ahead.
    Fresh,
    /// This tick (or a later one) was already recorded: do not act.
    AlreadySent,
    /// We no longer hold the lease: do not act, stand by.
    NotLeader,
}
