//! A Redis Sentinel set of the test's own ([`SentinelSet`]): a master, two replicas and three
//! sentinels, on 127.0.0.1 in the ports a suite gives it (each free port of the range in turn), in
//! temporary directories; each process is SIGKILLed by its pid and its directory removed on drop,
//! also when the test panics. The sentinels mark a master down after 1 s.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::process::ChildGuard;

/// The name the sentinels monitor the master under.
pub const MASTER_NAME: &str = "celerity-test";

/// One `redis-server` (plain or `--sentinel`) of the test's own.
pub struct Node {
    pub port: u16,
    child: Option<ChildGuard>,
    dir: PathBuf,
}

impl Node {
    /// Starts `redis-server` with `args` (after `config`, written to a file in the node's
    /// directory, if given).
    fn start(port: u16, config: Option<&str>, args: &[&str]) -> Node {
        let dir =
            std::env::temp_dir().join(format!("celerity-sentinel-{port}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the node's directory");
        let mut cmd = Command::new("redis-server");
        if let Some(text) = config {
            let file = dir.join("sentinel.conf");
            std::fs::write(&file, text).expect("write the sentinel's config");
            cmd.arg(&file);
        }
        cmd.args(args)
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        Node {
            port,
            child: Some(ChildGuard::spawn(&mut cmd, "redis-server")),
            dir,
        }
    }

    /// SIGKILLs the node (by its pid) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The first `n` ports of `range` nobody listens on.
fn free_ports(range: std::ops::Range<u16>, n: usize) -> Option<Vec<u16>> {
    let ports: Vec<u16> = range
        .filter(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .take(n)
        .collect();
    (ports.len() == n).then_some(ports)
}

/// A master, its two replicas and three sentinels watching them.
pub struct SentinelSet {
    pub master: Node,
    pub replicas: Vec<Node>,
    pub sentinels: Vec<Node>,
}

impl SentinelSet {
    /// Starts the set, Redis on free ports of `redis_ports`, sentinels on `sentinel_ports`, and
    /// waits (at most 30 s) until the replicas are in sync and every sentinel knows both replicas
    /// and its two peers. `None` if `redis-server` is not installed; panics if the set does not
    /// come up.
    pub async fn start(
        redis_ports: std::ops::Range<u16>,
        sentinel_ports: std::ops::Range<u16>,
    ) -> Option<SentinelSet> {
        Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .ok()?;
        let redis = free_ports(redis_ports, 3).expect("3 free private Redis ports");
        let plain = ["--save", "", "--appendonly", "no"];
        let master = Node::start(redis[0], None, &plain);
        let master_port = master.port.to_string();
        let replicas = redis[1..]
            .iter()
            .map(|port| {
                let args = [&plain[..], &["--replicaof", "127.0.0.1", &master_port]].concat();
                Node::start(*port, None, &args)
            })
            .collect();
        let sentinels = free_ports(sentinel_ports, 3)
            .expect("3 free private sentinel ports")
            .into_iter()
            .map(|port| {
                let config = format!(
                    "sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n\
                     sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                     sentinel failover-timeout {MASTER_NAME} 5000\n\
                     sentinel parallel-syncs {MASTER_NAME} 1\n"
                );
                Node::start(port, Some(&config), &["--sentinel"])
            })
            .collect();
        let set = SentinelSet {
            master,
            replicas,
            sentinels,
        };
        let until = Instant::now() + Duration::from_secs(30);
        while !set.ready().await {
            assert!(Instant::now() < until, "the sentinel set did not come up");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Some(set)
    }

    async fn ready(&self) -> bool {
        for r in &self.replicas {
            let info = query::<String>(r.port, redis::cmd("INFO").arg("replication")).await;
            if !info.is_ok_and(|i| i.contains("master_link_status:up")) {
                return false;
            }
        }
        for s in &self.sentinels {
            let sentinel = |what: &str| {
                let mut cmd = redis::cmd("SENTINEL");
                cmd.arg(what).arg(MASTER_NAME);
                cmd
            };
            let replicas = query::<Vec<redis::Value>>(s.port, &mut sentinel("REPLICAS")).await;
            let peers = query::<Vec<redis::Value>>(s.port, &mut sentinel("SENTINELS")).await;
            match (replicas, peers) {
                (Ok(r), Ok(p)) if r.len() >= 2 && p.len() >= 2 => {}
                _ => return false,
            }
        }
        true
    }

    /// The set's URL: every sentinel, database 0, `extra` options (`&name=value…`).
    pub fn url(&self, extra: &str) -> String {
        let nodes: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("sentinel://127.0.0.1:{}", s.port))
            .collect();
        format!("{}/0?master_name={MASTER_NAME}{extra}", nodes.join(";"))
    }

    /// The master's port the first sentinel that answers names now (`GET-MASTER-ADDR-BY-NAME`,
    /// which names the promoted replica as soon as it is promoted).
    pub async fn named_master(&self) -> Option<u16> {
        for s in &self.sentinels {
            let mut cmd = redis::cmd("SENTINEL");
            cmd.arg("GET-MASTER-ADDR-BY-NAME").arg(MASTER_NAME);
            if let Ok(addr) = query::<Vec<String>>(s.port, &mut cmd).await {
                return addr.get(1).and_then(|p| p.parse().ok());
            }
        }
        None
    }

    /// True once every sentinel has switched to a master other than `old` and none has a failover
    /// in progress (`SENTINEL MASTERS`, what clients look the master up with, changes only then).
    async fn switched(&self, old: u16) -> bool {
        for s in &self.sentinels {
            let mut cmd = redis::cmd("SENTINEL");
            cmd.arg("MASTER").arg(MASTER_NAME);
            let Ok(master) =
                query::<std::collections::HashMap<String, String>>(s.port, &mut cmd).await
            else {
                return false;
            };
            let port = master.get("port").and_then(|p| p.parse::<u16>().ok());
            let flags = master.get("flags").map_or("", String::as_str);
            if port.is_none() || port == Some(old) || flags.contains("failover") {
                return false;
            }
        }
        true
    }

    /// Waits (at most 30 s) until the sentinels have switched to a master other than `old`; its
    /// port.
    pub async fn wait_failover(&self, old: u16) -> u16 {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            if self.switched(old).await {
                if let Some(port) = self.named_master().await {
                    return port;
                }
            }
            assert!(Instant::now() < until, "the sentinels did not fail over");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Asks the sentinels for a failover while the master is up (`SENTINEL FAILOVER`): the old
    /// master is turned into a replica of the new one.
    pub async fn force_failover(&self) -> redis::RedisResult<()> {
        let mut cmd = redis::cmd("SENTINEL");
        cmd.arg("FAILOVER").arg(MASTER_NAME);
        query::<()>(self.sentinels[0].port, &mut cmd).await
    }
}

/// One command to the node on `port`, bounded in time.
pub async fn query<T: redis::FromRedisValue>(
    port: u16,
    cmd: &mut redis::Cmd,
) -> redis::RedisResult<T> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(2)));
    let mut c = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    cmd.query_async(&mut c).await
}
