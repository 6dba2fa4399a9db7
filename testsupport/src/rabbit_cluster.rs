//! A RabbitMQ cluster of the test's own ([`RabbitCluster`], usually three nodes; one is a lone node): node names
//! `celerity-<tag><i>@localhost`, AMQP ports and Erlang distribution ports the test chooses (from its
//! private range), listeners on one address (127.0.0.1, or a test network's own address), data and
//! logs in a temporary directory, a cookie of its own, and no plugins.
//!
//! The nodes register with the machine's running `epmd`, as [`crate::PrivateRabbit`] does; they read
//! none of the machine's RabbitMQ configuration (`RABBITMQ_CONF_ENV_FILE`, the config, advanced config
//! and plugin files all point into the cluster's directory), so the machine's own node is never
//! touched. Nodes 2 and 3 join node 1 with `rabbitmqctl join_cluster`. Each node runs in a process
//! group of its own: [`RabbitCluster::kill_node`] SIGKILLs one (a crashed machine), and dropping the
//! cluster SIGKILLs every node still running and removes the directory, also when the test panics.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
const CTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";
/// Bound on one node's boot.
const BOOT: Duration = Duration::from_secs(60);
/// Bound on one `rabbitmqctl` call.
const CTL_TIMEOUT: &str = "60";

/// Where one node listens.
#[derive(Debug, Clone, Copy)]
pub struct NodePorts {
    pub amqp: u16,
    pub dist: u16,
}

/// A running cluster; killed and removed on drop.
#[derive(Debug)]
pub struct RabbitCluster {
    dir: PathBuf,
    bind: String,
    tag: String,
    ports: Vec<NodePorts>,
    /// `rabbitmqctl`'s own distribution ports (`RABBITMQ_CTL_DIST_PORT_MIN`/`MAX`).
    ctl_ports: (u16, u16),
    children: Vec<Option<Child>>,
    /// How long start-up and clustering took.
    pub started_in: Duration,
}

impl RabbitCluster {
    /// Starts one node per entry of `ports`, listening on `bind`, and joins them; `rabbitmqctl` uses
    /// distribution ports `ctl_ports`. Returns why not if RabbitMQ is not installed or a step failed
    /// (whatever was started is stopped again).
    pub async fn start(
        bind: &str,
        tag: &str,
        ports: &[NodePorts],
        ctl_ports: (u16, u16),
    ) -> Result<RabbitCluster, String> {
        if !Path::new(SERVER).exists() {
            return Err(format!("{SERVER} is not installed"));
        }
        let began = Instant::now();
        let dir = std::env::temp_dir().join(format!(
            "celerity-rabbit-cluster-{tag}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let mut cluster = RabbitCluster {
            dir,
            bind: bind.to_owned(),
            tag: tag.to_owned(),
            ports: ports.to_vec(),
            ctl_ports,
            children: Vec::new(),
            started_in: Duration::ZERO,
        };
        cluster.write_files()?;
        let count = ports.len();
        for i in 0..count {
            let child = cluster.spawn(i)?;
            cluster.children.push(Some(child));
        }
        for i in 0..count {
            cluster.wait_amqp(i).await?;
        }
        let first = cluster.node_name(0);
        for i in 1..count {
            let node = cluster.node_name(i);
            cluster.ctl(&["-n", &node, "stop_app"])?;
            cluster.ctl(&["-n", &node, "join_cluster", &first])?;
            cluster.ctl(&["-n", &node, "start_app"])?;
            cluster.wait_amqp(i).await?;
        }
        cluster.started_in = began.elapsed();
        Ok(cluster)
    }

    fn write_files(&self) -> Result<(), String> {
        let home = self.dir.join("home");
        std::fs::create_dir_all(&home).map_err(|e| format!("create {home:?}: {e}"))?;
        let cookie = home.join(".erlang.cookie");
        let write = |path: PathBuf, text: String| {
            std::fs::write(&path, text).map_err(|e| format!("write {path:?}: {e}"))
        };
        write(
            cookie.clone(),
            format!("CELERITY{}", uuid::Uuid::new_v4().simple()),
        )?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cookie, std::fs::Permissions::from_mode(0o400))
            .map_err(|e| format!("chmod the cookie: {e}"))?;
        write(self.dir.join("env.conf"), String::new())?;
        write(self.dir.join("enabled_plugins"), "[].\n".into())?;
        for (i, p) in self.ports.iter().enumerate() {
            let node = self.dir.join(format!("n{i}"));
            std::fs::create_dir_all(&node).map_err(|e| format!("create {node:?}: {e}"))?;
            // `loopback_users = none`: guest may connect from a test network's address too.
            write(
                node.join("rabbitmq.conf"),
                format!(
                    "listeners.tcp.local = {}:{}\nloopback_users = none\n",
                    self.bind, p.amqp
                ),
            )?;
            write(node.join("advanced.config"), "[].\n".into())?;
        }
        Ok(())
    }

