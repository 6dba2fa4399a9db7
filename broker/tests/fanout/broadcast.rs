//! Broadcast on one transport: every subscriber gets each message, binding keys select routing keys,
//! messages round-trip intact, a subscription survives a cut connection, close ends subscriptions, and
//! replies reach only the asker.

use super::*;

pub(crate) async fn two_subscribers_both_receive(env: Env) {
    let b = env.broker().await;
    let ex = env.pidbox();
    let mut a = b
        .subscribe(&ex, "", &env.node_queue("a", &ex))
        .await
        .unwrap();
    let mut c = b
        .subscribe(&ex, "", &env.node_queue("c", &ex))
        .await
        .unwrap();
    b.broadcast(&ex, "", &env.message(1)).await.unwrap();
    b.broadcast(&ex, "", &env.message(2)).await.unwrap();
    for sub in [&mut a, &mut c] {
        assert_eq!(n_of(&env.recv(sub).await), 1);
        assert_eq!(n_of(&env.recv(sub).await), 2);
    }
    b.close().await.unwrap();
}

pub(crate) async fn binding_keys_select_routing_keys(env: Env) {
    let b = env.broker().await;
    let ex = "celeryev";
    let name = |what: &str| format!("celeryev.{what}-{}", env.uid);
    let mut tasks = b.subscribe(ex, "task.#", &name("tasks")).await.unwrap();
    let mut workers = b.subscribe(ex, "worker.#", &name("workers")).await.unwrap();
    let mut all = b.subscribe(ex, "#", &name("all")).await.unwrap();
    let mut bare = b.subscribe(ex, "", &name("bare")).await.unwrap();
    for (n, key) in [
        (1, "task.succeeded"),
        (2, "worker.heartbeat"),
        (3, "task.failed"),
        (4, "worker.offline"),
        (5, ""),
    ] {
        b.broadcast(ex, key, &env.message(n)).await.unwrap();
    }
    // Broadcasts arrive in order, so a number skipped is one not delivered.
    assert_eq!(n_of(&env.recv(&mut tasks).await), 1);
    assert_eq!(n_of(&env.recv(&mut tasks).await), 3);
    assert_eq!(n_of(&env.recv(&mut workers).await), 2);
    assert_eq!(n_of(&env.recv(&mut workers).await), 4);
    for n in 1..=4 {
        assert_eq!(n_of(&env.recv(&mut all).await), n);
    }
    // An empty binding key gets only what is broadcast with an empty routing key (as kombu's
    // bare channel on Redis, as a topic binding on RabbitMQ).
    assert_eq!(n_of(&env.recv(&mut bare).await), 5);
    b.broadcast(ex, "task.sent", &env.message(6)).await.unwrap();
    assert_eq!(n_of(&env.recv(&mut tasks).await), 6);
    b.close().await.unwrap();
}

pub(crate) async fn messages_round_trip(env: Env) {
    let b = env.broker().await;
    let ex = env.pidbox();
    let mut sub = b
        .subscribe(&ex, "", &env.node_queue("rt", &ex))
        .await
        .unwrap();
    let mut m = env.message(1);
    m.properties.correlation_id = Some("corr-1".into());
    m.properties.reply_to = Some("8f1c2d3e-reply".into());
    m.properties.expiration = Some("60000".into());
    m.headers.insert(
        "nested".into(),
        json!({"list": [1, "two", null, true, 2.5], "text": "héllo ☃"}),
    );
    m.body = [&b"\x00\xff binary \xfe"[..], "héllo".as_bytes()].concat();
    b.broadcast(&ex, "", &m).await.unwrap();
    let got = env.recv(&mut sub).await;
    assert_eq!(got, m);

    // Broadcasts are transient whatever the message says; the rest is kept.
    let mut persistent = env.message(2);
    persistent.properties.delivery_mode = PERSISTENT;
    b.broadcast(&ex, "", &persistent).await.unwrap();
    let got = env.recv(&mut sub).await;
    assert_eq!(got.properties.delivery_mode, TRANSIENT);
    persistent.properties.delivery_mode = TRANSIENT;
    assert_eq!(got, persistent);
    b.close().await.unwrap();
}

