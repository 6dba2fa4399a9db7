//! Captured result documents read as Celery wrote them and rewrite to Celery's bytes.

use super::*;

/// The keys every meta document has; anything else is `TaskMeta::extra`.
const META_KEYS: &[&str] = &[
    "status",
    "result",
    "traceback",
    "children",
    "date_done",
    "task_id",
];

#[test]
fn backend_vectors_read_as_celery_wrote_them() {
    let docs = load_group("backend");
    assert!(
        docs.len() >= 10,
        "expected the backend vectors, found {}",
        docs.len()
    );
    for (case, doc) in &docs {
        let stored = raw(doc, "stored");
        assert_eq!(
            stored,
            raw(doc, "published"),
            "{case}: SETEX and PUBLISH carry the same bytes"
        );
        let tid = doc["task_id"].as_str().unwrap();
        let meta = TaskMeta::from_json(tid, &stored).unwrap_or_else(|e| panic!("{case}: {e}"));
        let want = &doc["meta"];
        assert_eq!(meta.task_id, tid, "{case}");
        assert_eq!(meta.status.as_str(), want["status"], "{case}: status");
        assert_eq!(meta.status.as_str(), doc["celery_view"]["status"], "{case}");
        assert_eq!(meta.result, want["result"], "{case}: result");
        assert_eq!(
            opt_json(&meta.traceback),
            want["traceback"],
            "{case}: traceback"
        );
        assert_eq!(
            meta.date_done.map(|d| json!(format_iso(&d.fixed_offset()))),
            want["date_done"].as_str().map(|s| json!(s)),
            "{case}: date_done"
        );
        assert_eq!(meta.date_done.is_some(), meta.status.is_ready(), "{case}");
        if meta.status.is_exception() {
            let exc = meta
                .exception()
                .unwrap_or_else(|| panic!("{case}: no exception"));
            assert_eq!(
                Some(exc.clone()),
                ExceptionInfo::from_value(&want["result"]),
                "{case}"
            );
            assert_eq!(
                format!("{}", exc.exc_type),
                doc["celery_view"]["result_type"].as_str().unwrap(),
                "{case}: Celery rebuilt the same exception class"
            );
        }
        // Extra keys (group_id, parent_id, extended fields) are all kept with their values.
        let mut extra: Vec<(&String, &Value)> = meta.extra.iter().collect();
        let mut want_extra: Vec<(&String, &Value)> = want
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| !META_KEYS.contains(&k.as_str()))
            .collect();
        extra.sort_by_key(|(k, _)| *k);
        want_extra.sort_by_key(|(k, _)| *k);
        assert_eq!(extra, want_extra, "{case}: extra keys");
    }
    let by_case: Map<String, Value> = docs.into_iter().collect();
    let failure = &by_case["failure_value_error"];
    let meta = TaskMeta::from_json("x", &raw(failure, "stored")).unwrap();
    assert_eq!(meta.status, State::Failure);
    assert_eq!(
        meta.exception(),
        Some(ExceptionInfo::new("ValueError", "bad value", "builtins"))
    );
    assert!(meta
        .traceback
        .as_deref()
        .is_some_and(|t| t.starts_with("Traceback") && t.ends_with("ValueError: bad value\n")));
    let revoked = TaskMeta::from_json("x", &raw(&by_case["revoked"], "stored")).unwrap();
    assert_eq!(
        revoked.exception(),
        Some(ExceptionInfo::new(
            "TaskRevokedError",
            "revoked",
            "celery.exceptions"
        ))
    );
}

#[test]
fn backend_vectors_rewrite_to_celerys_bytes() {
    for (case, doc) in load_group("backend") {
        let stored = raw(&doc, "stored");
        let meta = TaskMeta::from_json(doc["task_id"].as_str().unwrap(), &stored).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&meta.to_json()),
            String::from_utf8_lossy(&stored),
            "{case}: to_json"
        );
    }
}
