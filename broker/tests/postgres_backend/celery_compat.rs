//! Tables and bytes shared with real Celery 5.7 (SQLAlchemy 2.0, psycopg2; the pinned venv):
//! SQLAlchemy's tables and ours are the same in the catalog, Celery reads what we store and we read
//! what Celery stores, each in the other's tables. `CELERITY_NO_PYTHON=1` skips these.

use super::*;
use celerity_broker::backend::ExceptionInfo;
use celerity_broker::State;
use serde_json::json;
use std::process::Command;

/// Everything the catalog says about a schema's tables, sequences, constraints and indexes, with
/// the schema's name replaced by `S`.
fn catalog(schema: &PgSchema) -> String {
    let s = &schema.name;
    let queries = [
        format!(
            "SELECT c.relname, c.relkind FROM pg_class c WHERE c.relnamespace = '{s}'::regnamespace ORDER BY 1"
        ),
        format!(
            "SELECT c.relname, a.attnum, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, \
             coalesce(pg_get_expr(d.adbin, d.adrelid), '-') FROM pg_attribute a \
             JOIN pg_class c ON c.oid = a.attrelid \
             LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
             WHERE c.relnamespace = '{s}'::regnamespace AND c.relkind = 'r' AND a.attnum > 0 \
             AND NOT a.attisdropped ORDER BY 1, 2"
        ),
        format!(
            "SELECT conrelid::regclass::text, conname, contype, pg_get_constraintdef(oid) \
             FROM pg_constraint WHERE connamespace = '{s}'::regnamespace ORDER BY 2"
        ),
        format!("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = '{s}' ORDER BY 1"),
        format!(
            "SELECT sequencename, data_type, start_value, increment_by, min_value, max_value, \
             cache_size, cycle FROM pg_sequences WHERE schemaname = '{s}' ORDER BY 1"
        ),
    ];
    queries
        .iter()
        .map(|q| schema.psql(q))
        .collect::<Vec<_>>()
        .join("\n--\n")
        .replace(s.as_str(), "S")
}