    /// The environment every node and `rabbitmqctl` call shares: the cookie's HOME, and none of the
    /// machine's RabbitMQ settings.
    fn base_command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("HOME", self.dir.join("home"))
            .env("RABBITMQ_CONF_ENV_FILE", self.dir.join("env.conf"))
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                self.dir.join("enabled_plugins"),
            )
            .env("RABBITMQ_CTL_DIST_PORT_MIN", self.ctl_ports.0.to_string())
            .env("RABBITMQ_CTL_DIST_PORT_MAX", self.ctl_ports.1.to_string())
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env_remove("RABBITMQ_NODENAME")
            .stdin(Stdio::null());
        cmd
    }

    fn spawn(&self, i: usize) -> Result<Child, String> {
        let node = self.dir.join(format!("n{i}"));
        let log = std::fs::File::create(node.join("stdout.log"))
            .map_err(|e| format!("create the node's log: {e}"))?;
        let mut cmd = self.base_command(SERVER);
        cmd.env("RABBITMQ_NODENAME", self.node_name(i))
            .env("RABBITMQ_NODE_PORT", self.ports[i].amqp.to_string())
            .env("RABBITMQ_NODE_IP_ADDRESS", &self.bind)
            .env("RABBITMQ_DIST_PORT", self.ports[i].dist.to_string())
            .env("RABBITMQ_BASE", &node)
            .env("RABBITMQ_MNESIA_BASE", node.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", node.join("log"))
            .env("RABBITMQ_CONFIG_FILE", node.join("rabbitmq.conf"))
            .env(
                "RABBITMQ_ADVANCED_CONFIG_FILE",
                node.join("advanced.config"),
            )
            .env("RABBITMQ_PID_FILE", node.join("pid"))
            .current_dir(&node)
            .stdout(log)
            .stderr(Stdio::null());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd.spawn().map_err(|e| format!("start {SERVER}: {e}"))
    }

    /// Waits until node `i` accepts an AMQP connection.
    async fn wait_amqp(&self, i: usize) -> Result<(), String> {
        let (began, url) = (Instant::now(), self.node_url(i));
        while began.elapsed() < BOOT {
            let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default());
            if let Ok(Ok(c)) = tokio::time::timeout(Duration::from_secs(2), conn).await {
                let _ = c.close(200, "OK".into()).await;
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(format!(
            "node {} did not accept AMQP connections within {BOOT:?} (log in {:?})",
            self.node_name(i),
            self.dir
        ))
    }

    /// Runs `rabbitmqctl args` (bounded); its standard output, or why it failed.
    pub fn ctl(&self, args: &[&str]) -> Result<String, String> {
        let mut cmd = self.base_command("timeout");
        cmd.arg(CTL_TIMEOUT).arg(CTL).args(args);
        let out = cmd
            .output()
            .map_err(|e| format!("run rabbitmqctl {args:?}: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "rabbitmqctl {args:?}: {} {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// `celerity-<tag><i>@localhost`.
    pub fn node_name(&self, i: usize) -> String {
        format!("celerity-{}{}@localhost", self.tag, i + 1)
    }

    /// Node `i`'s URL (`amqp://guest:guest@<bind>:<port>/%2f`).
    pub fn node_url(&self, i: usize) -> String {
        format!(
            "amqp://guest:guest@{}:{}/%2f",
            self.bind, self.ports[i].amqp
        )
    }

    /// kombu's failover list of every node, with `query` (`?queue_type=quorum`) on the first.
    pub fn failover_url(&self, query: &str) -> String {
        let mut urls: Vec<String> = (0..self.ports.len()).map(|i| self.node_url(i)).collect();
        if let Some(first) = urls.first_mut() {
            first.push_str(query);
        }
        urls.join(";")
    }

    /// The index of the node leading quorum queue `queue`, asked of a running node.
    pub fn leader_of(&self, queue: &str) -> Result<usize, String> {
        let ask = (0..self.children.len())
            .find(|i| self.children[*i].is_some())
            .ok_or("no node is running")?;
        let out = self.ctl(&[
            "-n",
            &self.node_name(ask),
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "leader",
        ])?;
        let leader = out
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .find(|(name, _)| name.trim() == queue)
            .map(|(_, leader)| leader.trim().to_owned())
            .ok_or_else(|| format!("queue {queue} not listed: {out}"))?;
        (0..self.ports.len())
            .find(|i| self.node_name(*i) == leader)
            .ok_or_else(|| format!("leader {leader} is not one of ours"))
    }

    /// SIGKILLs node `i`'s process group (a crash: no goodbye to clients or peers).
    pub fn kill_node(&mut self, i: usize) {
        let Some(mut child) = self.children.get_mut(i).and_then(Option::take) else {
            return;
        };
        if let Ok(pgid) = i32::try_from(child.id()) {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{pgid}")])
                .status();
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.kill_node(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
