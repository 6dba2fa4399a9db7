//! Nested workflows built with our client and run by our worker on memory://, Redis, and RabbitMQ
//! with results on Redis: a group as a chain step (with and without a step after it, which makes it
//! a chord), a chord as a chain step with the chain going on after it, a chord whose body is a
//! chain, a group of chains, a chord whose header holds a chain, a chain spliced into a chain, and
//! a failing member of a chord made from a chain (the rest of the chain fails with the ChordError).

use std::sync::Arc;

use serde_json::json;

use celerity_broker::{Broker, ResultBackend};
use celerity_client::{chain, chord, Chain, Client, ClientError, Group, Signature, WorkflowResult};

use super::{s, Place, Worker, WAIT};

fn group(members: Vec<Signature>) -> Signature {
    Group::new(members).into()
}

async fn exercise(broker: Arc<dyn Broker>, backend: Arc<dyn ResultBackend>, queue: &str) {
    let client = Client::new(broker.clone(), Some(backend.clone()));
    let worker = Worker::spawn(&broker, &backend, queue, 4);

    // chain(add(1, 1), group(add(1), add(2)), xsum()): Celery makes the group and xsum a chord.
    let c = Chain::new(vec![
        s("demo.add", json!([1, 1])),
        group(vec![s("demo.add", json!([1])), s("demo.add", json!([2]))]),
        s("demo.xsum", json!([])),
    ])
    .unwrap()
    .queue(queue);
    let r = client.apply_chain(&c).await.unwrap();
    assert_eq!(r.get(WAIT).await.unwrap(), json!(7), "2 -> [3, 4] -> 7");

    // chain(add(1, 1), group(add(10), mul(10))): the chain's result is the group's.
    let c: Signature = Chain::new(vec![
        s("demo.add", json!([1, 1])),
        group(vec![s("demo.add", json!([10])), s("demo.mul", json!([10]))]),
    ])
    .unwrap()
    .queue(queue)
    .into();
    assert!(
        matches!(
            client
                .apply_chain(&Chain::new(vec![c.clone()]).unwrap())
                .await,
            Err(ClientError::InvalidArgument(_))
        ),
        "a chain ending in a group has no single result"
    );
    match client.apply_workflow(&c).await.unwrap() {
        WorkflowResult::Group(g) => {
            assert_eq!(g.get(WAIT).await.unwrap(), vec![json!(12), json!(20)])
        }
        WorkflowResult::Task(t) => panic!("expected a group result, got task {}", t.id()),
    }

    // A chord as a middle step: chain(add(1, 1), chord([add(1), add(2)], xsum()), mul(10)).
    let ch: Signature = chord(
        Group::new(vec![s("demo.add", json!([1])), s("demo.add", json!([2]))]),
        s("demo.xsum", json!([])),
    )
    .into();
    let c = chain(s("demo.add", json!([1, 1])))
        .then(ch)
        .then(s("demo.mul", json!([10])))
        .queue(queue);
    let r = client.apply_chain(&c).await.unwrap();
    assert_eq!(r.get(WAIT).await.unwrap(), json!(70), "(3 + 4) * 10");

    // chord(header, chain(xsum(), add(100), mul(2))): the body is a chain.
    let body: Signature = Chain::new(vec![
        s("demo.xsum", json!([])),
        s("demo.add", json!([100])),
        s("demo.mul", json!([2])),
    ])
    .unwrap()
    .into();
    let header = Group::new(vec![
        s("demo.add", json!([1, 1])),
        s("demo.add", json!([2, 2])),
    ]);
    let cr = client
        .apply_chord(&chord(header, body).queue(queue))
        .await
        .unwrap();
    assert_eq!(
        cr.body.get(WAIT).await.unwrap(),
        json!(212),
        "(2 + 4 + 100) * 2"
    );
    assert_eq!(cr.header.get(WAIT).await.unwrap(), vec![json!(2), json!(4)]);

    // group(chain(add(1, 1), add(10)), chain(add(2, 2), mul(10)), add(5, 5)): results in order.
    let g = Group::new(vec![
        Chain::new(vec![
            s("demo.add", json!([1, 1])),
            s("demo.add", json!([10])),
        ])
        .unwrap()
        .into(),
        Chain::new(vec![
            s("demo.add", json!([2, 2])),
            s("demo.mul", json!([10])),
        ])
        .unwrap()
        .into(),
        s("demo.add", json!([5, 5])),
    ])
    .queue(queue);
    let gr = client.apply_group(&g).await.unwrap();
    assert_eq!(
        gr.get(WAIT).await.unwrap(),
        vec![json!(12), json!(40), json!(10)]
    );

    // chord([chain(add(1, 1), add(10)), add(3, 3)], xsum()): a header member is a chain.
    let header = Group::new(vec![
        Chain::new(vec![
            s("demo.add", json!([1, 1])),
            s("demo.add", json!([10])),
        ])
        .unwrap()
        .into(),
        s("demo.add", json!([3, 3])),
    ]);
    let cr = client
        .apply_chord(&chord(header, s("demo.echo", json!([]))).queue(queue))
        .await
        .unwrap();
    assert_eq!(
        cr.body.get(WAIT).await.unwrap()["args"],
        json!([[12, 6]]),
        "the chain's last result, in header order"
    );

    // A chain inside a chain is spliced: chain(add(1, 2), chain(mul(10), add(5))).
    let inner: Signature = Chain::new(vec![s("demo.mul", json!([10])), s("demo.add", json!([5]))])
        .unwrap()
        .into();
    let c = chain(s("demo.add", json!([1, 2]))).then(inner).queue(queue);
    assert_eq!(
        client
            .apply_chain(&c)
            .await
            .unwrap()
            .get(WAIT)
            .await
            .unwrap(),
        json!(35)
    );

    // A member of the group-made chord fails: the chord's body and the chain's last step fail
    // with a ChordError naming the member.
    let mut c = Chain::new(vec![
        s("demo.add", json!([1, 1])),
        group(vec![
            s("demo.add", json!([1])),
            s("demo.fail", json!(["member broke"])).immutable(),
        ]),
        s("demo.xsum", json!([])),
        s("demo.mul", json!([2])),
    ])
    .unwrap()
    .queue(queue);
    c.freeze();
    let r = client.apply_chain(&c).await.unwrap();
    match r.get(WAIT).await {
        Err(ClientError::TaskFailed { exception, .. }) => {
            assert_eq!(exception.exc_type, "ChordError");
            assert!(
                exception.message().contains("ValueError('member broke')"),
                "{}",
                exception.message()
            );
        }
        other => panic!("expected a ChordError, got {other:?}"),
    }

    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_workflows_on_memory() {
    let p = Place::memory("nested");
    exercise(p.broker.clone(), p.backend.clone(), &p.queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_workflows_on_redis() {
    let p = Place::redis("nested").await;
    exercise(p.broker.clone(), p.backend.clone(), &p.queue).await;
    p.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_workflows_on_rabbitmq_with_redis_results() {
    let p = Place::rabbitmq_with_redis_results("nested").await;
    exercise(p.broker.clone(), p.backend.clone(), &p.queue).await;
    p.cleanup().await;
}
