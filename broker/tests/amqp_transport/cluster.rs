//! A RabbitMQ cluster of the test's own (three nodes on 127.0.0.1, AMQP ports 5701–5703,
//! distribution ports 25701–25703, `rabbitmqctl` on 25711–25715) with a quorum queue: the node
//! leading the queue is killed (SIGKILL) mid-load while a producer publishes with confirms and a
//! consumer drains, both through kombu's failover list of the three nodes. Every job published
//! must be delivered (0 lost); the producer must go on publishing through another node.
//!
//! It found that a publishing channel that saw the old leader went on nacking every publish after a
//! new leader was elected (RabbitMQ 3.10): the publisher now retries a nacked publish on a new
//! channel.
//!
//! Skipped, with a message, where RabbitMQ is not installed. The cluster's start-up time is printed
//! (about 20 s on an idle 2-core machine).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use celerity_broker::connect_broker;
use celerity_testsupport::rabbit_cluster::{NodePorts, RabbitCluster};

use super::msg;

/// Jobs in the load.
const JOBS: usize = 3000;
/// Jobs per confirmed publish.
const BATCH: usize = 50;
/// Bound on the load once the cluster runs.
const LOAD_LIMIT: Duration = Duration::from_secs(60);

fn ports() -> [NodePorts; 3] {
    [0, 1, 2].map(|i| NodePorts {
        amqp: 5701 + i,
        dist: 25701 + i,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_quorum_queue_leader_mid_load_loses_no_job() {
    let mut cluster = match RabbitCluster::start("127.0.0.1", "q", &ports(), (25711, 25715)).await {
        Ok(c) => c,
        Err(why) if why.contains("not installed") => {
            eprintln!("SKIPPED: no RabbitMQ cluster here: {why}");
            return;
        }
        Err(why) => panic!("cluster start: {why}"),
    };
    eprintln!("three-node cluster up in {:?}", cluster.started_in);
    let url = cluster.failover_url("?queue_type=quorum&heartbeat=5&connect_timeout=3");
    let broker = connect_broker(&url).await.unwrap();
    let queue = format!("celerity-test-cluster-{}", uuid::Uuid::new_v4().simple());
    broker.declare_queue(&queue).await.unwrap();
    let leader = cluster.leader_of(&queue).unwrap();
    eprintln!("queue leader: {}", cluster.node_name(leader));

    let seen = Arc::new(Mutex::new(HashSet::new()));
    let deliveries = Arc::new(AtomicUsize::new(0));
    let published = Arc::new(AtomicUsize::new(0));
    let killed = Arc::new(AtomicBool::new(false));
    let published_after_kill = Arc::new(AtomicUsize::new(0));

    let mut consumer = broker.consume(&[queue.clone()], 50).await.unwrap();
    let drain = {
        let (seen, deliveries) = (seen.clone(), deliveries.clone());
        tokio::spawn(async move {
            while seen.lock().unwrap().len() < JOBS {
                let Ok(next) = tokio::time::timeout(LOAD_LIMIT, consumer.next()).await else {
                    break;
                };
                let Some(d) = next.unwrap() else { break };
                deliveries.fetch_add(1, Ordering::SeqCst);
                let n = d.message.headers["n"].as_u64().unwrap();
                // An ack to a dead node fails: the job comes back and is counted again.
                if d.ack().await.is_ok() {
                    seen.lock().unwrap().insert(n);
                }
            }
            consumer.close().await.unwrap();
        })
    };
    let produce = {
        let (broker, queue, published) = (broker.clone(), queue.clone(), published.clone());
        let (killed, after) = (killed.clone(), published_after_kill.clone());
        tokio::spawn(async move {
            let mut errors = Vec::new();
            for start in (0..JOBS).step_by(BATCH) {
                let batch: Vec<_> = (start..start + BATCH).map(msg).collect();
                // A batch that fails is sent again whole: a job may be stored twice, never lost.
                while let Err(e) = broker.publish_batch(&queue, &batch).await {
                    eprintln!("publish of jobs {start}.. failed, sent again: {e}");
                    errors.push(e.to_string());
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                published.fetch_add(BATCH, Ordering::SeqCst);
                if killed.load(Ordering::SeqCst) {
                    after.fetch_add(BATCH, Ordering::SeqCst);
                }
                // Keep the load going while the node goes down.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            errors
        })
    };

    let began = Instant::now();
    while seen.lock().unwrap().len() < JOBS / 3 {
        assert!(began.elapsed() < LOAD_LIMIT, "the load did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.kill_node(leader);
    killed.store(true, Ordering::SeqCst);
    let at_kill = seen.lock().unwrap().len();
    eprintln!("killed the leader after {at_kill} jobs");

    let watch = {
        let (seen, published) = (seen.clone(), published.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                eprintln!(
                    "progress: {} published, {} drained",
                    published.load(Ordering::SeqCst),
                    seen.lock().unwrap().len()
                );
            }
        })
    };
    let errors = tokio::time::timeout(LOAD_LIMIT, produce)
        .await
        .expect("the producer did not finish")
        .unwrap();
    tokio::time::timeout(LOAD_LIMIT, drain)
        .await
        .expect("the drain did not finish")
        .unwrap();

    watch.abort();
    let seen = seen.lock().unwrap();
    let missing: Vec<usize> = (0..JOBS)
        .filter(|n| !seen.contains(&(*n as u64)))
        .take(10)
        .collect();
    eprintln!(
        "published {} jobs ({} after the kill, {} failed publishes retried: {:?}); {} deliveries for {} jobs",
        published.load(Ordering::SeqCst),
        published_after_kill.load(Ordering::SeqCst),
        errors.len(),
        errors.iter().take(3).collect::<Vec<_>>(),
        deliveries.load(Ordering::SeqCst),
        seen.len()
    );
    assert!(missing.is_empty(), "lost jobs (first 10): {missing:?}");
    assert!(
        published_after_kill.load(Ordering::SeqCst) > 0,
        "nothing was published after the leader died"
    );
    assert_ne!(
        cluster.leader_of(&queue).unwrap(),
        leader,
        "a surviving node leads the queue"
    );
    broker.close().await.unwrap();
}
