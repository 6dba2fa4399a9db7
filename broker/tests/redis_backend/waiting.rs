//! Waiting for a result: notified by pub/sub, already stored, timing out without leaving a
//! subscription, channel churn, hundreds of waiters, the poll fallback, close, and waiters that survive
//! a lost pub/sub connection (a private `redis-server` killed and restarted).

use super::*;

#[tokio::test]
async fn wait_returns_when_the_result_is_stored_later() {
    let p = prefix();
    // A poll far longer than the wait: only the notification can resolve it.
    let b = Arc::new(backend(&p, NO_POLL).await);
    let tid = id();
    let writer = {
        let b = b.clone();
        let tid = tid.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            b.store(&TaskMeta::with_state(&tid, State::Started, json!(null)))
                .await
                .unwrap();
            b.store(&success(&tid, json!("done"))).await.unwrap();
        })
    };
    let got = wait_notified(&b, &tid).await;
    assert_eq!((got.status, got.result), (State::Success, json!("done")));
    writer.await.unwrap();
    assert_eq!(subscribers_settle(&key(&p, &tid)).await, 0);
    cleanup(&p).await;
}

#[tokio::test]
async fn wait_on_a_stored_result_returns_it() {
    let p = prefix();
    let b = backend(&p, NO_POLL).await;
    let tid = id();
    let exc = ExceptionInfo::new("KeyError", "x", "builtins");
    b.store(&TaskMeta::failure(&tid, &exc, Some("Traceback...".into())))
        .await
        .unwrap();
    let got = wait_notified(&b, &tid).await;
    assert_eq!(got.status, State::Failure);
    assert_eq!(got.exception(), Some(exc));
    cleanup(&p).await;
}

/// A timeout, or a poll interval, past what the clock can count: no panic ("overflow when adding
/// duration to instant"), the timeout means no deadline and the interval is refused.
#[tokio::test]
async fn a_wait_past_what_the_clock_can_count_does_not_panic() {
    let p = prefix();
    let b = backend(&p, NO_POLL).await;
    let tid = id();
    b.store(&success(&tid, json!(7))).await.unwrap();
    for timeout in [Duration::MAX, Duration::from_secs(u64::MAX / 2)] {
        let got = b.wait(&tid, Some(timeout)).await.unwrap();
        assert_eq!(got.result, json!(7));
    }
    for interval in ["1e19", "1e10"] {
        let url = format!("{REDIS}?global_keyprefix={p}&poll_interval={interval}");
        let err = RedisBackend::connect(&BrokerUrl::parse(&url).unwrap())
            .await
            .map(|_| ())
            .unwrap_err();
        assert!(err.to_string().contains("poll_interval"), "{err}");
    }
    cleanup(&p).await;
}

#[tokio::test]
async fn wait_times_out_and_leaves_no_subscription() {
    let p = prefix();
    let b = backend(&p, "&poll_interval=0.05").await;
    let tid = id();
    b.store(&TaskMeta::with_state(&tid, State::Started, json!(null)))
        .await
        .unwrap();
    let err = b
        .wait(&tid, Some(Duration::from_millis(300)))
        .await
        .unwrap_err();
    assert!(matches!(err, BrokerError::Timeout(_)), "{err:?}");
    assert_eq!(subscribers_settle(&key(&p, &tid)).await, 0);

    // A waiter whose future is dropped unsubscribes too.
    let dropped = id();
    let outer = tokio::time::timeout(Duration::from_millis(300), b.wait(&dropped, None)).await;
    assert!(outer.is_err(), "nothing was stored, the wait cannot finish");
    assert_eq!(subscribers_settle(&key(&p, &dropped)).await, 0);
    cleanup(&p).await;
}

#[tokio::test]
async fn a_channel_left_and_joined_at_once_stays_subscribed() {
    // The listener sends the UNSUBSCRIBE of the waiter that leaves and the SUBSCRIBE of the one
    // that joins in one go, without waiting between them: the server must still see them in order.
    let p = prefix();
    let b = backend(&p, NO_POLL).await;
    let mut admin = raw().await;
    let tid = id();
    let channel = key(&p, &tid);
    let mut leaving = Box::pin(b.wait(&tid, None));
    tokio::select! {
        r = &mut leaving => panic!("nothing was stored, the wait cannot finish: {r:?}"),
        n = subscribers_reach(&mut admin, &channel, 1) => assert_eq!(n, 1),
    }
    // Leave and join with no await in between, so both commands reach the listener together.
    drop(leaving);
    let mut joining = Box::pin(tokio::time::timeout(LONG, b.wait(&tid, None)));
    tokio::select! {
        r = &mut joining => panic!("nothing was stored, the wait cannot finish: {r:?}"),
        () = tokio::time::sleep(Duration::from_millis(300)) => {}
    }
    assert_eq!(
        numsub(&mut admin, &channel).await,
        1,
        "the channel was left"
    );
    let writer = backend(&p, "").await;
    writer.store(&success(&tid, json!("again"))).await.unwrap();
    let got = joining
        .await
        .expect("no notification reached the waiter")
        .unwrap();
    assert_eq!(got.result, json!("again"));
    assert_eq!(subscribers_settle(&channel).await, 0);
    writer.close().await.unwrap();
    cleanup(&p).await;
}

