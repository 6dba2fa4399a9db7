//! Workflows (chain, group, chord, link/link_error) run by our worker on memory://, Redis, and
//! RabbitMQ with results on Redis; a 1,000-member chord on a private Redis, with its cost counted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use celerity_broker::{connect_backend, connect_broker, Broker, ResultBackend, State};
use celerity_client::{chain, chord, Chain, Client, ClientError, Group};
use celerity_testsupport::PrivateRedis;

use super::{s, unique, Place, Worker, WAIT};

/// Every workflow shape against one broker/backend pair, each job on `queue`.
async fn exercise(broker: Arc<dyn Broker>, backend: Arc<dyn ResultBackend>, queue: &str) {
    let client = Client::new(broker.clone(), Some(backend.clone()));
    let worker = Worker::spawn(&broker, &backend, queue, 8);

    // chain: (1 + 2) * 10 + 5, then an immutable step that ignores the result.
    let c = Chain::new(vec![
        s("demo.add", json!([1, 2])),
        s("demo.mul", json!([10])),
        s("demo.add", json!([5])),
    ])
    .unwrap()
    .queue(queue);
    let r = client.apply_chain(&c).await.unwrap();
    assert_eq!(r.get(WAIT).await.unwrap(), json!(35));
    let c = chain(s("demo.add", json!([1, 2])))
        .then(s("demo.add", json!([10, 10])).immutable())
        .queue(queue);
    assert_eq!(
        client
            .apply_chain(&c)
            .await
            .unwrap()
            .get(WAIT)
            .await
            .unwrap(),
        json!(20)
    );

    // A failing step stops the chain: the handle (last step) reports the failure; the errback runs
    // with the failed task's id.
    let errback_id = uuid::Uuid::new_v4().to_string();
    let mut c = chain(s("demo.add", json!([1, 2])))
        .then(s("demo.fail", json!(["boom"])).immutable())
        .then(s("demo.mul", json!([2])))
        .link_error(s("demo.echo", json!([])).task_id(&errback_id))
        .queue(queue);
    let ids = c.freeze();
    let r = client.apply_chain(&c).await.unwrap();
    match r.get(WAIT).await {
        Err(ClientError::TaskFailed { exception, .. }) => {
            assert_eq!(exception.exc_type, "ValueError");
            assert_eq!(exception.message(), "boom");
        }
        other => panic!("expected the chain to fail, got {other:?}"),
    }
    let eb = client.result::<Value>(&errback_id).get(WAIT).await.unwrap();
    assert_eq!(
        eb["args"],
        json!([ids[1]]),
        "errback gets the failed task's id"
    );
    assert_eq!(
        client.result::<Value>(&ids[0]).get(WAIT).await.unwrap(),
        json!(3)
    );

    // link: callback gets the result in front of its args.
    let cb_id = uuid::Uuid::new_v4().to_string();
    let sig = s("demo.add", json!([2, 3]))
        .queue(queue)
        .link(s("demo.mul", json!([10])).task_id(&cb_id));
    let r = client.apply(&sig).await.unwrap();
    assert_eq!(r.get(WAIT).await.unwrap(), json!(5));
    assert_eq!(
        client.result::<Value>(&cb_id).get(WAIT).await.unwrap(),
        json!(50)
    );

    // group: results in order; saved and restored by id.
    let g = Group::new((0..6).map(|i| s("demo.add", json!([i, i]))).collect()).queue(queue);
    let gr = client.apply_group(&g).await.unwrap();
    assert_eq!(
        gr.get(WAIT).await.unwrap(),
        (0..6).map(|i| json!(2 * i)).collect::<Vec<_>>()
    );
    gr.save().await.unwrap();
    let back = client.restore_group(gr.id()).await.unwrap().unwrap();
    assert_eq!(back.ids(), gr.ids());
    gr.forget().await.unwrap();
    assert!(client.restore_group(gr.id()).await.unwrap().is_none());

    // group with failures: the error names each failed member.
    let g = Group::new(vec![
        s("demo.add", json!([1, 1])),
        s("demo.fail", json!(["first"])),
        s("demo.add", json!([2, 2])),
        s("demo.fail", json!(["second"])),
    ])
    .queue(queue);
    let gr = client.apply_group(&g).await.unwrap();
    match gr.get(WAIT).await {
        Err(ClientError::GroupFailed { total, failed, .. }) => {
            assert_eq!(total, 4);
            let idx: Vec<usize> = failed.iter().map(|f| f.index).collect();
            assert_eq!(idx, vec![1, 3]);
            assert_eq!(failed[0].task_id, gr.ids()[1]);
            assert_eq!(failed[1].exception.message(), "second");
        }
        other => panic!("expected GroupFailed, got {other:?}"),
    }

    // chord: the body gets the header results in order.
    let header = Group::new((0..10).map(|i| s("demo.add", json!([i, i]))).collect());
    let ch = chord(header, s("demo.echo", json!(["tail"]))).queue(queue);
    let cr = client.apply_chord(&ch).await.unwrap();
    let out = cr.body.get(WAIT).await.unwrap();
    assert_eq!(
        out["args"],
        json!([(0..10).map(|i| 2 * i).collect::<Vec<_>>(), "tail"])
    );
    assert_eq!(cr.header.get(WAIT).await.unwrap().len(), 10);

    // A chord with a failed member: the body fails with a ChordError naming it; its errback runs.
    let eb_id = uuid::Uuid::new_v4().to_string();
    let header = Group::new(vec![
        s("demo.add", json!([1, 1])),
        s("demo.fail", json!(["member broke"])),
        s("demo.add", json!([2, 2])),
    ]);
    let body = s("demo.echo", json!([])).link_error(s("demo.echo", json!([])).task_id(&eb_id));
    let cr = client
        .apply_chord(&chord(header, body).queue(queue))
        .await
        .unwrap();
    let failed_member = cr.header.ids()[1].clone();
    match cr.body.get(WAIT).await {
        Err(ClientError::TaskFailed { exception, .. }) => {
            assert_eq!(exception.exc_type, "ChordError");
            let m = exception.message();
            assert!(m.contains(&failed_member), "{m}");
            assert!(m.contains("ValueError('member broke')"), "{m}");
        }
        other => panic!("expected a ChordError, got {other:?}"),
    }
    let eb = client.result::<Value>(&eb_id).get(WAIT).await.unwrap();
    assert_eq!(eb["args"], json!([cr.body.id()]));

    // Retries inside a chain and a chord keep the workflow going.
    let key = unique("canvas");
    let c = chain(s("demo.flaky", json!([key, 2])))
        .then(s("demo.add", json!([1, 1])).immutable())
        .queue(queue);
    assert_eq!(
        client
            .apply_chain(&c)
            .await
            .unwrap()
            .get(WAIT)
            .await
            .unwrap(),
        json!(2)
    );
    let header = Group::new(vec![
        s("demo.flaky", json!([key, 2])),
        s("demo.add", json!([1, 1])),
    ]);
    let cr = client
        .apply_chord(&chord(header, s("demo.echo", json!([]))).queue(queue))
        .await
        .unwrap();
    let out = cr.body.get(WAIT).await.unwrap();
    assert_eq!(out["args"], json!([[{"key": key, "runs": 3}, 2]]));

    // An empty chord runs its body at once with [].
    let cr = client
        .apply_chord(&chord(Group::new::<Value>(vec![]), s("demo.echo", json!([]))).queue(queue))
        .await
        .unwrap();
    assert_eq!(cr.body.get(WAIT).await.unwrap()["args"], json!([[]]));

    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflows_on_memory() {
    let p = Place::memory("canvas");
    exercise(p.broker.clone(), p.backend.clone(), &p.queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflows_on_redis() {
    let p = Place::redis("canvas").await;
    exercise(p.broker.clone(), p.backend.clone(), &p.queue).await;
    p.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflows_on_rabbitmq_with_redis_results() {
    let p = Place::rabbitmq_with_redis_results("canvas").await;
    exercise(p.broker.clone(), p.backend.clone(), &p.queue).await;
    p.cleanup().await;
}

/// Total commands a Redis server has processed.
async fn commands_processed(url: &str) -> u64 {
    let client = redis::Client::open(url).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(&mut c)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

/// Commands of one kind (`evalsha`, `get`, …) a Redis server has processed.
async fn command_calls(url: &str) -> Vec<(String, u64)> {
    let client = redis::Client::open(url).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut c)
        .await
        .unwrap();
    info.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("cmdstat_")?;
            let (name, stats) = rest.split_once(':')?;
            let calls = stats.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
            Some((name.to_owned(), calls.parse().ok()?))
        })
        .collect()
}

/// A chord of 1,000 members finishes, with the body getting all results in order. Runs on a private
/// redis-server (broker and backend) so every command it processes is ours, and prints the cost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chord_of_a_thousand() {
    const N: usize = 1000;
    let server = PrivateRedis::start()
        .await
        .expect("redis-server must be runnable for this test");
    let url = server.url();
    let broker = connect_broker(&url).await.unwrap();
    let backend = connect_backend(&url).await.unwrap();
    let client = Client::new(broker.clone(), Some(backend.clone()));
    let queue = unique("canvas");
    let worker = Worker::spawn(&broker, &backend, &queue, 8);
    // Let the worker settle (consumer registered) before counting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = commands_processed(&url).await;
    let stats_before = command_calls(&url).await;
    let started = Instant::now();
    let header = Group::new((0..N).map(|i| s("demo.add", json!([i, 1]))).collect());
    let cr = client
        .apply_chord(&chord(header, s("demo.echo", json!([]))).queue(&queue))
        .await
        .unwrap();
    let meta = backend
        .wait(cr.body.id(), Some(Duration::from_secs(120)))
        .await
        .unwrap();
    let elapsed = started.elapsed();
    assert_eq!(meta.status, State::Success);
    let expected: Vec<Value> = (0..N).map(|i| json!(i + 1)).collect();
    assert_eq!(
        meta.result["args"],
        json!([expected]),
        "body gets every result, in order"
    );
    let after = commands_processed(&url).await;
    let stats_after = command_calls(&url).await;
    let delta: Vec<(String, u64)> = stats_after
        .iter()
        .map(|(k, v)| {
            let b = stats_before
                .iter()
                .find(|(n, _)| n == k)
                .map_or(0, |(_, c)| *c);
            (k.clone(), v - b)
        })
        .filter(|(_, d)| *d > 0)
        .collect();
    println!(
        "chord of {N}: body done in {:.3} s; redis commands while it ran (broker + backend, including \
         commands run inside scripts): {} ({:.1} per member); by command: {delta:?}",
        elapsed.as_secs_f64(),
        after - before,
        (after - before) as f64 / N as f64
    );
    let calls = |name: &str| delta.iter().find(|(k, _)| k == name).map_or(0, |(_, c)| *c);
    // Inside the join script each member runs SISMEMBER once (its dedupe check): exactly one join
    // call per member. The entries are read once in all (ZRANGE), by the member that completed it.
    assert_eq!(calls("sismember"), N as u64, "one join call per member");
    assert_eq!(calls("zrange"), 1, "one O(n) read of the join");
    worker.stop().await;
    drop(server);
}
