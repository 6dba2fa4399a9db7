//! Many worker hosts (issue 19): three test hosts, each a network namespace of the test's own with
//! a veth link to a bridge in the root namespace (subnet 10.231.0.0/24, nothing else routed: each
//! host has its loopback and that link), one `celerity worker` in each, all draining one queue from
//! a broker of the test's own bound to the bridge's address. Mid-load host 1's link is cut (`ip link
//! set … down`, a pulled cable: nothing closes) and never restored. The jobs host 1 held unacked
//! must come back and finish on the other hosts: every job ends with its SUCCESS stored while host 1
//! is still cut off, 0 lost.
//!
//! - Redis (`redis-server` on 10.231.0.1:16550): the jobs come back once the visibility timeout
//!   (2 s here, swept every second) lapses.
//! - RabbitMQ (a lone node of the test's own on 10.231.0.129:5704, distribution port 25704): they
//!   come back when RabbitMQ declares host 1's connection dead, after two missed heartbeats
//!   (`heartbeat=2`); nothing is sent on a cut link, so only the heartbeat notices.
//!
//! The two tests use two halves of the subnet (10.231.0.0/25 and 10.231.0.128/25, one bridge each)
//! so they can run at once. Creating namespaces needs root (CAP_NET_ADMIN) and `ip`: where that
//! fails the test prints why and is skipped. Namespaces, links, servers and workers are removed on
//! drop, also when the test fails.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use celerity_broker::{connect_backend, connect_broker, ResultBackend, State};
use celerity_client::{Client, SendOptions};
use celerity_testsupport::rabbit_cluster::{NodePorts, RabbitCluster};
use celerity_testsupport::{celerity_command, unique, ChildGuard};

/// Jobs in the load, each `demo.sleep_ms(MS)`.
const JOBS: usize = 600;
const MS: u64 = 100;
/// Jobs at once per worker.
const CONCURRENCY: usize = 4;
/// Bound on the drain after the cut.
const PATIENCE: Duration = Duration::from_secs(60);

/// Runs `ip args`; why it failed otherwise.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("run ip {args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The test network: a bridge in the root namespace holding `<prefix>.<base+1>`, and three
/// namespaces, host `i` at `<prefix>.<base+10+i>`, each linked to the bridge by a veth pair. Removed
/// on drop (deleting a namespace deletes its end of the pair, and with it the pair).
struct TestNet {
    tag: &'static str,
    bridge: String,
    hosts: Vec<String>,
    base: u8,
}

