//! Retries cross over: a retry our worker republished is run by a Python worker, and one a Python
//! worker republished (with its ETA) by ours.

use super::*;

async fn our_retry_runs_on_python(kind: Kind) {
    let Some(python) = celery_python() else {
        return;
    };
    let mut env = Env::new(kind);
    env.visibility_timeout = Some(5);
    let runs = Arc::new(AtomicU32::new(0));
    let ours = OurWorker::start(&env, registry(&env, records().await, runs.clone()), 2).await;
    let client = env.client().await;
    let job = client
        .send_task(
            "interop.handoff",
            vec![json!("h")],
            Map::new(),
            &SendOptions::new().queue(&env.queue),
        )
        .await
        .unwrap();
    let until = tokio::time::Instant::now() + PATIENCE;
    while runs.load(Ordering::SeqCst) == 0 {
        assert!(
            tokio::time::Instant::now() < until,
            "our worker never ran it"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let summary = ours.stop().await;
    let ran_here = runs.load(Ordering::SeqCst);
    assert!(summary.retried >= 1, "{summary:?}");
    assert_eq!(summary.retried, u64::from(ran_here), "{summary:?}");
    assert_eq!(job.state().await.unwrap(), State::Retry);

    let _py = PyWorker::start(&env, &python).await;
    assert_eq!(
        job.get(Some(PATIENCE)).await.unwrap(),
        json!({"key": "h", "ran_on": "python", "retries": ran_here})
    );
    client.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_retry_runs_on_python_redis() {
    our_retry_runs_on_python(Kind::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_retry_runs_on_python_rabbitmq() {
    our_retry_runs_on_python(Kind::Amqp).await;
}

/// A retry a Python worker republished (with its ETA) is run by our worker.
async fn python_retry_runs_on_ours(kind: Kind) {
    let Some(python) = celery_python() else {
        return;
    };
    let mut env = Env::new(kind);
    env.visibility_timeout = Some(3);
    let mut py = PyWorker::start(&env, &python).await;
    let client = env.client().await;
    let job = client
        .send_task(
            "interop.to_rust",
            vec![json!("t")],
            Map::new(),
            &SendOptions::new().queue(&env.queue),
        )
        .await
        .unwrap();
    // Celery stores RETRY after it published the retry message.
    let until = tokio::time::Instant::now() + PATIENCE;
    while job.state().await.unwrap() != State::Retry {
        assert!(
            tokio::time::Instant::now() < until,
            "Python never retried it"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A warm stop: the first run is acked (a SIGKILL could leave it unacked beside its retry, and
    // then the original runs again, as between two Python workers), and the retry it holds for
    // its ETA goes back to the queue.
    py.warm_stop().await;
    let mut redis = records().await;
    let python_runs: u32 = redis::cmd("GET")
        .arg(format!("{}interop.to_rust.runs", env.prefix))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(python_runs >= 1);

    let ours = demo_worker(&env, 2).await;
    assert_eq!(
        job.get(Some(PATIENCE)).await.unwrap(),
        json!({"key": "t", "ran_on": "celerity", "retries": python_runs})
    );
    let summary = ours.stop().await;
    assert_eq!((summary.succeeded, summary.retried), (1, 0), "{summary:?}");
    client.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_retry_runs_on_ours_redis() {
    python_retry_runs_on_ours(Kind::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_retry_runs_on_ours_rabbitmq() {
    python_retry_runs_on_ours(Kind::Amqp).await;
}
