//! The Lua scripts of the transport, one file each under `scripts/` (each starts with a header saying
//! its KEYS, ARGV and return value), compiled once per process.

use std::sync::LazyLock;

use redis::Script;

/// Pops a batch and records it as unacked, atomically (`scripts/fetch.lua`).
pub(crate) static FETCH: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/fetch.lua")));

/// Compare-and-swap move of an unacked message back to lists (`scripts/restore.lua`).
pub(crate) static RESTORE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/restore.lua")));

/// Acks or renews a delivery if it is still ours (`scripts/settle.lua`).
pub(crate) static SETTLE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/settle.lua")));

/// Drops an index entry that has no record (`scripts/forget_orphan.lua`).
pub(crate) static FORGET_ORPHAN: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/forget_orphan.lua")));

/// Releases `unacked_mutex` if we hold it (`scripts/unlock.lua`).
pub(crate) static UNLOCK: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/unlock.lua")));

/// Moves an unacked message into the schedule of messages not due yet (`scripts/park.lua`).
pub(crate) static PARK: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/park.lua")));

/// Moves due parked messages back to their queues (`scripts/forward.lua`).
pub(crate) static FORWARD: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/forward.lua")));

/// Acks many deliveries, each if it is still ours (`scripts/settle_many.lua`).
pub(crate) static SETTLE_MANY: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/settle_many.lua")));
