//! Captured task messages (AMQP and Redis) decode as Celery understood them and re-encode to
//! Celery's bytes; workflows keep Celery's shape; floats are spelled as Python spells them.

use super::*;

#[test]
fn amqp_vectors_decode_as_celery_understood_them() {
    let n = each_message("amqp", |what, rec| {
        let m = amqp_message(rec);
        let t = TaskMessage::decode(&m).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_matches_celery(what, &t, &rec["celery_view"]);
    });
    assert_eq!(n, 16);
}

#[test]
fn amqp_vectors_reencode_to_celerys_bytes() {
    each_message("amqp", |what, rec| {
        if what.contains(&format!("/{FLOAT_CASE}#")) {
            return;
        }
        let m = amqp_message(rec);
        let t = TaskMessage::decode(&m).unwrap();
        assert_reencodes_exactly(what, &t, &m);
    });
}

#[test]
fn redis_vectors_decode_as_celery_understood_them() {
    let n = each_message("redis", |what, rec| {
        let m = redis_message(rec["envelope"].as_str().unwrap());
        assert_eq!(m.body, raw(rec, "body"), "{what}: base64 body");
        let t = TaskMessage::decode(&m).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_matches_celery(what, &t, &rec["celery_view"]);
    });
    assert_eq!(n, 16);
}

#[test]
fn redis_vectors_reencode_to_celerys_bytes() {
    each_message("redis", |what, rec| {
        let envelope = rec["envelope"].as_str().unwrap();
        // The envelope itself is Python `json.dumps` output: pyjson must write it back unchanged.
        let parsed: Value = serde_json::from_str(envelope).unwrap();
        assert_eq!(
            pyjson::to_string(&parsed),
            envelope,
            "{what}: envelope text"
        );
        if what.contains(&format!("/{FLOAT_CASE}#")) {
            return;
        }
        let m = redis_message(envelope);
        let t = TaskMessage::decode(&m).unwrap();
        assert_reencodes_exactly(what, &t, &m);
    });
}

#[test]
fn chain_group_and_chord_vectors_have_celerys_workflow_shape() {
    let docs: Map<String, Value> = load_group("amqp").into_iter().collect();
    let first = |case: &str| {
        let rec = &docs[case]["messages"][0];
        TaskMessage::decode(&amqp_message(rec)).unwrap()
    };
    // chain(add.s(2, 2), add.s(4), mul.s(8)): the next step is the LAST element.
    let chain = first("chain");
    let steps = Signature::list_from_value(&chain.embed.chain).unwrap();
    let names: Vec<&str> = steps.iter().map(|s| s.task.as_str()).collect();
    assert_eq!(names, ["proj.tasks.mul", "proj.tasks.add"]);
    assert_eq!(steps[1].args, vec![json!(4)]);
    assert_eq!(chain.args, vec![json!(2), json!(2)]);
    // Group members carry group + group_index 0, 1, 2.
    let group = &docs["group"]["messages"];
    for (i, rec) in group.as_array().unwrap().iter().enumerate() {
        let t = TaskMessage::decode(&amqp_message(rec)).unwrap();
        assert_eq!(t.headers.group_index, Some(i as i64));
        assert!(t.headers.group.is_some());
    }
    // Chord header messages carry the body signature, whose group_id is the header's group.
    let chord = first("chord");
    let body = Signature::from_value(&chord.embed.chord).unwrap();
    assert_eq!(body.task, "proj.tasks.xsum");
    assert_eq!(
        body.options.get("group_id").and_then(Value::as_str),
        chord.headers.group.as_deref()
    );
    // time_limits: [hard, soft] = [10, 5.5], the soft one a float on the wire.
    let tl = first("time_limits");
    assert_eq!(tl.headers.timelimit, (Some(10.0), Some(5.5)));
    assert_eq!(tl.encode().headers["timelimit"], json!([10, 5.5]));
    // expires=60: the AMQP `expiration` property is the string "60000".
    assert_eq!(
        first("expires").properties.expiration.as_deref(),
        Some("60000")
    );
}

/// Python writes `1e-07`, `1e+16`, `1e+100`; serde_json writes `1e-7`, `1e16`, `1e100`.
/// Decoding must agree with Celery's values (checked above); this pins the byte-level spelling.
#[test]
fn float_spelling_matches_python() {
    for group in ["amqp", "redis"] {
        let docs: Map<String, Value> = load_group(group).into_iter().collect();
        let rec = &docs[FLOAT_CASE]["messages"][0];
        let m = match group {
            "amqp" => amqp_message(rec),
            _ => redis_message(rec["envelope"].as_str().unwrap()),
        };
        let t = TaskMessage::decode(&m).unwrap();
        assert_reencodes_exactly(&format!("{group}/{FLOAT_CASE}"), &t, &m);
    }
}
