//! Documents shared with real Celery: ours read what Celery wrote, and Python Celery (pinned venv)
//! reads what we store.

use super::*;

/// Documents written by Celery 5.7.0's Redis backend (`store_result`, `mark_as_failure`).
const CELERY_SUCCESS: &str = r#"{"status": "SUCCESS", "result": {"sum": 4, "items": [1, "tv\u00e5", null, 2.5]}, "traceback": null, "children": null, "date_done": "2026-11-23T11:33:45.817524+00:00", "task_id": "f3a1c1de-6b8e-4e8e-9d4c-0a2b7c1e5d11"}"#;
const CELERY_FAILURE: &str = r#"{"status": "FAILURE", "result": {"exc_type": "ValueError", "exc_message": ["bad input", 42], "exc_module": "builtins"}, "traceback": "Traceback (most recent call last):\n  File \"/tmp/capture_meta.py\", line 11, in <module>\n    raise ValueError('bad input', 42)\nValueError: ('bad input', 42)\n", "children": null, "date_done": "2026-11-23T11:33:45.822278+00:00", "task_id": "0b6d2c4e-1f3a-4c5b-8e7d-9a1b2c3d4e5f"}"#;

#[tokio::test]
async fn reads_documents_written_by_celery() {
    let p = prefix();
    let b = backend(&p, "").await;
    let mut conn = raw().await;
    let ok = "f3a1c1de-6b8e-4e8e-9d4c-0a2b7c1e5d11";
    let bad = "0b6d2c4e-1f3a-4c5b-8e7d-9a1b2c3d4e5f";
    for (tid, doc) in [(ok, CELERY_SUCCESS), (bad, CELERY_FAILURE)] {
        redis::cmd("SET")
            .arg(key(&p, tid))
            .arg(doc)
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
    }

    let m = b.get(ok).await.unwrap();
    assert_eq!(
        String::from_utf8(m.to_json()).unwrap(),
        CELERY_SUCCESS,
        "re-encoding gives Celery's bytes back"
    );
    assert_eq!(m.status, State::Success);
    assert_eq!(m.result, json!({"sum": 4, "items": [1, "två", null, 2.5]}));
    assert!(m.exception().is_none() && m.traceback.is_none());
    assert_eq!(
        m.date_done.unwrap().to_rfc3339(),
        "2026-11-23T11:33:45.817524+00:00"
    );

    let m = wait_notified(&b, bad).await;
    assert_eq!(String::from_utf8(m.to_json()).unwrap(), CELERY_FAILURE);
    assert_eq!(m.status, State::Failure);
    let exc = m.exception().unwrap();
    assert_eq!(exc.exc_type, "ValueError");
    assert_eq!(exc.exc_module, "builtins");
    assert_eq!(exc.exc_message, vec![json!("bad input"), json!(42)]);
    assert!(m
        .traceback
        .unwrap()
        .ends_with("ValueError: ('bad input', 42)\n"));

    // Celery's SUCCESS document is guarded like ours.
    b.store(&TaskMeta::with_state(ok, State::Started, json!(null)))
        .await
        .unwrap();
    assert_eq!(b.get(ok).await.unwrap().status, State::Success);
    cleanup(&p).await;
}

/// Real Celery reads (and waits through pub/sub for) what we store. `CELERITY_NO_PYTHON=1` skips it.
#[tokio::test]
async fn python_celery_reads_what_we_store() {
    let Some(python) = celerity_testsupport::celery_python() else {
        return;
    };
    let p = prefix();
    let b = Arc::new(backend(&p, "").await);
    let tid = id();
    // Failures stored before Python asks: `get()` must raise them, Celery's way.
    let failed = id();
    let exc = ExceptionInfo::new("ValueError", "bad value", "builtins");
    b.store(&TaskMeta::failure(
        &failed,
        &exc,
        Some("Traceback ...".into()),
    ))
    .await
    .unwrap();
    let custom = id();
    let exc = ExceptionInfo::new("FlakyError", "run 1 of 3", "celerity.tasks");
    b.store(&TaskMeta::failure(&custom, &exc, None))
        .await
        .unwrap();
    let script = format!(
        "from celery import Celery\n\
         app = Celery(backend='{REDIS}', broker='memory://')\n\
         app.conf.result_backend_transport_options = {{'global_keyprefix': '{p}'}}\n\
         print(repr(app.AsyncResult('{tid}').get(timeout=20)))\n\
         try:\n    app.AsyncResult('{failed}').get(timeout=20)\nexcept ValueError as e:\n    print('raised', type(e).__name__, e)\n\
         try:\n    app.AsyncResult('{custom}').get(timeout=20)\nexcept Exception as e:\n    print('raised', type(e).__name__, e)\n"
    );
    let child = tokio::process::Command::new(&python)
        .env("PYTHONIOENCODING", "utf-8")
        .arg("-c")
        .arg(script)
        .output();
    let writer = {
        let (b, tid) = (b.clone(), tid.clone());
        tokio::spawn(async move {
            // Give Python time to import and subscribe; it reads the key first either way.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            b.store(&TaskMeta::success(&tid, json!({"answer": [42, "två"]})))
                .await
                .unwrap();
        })
    };
    let out = tokio::time::timeout(Duration::from_secs(60), child)
        .await
        .unwrap()
        .unwrap();
    writer.await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "{'answer': [42, 'två']}");
    assert_eq!(lines[1], "raised ValueError bad value");
    // An exception class Python cannot import comes back as Celery's stand-in of the same name.
    assert_eq!(lines[2], "raised FlakyError run 1 of 3");
    cleanup(&p).await;
}