pub(crate) async fn subscription_survives_a_cut(env: Env) {
    let direct = env.broker().await;
    let proxy = TcpProxy::start(env.upstream()).await;
    let via = connect_broker(&env.url(Some(proxy.port()))).await.unwrap();
    let ex = env.pidbox();
    let mut sub = via
        .subscribe(&ex, "", &env.node_queue("cut", &ex))
        .await
        .unwrap();
    direct.broadcast(&ex, "", &env.message(0)).await.unwrap();
    assert_eq!(n_of(&env.recv(&mut sub).await), 0);

    proxy.cut();
    // Let the cut land, so whatever arrives from now on came over a new connection.
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Broadcasts sent while the subscriber is away are missed: keep sending until one arrives.
    let sender = {
        let (direct, ex, uid) = (direct.clone(), ex.clone(), env.uid.clone());
        tokio::spawn(async move {
            for n in 1.. {
                direct.broadcast(&ex, "", &message(&uid, n)).await.unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let got = n_of(&env.recv(&mut sub).await);
    assert!(got >= 1, "a broadcast sent after the cut arrives");
    // And it goes on receiving, in order.
    let next = n_of(&env.recv(&mut sub).await);
    assert!(next > got);
    sender.abort();
    via.close().await.unwrap();
    direct.close().await.unwrap();
}

pub(crate) async fn close_ends_subscriptions(env: Env) {
    let b = env.broker().await;
    let ex = env.pidbox();
    let mut sub = b
        .subscribe(&ex, "", &env.node_queue("close", &ex))
        .await
        .unwrap();
    let waiting = tokio::spawn(async move { sub.next().await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    b.close().await.unwrap();
    let ended = tokio::time::timeout(PATIENCE, waiting)
        .await
        .expect("next() returns once the broker is closed")
        .unwrap();
    assert!(matches!(ended, Ok(None)), "{ended:?}");
    assert!(matches!(
        b.broadcast(&ex, "", &env.message(1)).await,
        Err(BrokerError::Closed)
    ));
    assert!(matches!(
        b.subscribe(&ex, "", &env.node_queue("late", &ex)).await,
        Err(BrokerError::Closed)
    ));
}

/// Remote-control replies go to the direct exchange `reply.celery.pidbox` keyed by the asker's oid:
/// only the reply queue bound with that key gets one (on Redis a list found through kombu's binding
/// set, not pub/sub); closing the subscription removes its binding.
pub(crate) async fn replies_reach_only_the_asker(env: Env) {
    const REPLY: &str = "reply.celery.pidbox";
    let b = env.broker().await;
    let (oid_a, oid_b) = (
        format!("celtest-{}-a", env.uid),
        format!("celtest-{}-b", env.uid),
    );
    let mut a = b
        .subscribe(REPLY, &oid_a, &format!("{oid_a}.{REPLY}"))
        .await
        .unwrap();
    let mut other = b
        .subscribe(REPLY, &oid_b, &format!("{oid_b}.{REPLY}"))
        .await
        .unwrap();
    b.broadcast(REPLY, &oid_a, &env.message(1)).await.unwrap();
    b.broadcast(REPLY, &oid_b, &env.message(2)).await.unwrap();
    assert_eq!(n_of(&env.recv(&mut a).await), 1);
    // The first reply `other` gets is its own: the one for `a` never reached it.
    assert_eq!(n_of(&env.recv(&mut other).await), 2);
    a.close().await;
    #[cfg(feature = "redis")]
    if env.transport == Transport::Redis {
        use redis::AsyncCommands as _;
        let client = redis::Client::open("redis://127.0.0.1:6379/0").unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let members: Vec<String> = c
            .smembers(format!("{}_kombu.binding.{REPLY}", env.prefix()))
            .await
            .unwrap();
        assert!(
            members.iter().all(|m| !m.starts_with(&oid_a)),
            "{members:?}"
        );
        assert!(members.iter().any(|m| m.starts_with(&oid_b)), "{members:?}");
    }
    // A reply nobody waits for any more is dropped, not an error.
    b.broadcast(REPLY, &oid_a, &env.message(3)).await.unwrap();
    other.close().await;
    b.close().await.unwrap();
}
