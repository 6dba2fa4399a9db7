//! `celerity inspect` answered by a Python Celery worker and by ours, `celerity control` changing
//! ours, and scheduled (ETA) jobs listed.

use super::*;

pub(crate) async fn celerity_inspects_a_python_worker(env: Env) {
    let Some(python) = celery_python() else {
        return;
    };
    // Ours runs first and knows a revoked id; the Python worker learns it at startup (mingle).
    let ours = OurWorker::start(&env, 1).await;
    let revoked_id = uuid::Uuid::new_v4().to_string();
    let reply = celerity_json(&env, &env.node(), &["control", "revoke", &revoked_id]).await;
    assert!(reply["ok"].is_string(), "{reply}");
    let app = PyApp::new(&env);
    let node = format!("py-{}@test", env.uid);
    let log = app.0.join("worker.log");
    let mut child = app
        .celery(&python, &env)
        .args([
            "worker",
            "-n",
            &node,
            "-Q",
            &format!("{}-py", env.queue),
            "-P",
            "solo",
            "--without-gossip",
            "-l",
            "info",
        ])
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(app.0.join("worker.err")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let until = tokio::time::Instant::now() + PATIENCE;
    let pong = loop {
        let (ok, out) = celerity(&env, &["inspect", "ping", "-d", &node, "-t", "2"]).await;
        if ok {
            break out;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "the Python worker never answered: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    };
    assert!(
        pong.contains(&format!("-> {node}: OK")) && pong.contains("pong"),
        "{pong}"
    );
    let registered = celerity_json(&env, &node, &["inspect", "registered"]).await;
    assert!(
        registered.as_array().unwrap().contains(&json!("py.add")),
        "{registered}"
    );
    let revoked = celerity_json(&env, &node, &["inspect", "revoked"]).await;
    assert!(
        revoked.as_array().unwrap().contains(&json!(revoked_id)),
        "mingle did not pass our revoked id: {revoked}"
    );
    ours.stop().await;
    let _ = child.start_kill();
    let _ = child.wait().await;
}

pub(crate) async fn celerity_controls_our_worker(env: Env) {
    let worker = OurWorker::start(&env, 3).await;
    let node = env.node();
    let (ok, out) = celerity(&env, &["inspect", "ping", "-d", &node, "-t", "10"]).await;
    assert!(ok && out.contains(&format!("-> {node}: OK")), "{out}");
    let registered = celerity_json(&env, &node, &["inspect", "registered"]).await;
    assert!(registered.as_array().unwrap().contains(&json!("demo.add")));

    let reply = celerity_json(&env, &node, &["control", "rate-limit", "demo.add", "7/m"]).await;
    assert_eq!(reply, json!({"ok": "new rate limit set successfully"}));
    let stats = celerity_json(&env, &node, &["inspect", "stats"]).await;
    assert_eq!(stats["rate_limits"]["demo.add"], "7/m", "{stats}");
    let registered = celerity_json(&env, &node, &["inspect", "registered"]).await;
    assert!(
        registered
            .as_array()
            .unwrap()
            .contains(&json!("demo.add [rate_limit=7/m]")),
        "{registered}"
    );
    let reply = celerity_json(&env, &node, &["control", "rate-limit", "nope.task", "1/s"]).await;
    assert_eq!(reply, json!({"error": "unknown task"}));

    // The limit applies to jobs not started yet: 7/m lets the first 7 start at once (a full
    // bucket), the 8th waits about 8.6 s — it is still reserved when we look.
    let client = Client::new(env.broker().await, None);
    for i in 0..8 {
        client
            .send_task(
                "demo.add",
                vec![json!(i), json!(i)],
                Map::new(),
                &SendOptions::new().queue(env.queue.clone()),
            )
            .await
            .unwrap();
    }
    let until = tokio::time::Instant::now() + PATIENCE;
    loop {
        let stats = celerity_json(&env, &node, &["inspect", "stats"]).await;
        if stats["total"]["demo.add"] == json!(7) {
            break;
        }
        assert!(tokio::time::Instant::now() < until, "{stats}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reserved = celerity_json(&env, &node, &["inspect", "reserved"]).await;
    let reserved = reserved.as_array().unwrap();
    assert_eq!(reserved.len(), 1, "{reserved:?}");
    let stats = celerity_json(&env, &node, &["inspect", "stats"]).await;
    assert_eq!(stats["total"]["demo.add"], json!(7), "{stats}");
    // The held job is revoked: it is skipped when its turn comes.
    let held = reserved[0]["id"].as_str().unwrap().to_owned();
    let reply = celerity_json(&env, &node, &["control", "revoke", &held]).await;
    assert_eq!(
        reply,
        json!({"ok": format!("tasks {{{held}}} flagged as revoked")})
    );
    let revoked = celerity_json(&env, &node, &["inspect", "revoked"]).await;
    assert_eq!(revoked, json!([held]));

    let reply = celerity_json(&env, &node, &["control", "pool-grow", "2"]).await;
    assert_eq!(reply, json!({"ok": "pool will grow"}));
    let stats = celerity_json(&env, &node, &["inspect", "stats"]).await;
    assert_eq!(stats["pool"]["max-concurrency"], json!(5));
    let reply = celerity_json(&env, &node, &["control", "pool-shrink", "4"]).await;
    assert_eq!(reply, json!({"ok": "pool will shrink"}));
    let stats = celerity_json(&env, &node, &["inspect", "stats"]).await;
    assert_eq!(stats["pool"]["max-concurrency"], json!(1));

    // Remote shutdown is a warm stop of this node only, and it says goodbye (worker-offline).
    let broker = env.broker().await;
    let mut events = broker
        .subscribe(
            EVENT_EXCHANGE,
            "#",
            &format!("celeryev.{}", uuid::Uuid::new_v4()),
        )
        .await
        .unwrap();
    let reply = celerity_json(&env, &node, &["control", "shutdown"]).await;
    assert_eq!(reply, json!({"ok": "Got shutdown from remote"}));
    let summary = tokio::time::timeout(PATIENCE, worker.0.join())
        .await
        .expect("the worker stopped after remote shutdown");
    assert_eq!((summary.succeeded, summary.revoked), (7, 1), "{summary:?}");
    let offline = tokio::time::timeout(PATIENCE, async {
        loop {
            let m = events
                .next()
                .await
                .unwrap()
                .expect("events subscription ended");
            let mine = celerity_broker::protocol::event::from_message(&m)
                .into_iter()
                .find(|e| e["hostname"] == json!(node) && e["type"] == "worker-offline");
            if let Some(e) = mine {
                return e;
            }
        }
    })
    .await
    .expect("no worker-offline from our node");
    assert_eq!(offline["sw_ident"], "celerity");
    assert_eq!(offline["active"], json!(0));
    assert_eq!(offline["processed"], json!(8), "{offline:?}");
    broker.close().await.unwrap();
}

/// A job waiting for its ETA is listed by `inspect scheduled` (Celery's shape: eta, priority,
/// request), and by `query_task`.
pub(crate) async fn scheduled_jobs_are_listed(env: Env) {
    let worker = OurWorker::start_with(&env, |c| {
        // Held in the worker, not parked on the broker; given back quickly at the stop.
        c.park_after = Duration::from_secs(3600);
        c.grace = Duration::from_millis(200);
    })
    .await;
    let client = Client::new(env.broker().await, None);
    let job = client
        .send_task(
            "demo.add",
            vec![json!(1), json!(2)],
            Map::new(),
            &SendOptions::new()
                .queue(env.queue.clone())
                .countdown(Duration::from_secs(600)),
        )
        .await
        .unwrap();
    let node = env.node();
    let until = tokio::time::Instant::now() + PATIENCE;
    let scheduled = loop {
        let v = celerity_json(&env, &node, &["inspect", "scheduled"]).await;
        if v.as_array().is_some_and(|a| !a.is_empty()) {
            break v;
        }
        assert!(tokio::time::Instant::now() < until, "never scheduled: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let entry = &scheduled[0];
    assert_eq!(entry["request"]["id"], json!(job.id()), "{scheduled}");
    assert_eq!(entry["request"]["name"], "demo.add");
    assert_eq!(entry["request"]["args"], json!([1, 2]));
    assert!(
        entry["eta"].as_str().is_some_and(|e| e.len() >= 19),
        "{entry}"
    );
    let reserved = celerity_json(&env, &node, &["inspect", "reserved"]).await;
    assert_eq!(reserved, json!([]));
    let found = client
        .control_call(
            "query_task",
            serde_json::from_value(json!({"ids": [job.id()]})).unwrap(),
            &Target {
                destination: vec![node.clone()],
                timeout: Duration::from_secs(10),
            },
        )
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(
        found[0].value[job.id()][0],
        "scheduled",
        "{:?}",
        found[0].value
    );
    // Cold stop after the short grace: the held job goes back to the queue, nothing ran.
    let summary = worker.stop().await;
    assert_eq!(summary.succeeded, 0);
}