/// Runs `code` in the pinned venv with `URL` (SQLAlchemy's) and `SCHEMA` in its globals, plus
/// `TABLES` (Celery's `database_table_names`); its stdout.
fn python(python: &std::path::Path, schema: &PgSchema, tables: &str, code: &str) -> String {
    let prelude = format!(
        "from celery import Celery\n\
         URL = {url:?}\nSCHEMA = {s:?}\n\
         app = Celery('compat', broker='memory://', backend=URL)\n\
         app.conf.database_table_schemas = {{'task': SCHEMA, 'group': SCHEMA}}\n\
         app.conf.database_table_names = {tables}\n\
         app.conf.result_extended = True\n",
        url = celerity_testsupport::PY_POSTGRES,
        s = schema.name,
    );
    let out = Command::new(python)
        .arg("-c")
        .arg(format!("{prelude}{code}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test]
async fn our_tables_are_the_ones_sqlalchemy_creates() {
    let Some(py) = celerity_testsupport::celery_python() else {
        return;
    };
    for (tables, options) in [
        ("{}", ""),
        (
            "{'task': 'my_tasks', 'group': 'my_groups'}",
            "&taskmeta_table=my_tasks&groupmeta_table=my_groups",
        ),
    ] {
        let celery_made = PgSchema::new("pg_ddl_celery");
        // Celery creates its tables on first use.
        python(&py, &celery_made, tables, "app.backend.get_task_meta('x')");
        let (ours, b) = fresh("pg_ddl_ours", options).await;
        b.close().await.unwrap();
        assert_eq!(catalog(&ours), catalog(&celery_made), "tables {tables}");
        assert!(catalog(&ours).contains("task_id_sequence"));
    }
}

#[tokio::test]
async fn celery_reads_what_we_store_in_tables_we_made() {
    let Some(py) = celerity_testsupport::celery_python() else {
        return;
    };
    let (schema, b) = fresh("pg_py_reads", "").await;
    let (ok, failed, started) = (id(), id(), id());
    let mut m = TaskMeta::success(&ok, json!({"sum": 3, "items": [1, "två", null, 2.5]}));
    m.extra.insert("name".into(), json!("demo.add"));
    m.extra.insert("args".into(), json!([1, 2]));
    m.extra.insert("kwargs".into(), json!({}));
    m.extra.insert("worker".into(), json!("celerity@host"));
    m.extra.insert("retries".into(), json!(0));
    m.extra.insert("queue".into(), json!("celery"));
    b.store(&m).await.unwrap();
    let exc = ExceptionInfo::new("ValueError", "bad value", "builtins");
    b.store(&TaskMeta::failure(
        &failed,
        &exc,
        Some("Traceback (most recent call last):\n…".into()),
    ))
    .await
    .unwrap();
    b.store(&TaskMeta::with_state(
        &started,
        State::Started,
        json!({"pid": 7}),
    ))
    .await
    .unwrap();
    b.save_group("grp", &[ok.clone(), failed.clone()])
        .await
        .unwrap();
    let out = python(
        &py,
        &schema,
        "{}",
        &format!(
            "from celery.result import AsyncResult, GroupResult\n\
             r = AsyncResult({ok:?}, app=app)\n\
             print(r.get(timeout=10), r.name, r.args, r.kwargs, r.worker, r.retries, r.queue, r.date_done.tzinfo is None)\n\
             f = AsyncResult({failed:?}, app=app)\n\
             try:\n    f.get(timeout=10)\nexcept ValueError as e:\n    print('raised', type(e).__name__, e.args, f.traceback.splitlines()[0])\n\
             print(AsyncResult({started:?}, app=app).state)\n\
             g = GroupResult.restore('grp', app=app)\n\
             print([c.id for c in g.results] == [{ok:?}, {failed:?}])\n"
        ),
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            "{'sum': 3, 'items': [1, 'två', None, 2.5]} demo.add [1, 2] {} celerity@host 0 celery True",  // date_done naive UTC, as Celery reads its own rows
            "raised ValueError ('bad value',) Traceback (most recent call last):",
            "STARTED",
            "True",
        ],
        "{out}"
    );
    b.close().await.unwrap();
}

#[tokio::test]
async fn we_read_what_celery_stores_in_tables_it_made() {
    let Some(py) = celerity_testsupport::celery_python() else {
        return;
    };
    let schema = PgSchema::new("pg_we_read");
    let (ok, failed, grp) = (id(), id(), "g-py");
    python(
        &py,
        &schema,
        "{}",
        &format!(
            "from celery.result import AsyncResult, GroupResult\n\
             app.backend.store_result({ok:?}, {{'sum': 3, 'nested': [1, 'två', None, 2.5]}}, 'SUCCESS')\n\
             try:\n    raise KeyError('missing', 2)\nexcept KeyError as e:\n    app.backend.mark_as_failure({failed:?}, e, traceback='TB')\n\
             GroupResult({grp:?}, [AsyncResult({ok:?}), AsyncResult({failed:?})]).save(backend=app.backend)\n"
        ),
    );
    // Our backend on the tables Celery made (and so Celery's waiting works on its own rows).
    let b = backend(&schema.url("")).await;
    let m = wait_bounded(&b, &ok).await;
    assert_eq!(m.status, State::Success);
    assert_eq!(m.result, json!({"sum": 3, "nested": [1, "två", null, 2.5]}));
    assert!(m.date_done.is_some());
    let f = b.get(&failed).await.unwrap();
    let exc = f.exception().unwrap();
    assert_eq!(
        (exc.exc_type.as_str(), exc.exc_module.as_str()),
        ("KeyError", "builtins")
    );
    assert_eq!(exc.exc_message, vec![json!("missing"), json!(2)]);
    assert_eq!(f.traceback.as_deref(), Some("TB"));
    assert_eq!(
        b.restore_group(grp).await.unwrap(),
        Some(vec![ok.clone(), failed.clone()])
    );
    b.close().await.unwrap();
}
