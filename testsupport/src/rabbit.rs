//! A RabbitMQ node of the test's own ([`PrivateRabbit`]): its own node name, AMQP and distribution
//! ports on 127.0.0.1, data and logs in a temporary directory, and settings a test chooses (for
//! example a consumer timeout of a few seconds) that must not touch the shared RabbitMQ.
//!
//! It registers with the machine's running `epmd` (started by the shared node) and uses the
//! installed `/usr/lib/rabbitmq/bin/rabbitmq-server`. It is started in a process group of its own
//! and that group is SIGKILLed when the guard drops, also when the test panics.
//! [`PrivateRabbit::restart`] crashes the node the same way and boots it again on the same port
//! and data (a broker restart under a running worker). [`PrivateRabbit::start_tls`] adds an
//! `amqps://` listener presenting a [`TestPki`] certificate.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::tls::{free_port, TestPki};

/// Where Debian/Ubuntu's package puts the server script.
const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
/// Bound on the node's boot (about 3 s on an idle machine).
const BOOT: Duration = Duration::from_secs(60);

/// A private RabbitMQ node; killed and its directory removed on drop.
#[derive(Debug)]
pub struct PrivateRabbit {
    /// The server script while the node runs.
    child: Option<Child>,
    port: u16,
    /// The Erlang distribution port.
    dist: u16,
    /// The `amqps://` listener's port, if started with [`PrivateRabbit::start_tls`].
    tls_port: Option<u16>,
    dir: PathBuf,
}

impl PrivateRabbit {
    /// Starts a node whose `rabbit` application environment also holds `rabbit_env` (Erlang terms
    /// without the brackets, e.g. `{consumer_timeout, 2000}, {channel_tick_interval, 500}`); `None`
    /// if RabbitMQ is not installed here or the node did not come up within a minute.
    pub async fn start(rabbit_env: &str) -> Option<PrivateRabbit> {
        Self::create(rabbit_env, None).await
    }

    /// As [`PrivateRabbit::start`], plus an `amqps://` listener on 127.0.0.1 presenting the PKI's
    /// `server.pem` (valid for `127.0.0.1` only); with `require_client_cert` it refuses clients
    /// without a certificate signed by the test CA.
    pub async fn start_tls(pki: &TestPki, require_client_cert: bool) -> Option<PrivateRabbit> {
        Self::create("", Some((pki, require_client_cert))).await
    }

    async fn create(rabbit_env: &str, tls: Option<(&TestPki, bool)>) -> Option<PrivateRabbit> {
        if !std::path::Path::new(SERVER).exists() {
            return None;
        }
        let (port, dist) = (free_port()?, free_port()?);
        let tls_port = match tls {
            Some(_) => Some(free_port()?),
            None => None,
        };
        let dir =
            std::env::temp_dir().join(format!("celerity-rabbit-{port}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let mut conf = format!("listeners.tcp.local = 127.0.0.1:{port}\nloopback_users = none\n");
        if let (Some((pki, require)), Some(tls_port)) = (tls, tls_port) {
            conf.push_str(&format!(
                "listeners.ssl.local = 127.0.0.1:{tls_port}\n\
                 ssl_options.cacertfile = {}\n\
                 ssl_options.certfile = {}\n\
                 ssl_options.keyfile = {}\n\
                 ssl_options.verify = verify_peer\n\
                 ssl_options.fail_if_no_peer_cert = {require}\n",
                pki.file("ca.pem"),
                pki.file("server.pem"),
                pki.file("server.key"),
            ));
        }
        let advanced = format!("[{{rabbit, [{rabbit_env}]}}].\n");
        let written = std::fs::write(dir.join("rabbitmq.conf"), conf).is_ok()
            && std::fs::write(dir.join("advanced.config"), advanced).is_ok()
            && std::fs::write(dir.join("enabled_plugins"), "[].\n").is_ok();
        if !written {
            let _ = std::fs::remove_dir_all(&dir);
            return None;
        }
        let mut node = PrivateRabbit {
            child: None,
            port,
            dist,
            tls_port,
            dir,
        };
        if node.boot().await {
            Some(node)
        } else {
            None
        }
    }

    /// Starts the server on the node's directory and port; true once it accepts an AMQP
    /// connection (within [`BOOT`]).
    async fn boot(&mut self) -> bool {
        let dir = &self.dir;
        let mut cmd = Command::new(SERVER);
        // HOME holds the Erlang cookie the node creates: keep it in our directory.
        cmd.env("HOME", dir)
            .env(
                "RABBITMQ_NODENAME",
                format!("celerity-test-{}@localhost", self.port),
            )
            .env("RABBITMQ_DIST_PORT", self.dist.to_string())
            .env("RABBITMQ_BASE", dir)
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", dir.join("pid"))
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let Ok(child) = cmd.spawn() else {
            return false;
        };
        self.child = Some(child);
        let (began, url) = (Instant::now(), self.url());
        while began.elapsed() < BOOT {
            let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default());
            if let Ok(Ok(c)) = tokio::time::timeout(Duration::from_secs(2), conn).await {
                let _ = c.close(200, "OK".into()).await;
                return true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        false
    }

    /// Kills the node (SIGKILL to its process group: a crash, not a clean stop), waits `down_for`,
    /// and starts it again on the same port and data directory, so durable queues and the
    /// persistent messages they held come back; true once it accepts connections again.
    pub async fn restart(&mut self, down_for: Duration) -> bool {
        self.kill();
        tokio::time::sleep(down_for).await;
        self.boot().await
    }

    /// SIGKILLs the node's process group and reaps the server script.
    fn kill(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // The server script runs the Erlang VM as a child in the same group: end the whole group.
        if let Ok(pgid) = i32::try_from(child.id()) {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{pgid}")])
                .status();
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f` (lapin's and our spelling of vhost `/`).
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// The `amqps://` listener's port (a node started with [`PrivateRabbit::start_tls`]).
    pub fn tls_port(&self) -> Option<u16> {
        self.tls_port
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
