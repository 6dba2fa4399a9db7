//! Who is talking: host name, node names (`gen<pid>@<host>` for producers) and the process oid that
//! Celery uses as `reply_to`.

use std::sync::OnceLock;

use uuid::Uuid;

/// This machine's host name (from the kernel, then `$HOSTNAME`, else `localhost`).
pub fn hostname() -> &'static str {
    static HOST: OnceLock<String> = OnceLock::new();
    HOST.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
            .unwrap_or_else(|| "localhost".to_owned())
    })
}

/// The node name of a producer that is not a worker: `gen<pid>@<host>`, as Celery names it.
pub fn producer_nodename() -> &'static str {
    static NAME: OnceLock<String> = OnceLock::new();
    NAME.get_or_init(|| format!("gen{}@{}", std::process::id(), hostname()))
}

/// A stable per-process id (UUID v3, like kombu's `oid_from`), sent as `reply_to`.
pub fn process_oid() -> &'static str {
    static OID: OnceLock<String> = OnceLock::new();
    OID.get_or_init(|| {
        let seed = format!(
            "{:x}-{:x}-{}",
            std::process::id(),
            Uuid::new_v4().as_u128(),
            hostname()
        );
        Uuid::new_v3(&Uuid::NAMESPACE_OID, seed.as_bytes()).to_string()
    })
}

/// A fresh task id (lowercase hyphenated UUID v4).
pub fn new_task_id() -> String {
    Uuid::new_v4().to_string()
}