#[tokio::test]
async fn hundreds_of_concurrent_waiters_are_all_resolved() {
    let p = prefix();
    let b = Arc::new(backend(&p, NO_POLL).await);
    let ids: Vec<String> = (0..250).map(|_| id()).collect();
    let shared = id();
    let mut waiters = Vec::new();
    for (i, tid) in ids.iter().enumerate() {
        let (b, tid) = (b.clone(), tid.clone());
        waiters.push(tokio::spawn(async move {
            let m = wait_notified(&b, &tid).await;
            assert_eq!(m.result, json!(i));
        }));
    }
    for _ in 0..50 {
        let (b, tid) = (b.clone(), shared.clone());
        waiters.push(tokio::spawn(async move {
            let m = wait_notified(&b, &tid).await;
            assert_eq!(m.result, json!("shared"));
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut metas: Vec<TaskMeta> = ids
        .iter()
        .enumerate()
        .map(|(i, tid)| success(tid, json!(i)))
        .collect();
    metas.push(success(&shared, json!("shared")));
    b.store_many(&metas).await.unwrap();
    for w in waiters {
        tokio::time::timeout(LONG, w).await.unwrap().unwrap();
    }
    for tid in [&ids[0], &ids[249], &shared] {
        assert_eq!(subscribers_settle(&key(&p, tid)).await, 0);
    }
    cleanup(&p).await;
}

#[tokio::test]
async fn poll_finds_a_result_stored_without_publish() {
    let p = prefix();
    let b = Arc::new(backend(&p, "&poll_interval=0.05").await);
    let tid = id();
    let meta = success(&tid, json!({"via": "poll"}));
    let writer = {
        let (k, doc) = (key(&p, &tid), meta.to_json());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            redis::cmd("SET")
                .arg(k)
                .arg(doc)
                .query_async::<()>(&mut raw().await)
                .await
                .unwrap();
        })
    };
    let got = b.wait(&tid, Some(LONG)).await.unwrap();
    assert_eq!(got, meta);
    writer.await.unwrap();
    cleanup(&p).await;
}

#[tokio::test]
async fn close_stops_waiters_and_refuses_work() {
    let p = prefix();
    let b = Arc::new(backend(&p, NO_POLL).await);
    let tid = id();
    let waiter = {
        let (b, tid) = (b.clone(), tid.clone());
        tokio::spawn(async move { b.wait(&tid, None).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    b.close().await.unwrap();
    let res = tokio::time::timeout(LONG, waiter).await.unwrap().unwrap();
    assert!(matches!(res, Err(BrokerError::Closed)), "{res:?}");
    assert!(matches!(b.get(&tid).await, Err(BrokerError::Closed)));
    assert!(matches!(
        b.store(&success(&tid, json!(1))).await,
        Err(BrokerError::Closed)
    ));
    assert_eq!(subscribers_settle(&key(&p, &tid)).await, 0);
    cleanup(&p).await;
}

/// Waits (bounded) until `channel` has `want` subscribers; returns the last count seen.
async fn subscribers_reach(
    conn: &mut redis::aio::MultiplexedConnection,
    channel: &str,
    want: i64,
) -> i64 {
    let mut n = numsub(conn, channel).await;
    for _ in 0..400 {
        if n == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        n = numsub(conn, channel).await;
    }
    n
}

/// The ids of the server's pub/sub connections.
async fn pubsub_clients(conn: &mut redis::aio::MultiplexedConnection) -> Vec<String> {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(conn)
        .await
        .unwrap();
    list.lines()
        .filter_map(|line| line.split(' ').next())
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn waiters_survive_a_lost_pubsub_connection() {
    let Some(server) = PrivateRedis::start().await else {
        eprintln!("skipped: cannot start a private redis-server");
        return;
    };
    let url = format!("{}?global_keyprefix=t:{NO_POLL}", server.url());
    let b = Arc::new(
        RedisBackend::connect(&BrokerUrl::parse(&url).unwrap())
            .await
            .unwrap(),
    );
    let mut admin = redis::Client::open(server.url().as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let kill_pubsub = || {
        redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .clone()
    };

    // Killed, then stored at once: the result may be published before the listener is back,
    // so the reconnect must make waiters read again.
    let first = id();
    let waiter = {
        let (b, tid) = (b.clone(), first.clone());
        tokio::spawn(async move { wait_notified(&b, &tid).await })
    };
    assert_eq!(
        subscribers_reach(&mut admin, &key("t:", &first), 1).await,
        1
    );
    let killed: i64 = kill_pubsub().query_async(&mut admin).await.unwrap();
    assert_eq!(killed, 1);
    b.store(&success(&first, json!(1))).await.unwrap();
    assert_eq!(waiter.await.unwrap().result, json!(1));

    // Killed, resubscribed, then stored: the notification arrives on the new connection.
    let second = id();
    let waiter = {
        let (b, tid) = (b.clone(), second.clone());
        tokio::spawn(async move { wait_notified(&b, &tid).await })
    };
    assert_eq!(
        subscribers_reach(&mut admin, &key("t:", &second), 1).await,
        1
    );
    let old = pubsub_clients(&mut admin).await;
    assert_eq!(old.len(), 1);
    let killed: i64 = kill_pubsub().query_async(&mut admin).await.unwrap();
    assert_eq!(killed, 1);
    // Wait (bounded) for a new pub/sub connection subscribed to the channel.
    let before = old;
    let mut resubscribed = false;
    for _ in 0..400 {
        let now = pubsub_clients(&mut admin).await;
        if now.iter().any(|id| !before.contains(id))
            && numsub(&mut admin, &key("t:", &second)).await == 1
        {
            resubscribed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(resubscribed, "the listener did not come back");
    b.store(&success(&second, json!(2))).await.unwrap();
    assert_eq!(waiter.await.unwrap().result, json!(2));
    b.close().await.unwrap();
}