impl TestNet {
    /// `tag` keeps the names of two networks apart (`celerity-<tag>-h1`, bridge `cel<tag>br`).
    fn create(tag: &'static str, base: u8) -> Result<TestNet, String> {
        let mut net = TestNet {
            tag,
            bridge: format!("cel{tag}br"),
            hosts: Vec::new(),
            base,
        };
        // Left over from a run that was SIGKILLed: remove it first.
        net.remove();
        let cidr = format!("{}/25", net.bridge_addr());
        ip(&["link", "add", &net.bridge, "type", "bridge"])?;
        ip(&["addr", "add", &cidr, "dev", &net.bridge])?;
        ip(&["link", "set", &net.bridge, "up"])?;
        for i in 1..=3 {
            let ns = format!("celerity-{tag}-h{i}");
            ip(&["netns", "add", &ns])?;
            net.hosts.push(ns.clone());
            let outer = net.veth(i);
            ip(&[
                "link", "add", &outer, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            ip(&["link", "set", &outer, "master", &net.bridge, "up"])?;
            let addr = format!("{}/25", net.host_addr(i));
            ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    fn bridge_addr(&self) -> String {
        format!("10.231.0.{}", self.base + 1)
    }

    fn host_addr(&self, i: usize) -> String {
        format!("10.231.0.{}", usize::from(self.base) + 10 + i)
    }

    /// The root namespace's end of host `i`'s link.
    fn veth(&self, i: usize) -> String {
        format!("cel{}v{i}", self.tag)
    }

    /// Pulls host `i`'s cable.
    fn cut(&self, i: usize) -> Result<(), String> {
        ip(&["link", "set", &self.veth(i), "down"])
    }

    fn remove(&mut self) {
        for i in 1..=3 {
            let _ = ip(&["netns", "del", &format!("celerity-{}-h{i}", self.tag)]);
            let _ = ip(&["link", "del", &self.veth(i)]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
        self.hosts.clear();
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        self.remove();
    }
}

/// A `redis-server` of the test's own bound to `addr:port`, killed and its directory removed on drop.
struct NetRedis {
    child: ChildGuard,
    dir: PathBuf,
}

impl NetRedis {
    async fn start(addr: &str, port: u16) -> Result<NetRedis, String> {
        let dir =
            std::env::temp_dir().join(format!("celerity-netredis-{port}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {dir:?}: {e}"))?;
        let mut cmd = Command::new("redis-server");
        cmd.args(["--bind", addr, "--port", &port.to_string(), "--save", ""])
            // Reached from the namespaces, not from loopback: no protected mode on this private net.
            .args(["--protected-mode", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let child = ChildGuard::new(
            cmd.spawn()
                .map_err(|e| format!("start redis-server: {e}"))?,
        );
        let server = NetRedis { child, dir };
        let url = format!("redis://{addr}:{port}/0");
        for _ in 0..100 {
            if let Ok(client) = redis::Client::open(url.as_str()) {
                if let Ok(mut c) = client.get_multiplexed_async_connection().await {
                    if redis::cmd("PING")
                        .query_async::<String>(&mut c)
                        .await
                        .is_ok()
                    {
                        return Ok(server);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!("redis-server on {addr}:{port} did not answer"))
    }
}

impl Drop for NetRedis {
    fn drop(&mut self) {
        self.child.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One `celerity worker -P 0` (a single process) in namespace `ns`, logging at info into `log`.
fn worker_in(ns: &str, broker: &str, backend: &str, queue: &str, log: &PathBuf) -> ChildGuard {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("open the worker's log");
    // `ip netns exec` enters the namespace and executes the worker in its place (same pid).
    let mut cmd = celerity_command("ip");
    cmd.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_celerity")])
        .args([
            "--broker",
            broker,
            "--backend",
            backend,
            "worker",
            "-Q",
            queue,
        ])
        .args(["-P", "0", "-c", &CONCURRENCY.to_string()])
        .args(["-n", &format!("{ns}@%h")])
        .env("CELERITY_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::from(file));
    ChildGuard::spawn(&mut cmd, "celerity worker in a namespace")
}

/// Task ids the log says were received.
fn received(log: &PathBuf) -> Vec<String> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter(|l| l.contains(": received id="))
        .filter_map(|l| {
            let at = l.find(" id=")?;
            let id = l[at + 4..].split_whitespace().next()?;
            Some(id.trim_matches('"').to_owned())
        })
        .collect()
}

/// Ids of `expected` not SUCCESS with their value within `patience`.
async fn unfinished(
    backend: &std::sync::Arc<dyn ResultBackend>,
    expected: &HashMap<String, Value>,
    patience: Duration,
) -> Vec<String> {
    let until = Instant::now() + patience;
    let mut pending: Vec<&String> = expected.keys().collect();
    loop {
        let mut still = Vec::new();
        for id in pending {
            match backend.get(id).await {
                Ok(m) if m.status == State::Success && m.result == expected[id] => {}
                _ => still.push(id),
            }
        }
        pending = still;
        if pending.is_empty() || Instant::now() > until {
            return pending.into_iter().cloned().collect();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A log file per host, removed on drop unless the test panicked (then its path is printed).
struct Logs(Vec<PathBuf>);

impl Drop for Logs {
    fn drop(&mut self) {
        for log in &self.0 {
            if std::thread::panicking() {
                eprintln!("worker log kept at {}", log.display());
            } else {
                let _ = std::fs::remove_file(log);
            }
        }
    }
}

/// The load, the cut and the checks, on a network that is up and a broker the hosts reach at
/// `broker_url` (results at `backend_url`, both also reachable from the root namespace).
async fn drain_with_one_host_cut(net: &TestNet, broker_url: &str, backend_url: &str, queue: &str) {
    let logs = Logs(
        (1..=3)
            .map(|i| std::env::temp_dir().join(format!("{queue}-h{i}.log")))
            .collect(),
    );
    let mut workers: Vec<ChildGuard> = net
        .hosts
        .iter()
        .zip(&logs.0)
        .map(|(ns, log)| worker_in(ns, broker_url, backend_url, queue, log))
        .collect();
    let broker = connect_broker(broker_url).await.unwrap();
    let backend = connect_backend(backend_url).await.unwrap();
    let client = Client::new(broker.clone(), Some(backend.clone()));
    let options = SendOptions::new().queue(queue);
    let mut expected = HashMap::new();
    let batch: Vec<_> = (0..JOBS)
        .map(|_| {
            let m = options
                .build(
                    "demo.sleep_ms",
                    vec![json!(MS)],
                    Map::new(),
                    chrono::Utc::now(),
                )
                .unwrap();
            expected.insert(m.id().to_owned(), json!(MS));
            m
        })
        .collect();
    client.send_batch(&batch, queue).await.unwrap();

    // Cut host 1 once a third of the load is done and it holds jobs.
    let began = Instant::now();
    loop {
        let left = broker.queue_len(queue).await.unwrap_or(JOBS as u64);
        if left <= (JOBS as u64) * 2 / 3 && !received(&logs.0[0]).is_empty() {
            break;
        }
        assert!(
            began.elapsed() < PATIENCE,
            "the load did not start ({left} jobs left; do the workers reach the broker?)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    net.cut(1).unwrap();
    let cut_at = Instant::now();
    let held = received(&logs.0[0]).len();

    let missing = unfinished(&backend, &expected, PATIENCE).await;
    let after = cut_at.elapsed();
    let by_host: Vec<usize> = logs.0.iter().map(|l| received(l).len()).collect();
    eprintln!(
        "host 1 cut after receiving {held} jobs; all done {after:?} after the cut; \
         deliveries per host {by_host:?} for {JOBS} jobs"
    );
    assert!(
        missing.is_empty(),
        "{} jobs lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert!(held > 0, "host 1 held no job when cut");
    // What host 1 held unacked at the cut was delivered again, to another host.
    assert!(
        by_host.iter().sum::<usize>() > JOBS,
        "no job came back from the cut host: {by_host:?}"
    );
    for w in &mut workers {
        w.kill();
    }
    let _ = broker.close().await;
}

/// Creates the network or says why the test cannot run here.
fn network(tag: &'static str, base: u8) -> Option<TestNet> {
    match TestNet::create(tag, base) {
        Ok(net) => Some(net),
        Err(why) => {
            eprintln!(
                "SKIPPED: cannot create network namespaces here (root and `ip` needed): {why}"
            );
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_jobs_of_a_cut_off_host_finish_on_the_others() {
    let Some(net) = network("r", 0) else { return };
    let addr = net.bridge_addr();
    let _redis = NetRedis::start(&addr, 16550).await.unwrap();
    let queue = unique("many-hosts-redis");
    let broker = format!("redis://{addr}:16550/0?visibility_timeout=2&restore_interval=1");
    let backend = format!("redis://{addr}:16550/1");
    drain_with_one_host_cut(&net, &broker, &backend, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_jobs_of_a_cut_off_host_finish_on_the_others() {
    let Some(net) = network("q", 128) else { return };
    let addr = net.bridge_addr();
    let ports = [NodePorts {
        amqp: 5704,
        dist: 25704,
    }];
    let node = match RabbitCluster::start(&addr, "n", &ports, (25716, 25720)).await {
        Ok(node) => node,
        Err(why) if why.contains("not installed") => {
            eprintln!("SKIPPED: {why}");
            return;
        }
        Err(why) => panic!("RabbitMQ node: {why}"),
    };
    eprintln!("RabbitMQ node up in {:?}", node.started_in);
    let _redis = NetRedis::start(&addr, 16551).await.unwrap();
    let queue = unique("many-hosts-amqp");
    let broker = format!("{}?heartbeat=2", node.node_url(0));
    let backend = format!("redis://{addr}:16551/1");
    drain_with_one_host_cut(&net, &broker, &backend, &queue).await;
}
