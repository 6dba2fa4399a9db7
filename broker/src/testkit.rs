//! Helpers for this workspace's integration tests (feature `testkit`, off by default): the pinned
//! Python Celery venv, and cleanup of what a test left on the real Redis and RabbitMQ.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The python of the pinned Celery venv (made on first use by `scripts/celery-venv.sh`), or `None`
/// when `CELERITY_NO_PYTHON` is set (machines without Python). Panics if the script fails: a test
/// that needs Celery must not pass without it.
pub fn celery_python() -> Option<PathBuf> {
    if std::env::var_os("CELERITY_NO_PYTHON").is_some() {
        eprintln!("CELERITY_NO_PYTHON is set: not asking Python Celery");
        return None;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/celery-venv.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(out.status.success(), "{} failed", script.display());
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let path = stdout
        .lines()
        .last()
        .unwrap_or_else(|| panic!("{} printed no path", script.display()));
    Some(PathBuf::from(path.trim()))
}

/// Deletes every key of the local Redis (127.0.0.1:6379, db 0) that starts with `prefix`.
#[cfg(feature = "redis")]
pub async fn delete_redis_prefix(prefix: &str) {
    assert!(!prefix.is_empty(), "refusing to delete every key");
    let client = ::redis::Client::open("redis://127.0.0.1:6379/0").expect("redis url");
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis");
    let keys: Vec<String> = ::redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut c)
        .await
        .expect("KEYS");
    if !keys.is_empty() {
        let _: () = ::redis::cmd("DEL")
            .arg(&keys)
            .query_async(&mut c)
            .await
            .expect("DEL");
    }
}

/// Deletes a queue and its same-named exchange (as Celery declares them) on the local RabbitMQ.
#[cfg(feature = "amqp")]
pub async fn delete_amqp_queue(queue: &str) {
    use ::lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
    let url = "amqp://guest:guest@127.0.0.1:5672/%2f";
    let conn = ::lapin::Connection::connect(url, ::lapin::ConnectionProperties::default())
        .await
        .expect("connect to rabbitmq");
    let ch = conn.create_channel().await.expect("channel");
    let _ = ch
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await;
    let _ = ch
        .exchange_delete(queue.into(), ExchangeDeleteOptions::default())
        .await;
    let _ = conn.close(0, "test cleanup".into()).await;
}

/// A TCP proxy in front of a local server whose connections a test can cut, to play a broker
/// restart or a network drop for one client without touching anyone else's connections.
pub struct TcpProxy {
    port: u16,
    cuts: watch::Sender<u64>,
}

impl TcpProxy {
    /// Listens on a free local port and forwards every connection to `target` (`host:port`).
    pub async fn start(target: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a local port");
        let port = listener.local_addr().expect("local address").port();
        let (cuts, watch) = watch::channel(0u64);
        let target = target.to_owned();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut cut = watch.clone();
                cut.mark_unchanged();
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        TcpProxy { port, cuts }
    }

    /// The local port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Drops every open connection; new ones are accepted.
    pub fn cut(&self) {
        self.cuts.send_modify(|n| *n += 1);
    }
}

#[cfg(feature = "redis")]
pub use private_redis::PrivateRedis;

#[cfg(feature = "redis")]
mod private_redis {
    use std::path::PathBuf;
    use std::process::{Command, Stdio};

    /// A `redis-server` of the test's own on a free port, with an append-only file, so a test can kill
    /// and restart it (a real broker restart) without touching the shared Redis.
    pub struct PrivateRedis {
        child: Option<std::process::Child>,
        port: u16,
        dir: PathBuf,
    }

    impl PrivateRedis {
        /// Starts one; `None` if `redis-server` cannot be run here.
        pub async fn start() -> Option<PrivateRedis> {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .ok()?
                .local_addr()
                .ok()?
                .port();
            Self::start_on(port).await
        }

        /// Starts one on the first port of `ports` that is free (a test's own range, clear of
        /// other suites' servers); `None` if none is or `redis-server` cannot be run.
        pub async fn start_in(ports: std::ops::Range<u16>) -> Option<PrivateRedis> {
            let port = ports
                .into_iter()
                .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())?;
            Self::start_on(port).await
        }

        async fn start_on(port: u16) -> Option<PrivateRedis> {
            let dir =
                std::env::temp_dir().join(format!("celerity-redis-{port}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).ok()?;
            let mut server = PrivateRedis {
                child: None,
                port,
                dir,
            };
            server.spawn().await.then_some(server)
        }

        async fn spawn(&mut self) -> bool {
            let child = Command::new("redis-server")
                .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
                .args([
                    "--save",
                    "",
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "always",
                ])
                .arg("--dir")
                .arg(&self.dir)
                .stdout(Stdio::null())
                .spawn();
            let Ok(child) = child else { return false };
            self.child = Some(child);
            for _ in 0..400 {
                if let Ok(client) = ::redis::Client::open(self.url().as_str()) {
                    if let Ok(mut c) = client.get_multiplexed_async_connection().await {
                        if ::redis::cmd("PING")
                            .query_async::<String>(&mut c)
                            .await
                            .is_ok()
                        {
                            return true;
                        }
                    }
                }
                tokio::time::sleep(std::time::Duration::from_millis(25)).await;
            }
            false
        }

        /// `redis://127.0.0.1:<port>/0`.
        pub fn url(&self) -> String {
            format!("redis://127.0.0.1:{}/0", self.port)
        }

        /// Kills the server (SIGKILL) and starts it again on the same port and data; true once it answers.
        pub async fn restart(&mut self, down_for: std::time::Duration) -> bool {
            self.kill();
            tokio::time::sleep(down_for).await;
            self.spawn().await
        }

        fn kill(&mut self) {
            if let Some(mut c) = self.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    impl Drop for PrivateRedis {
        fn drop(&mut self) {
            self.kill();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
