//! What goes wrong gets a clear error and nothing panics: an unreachable server, a role without
//! privileges on the tables, a row whose `result` cannot be read, a PostgreSQL URL as a broker.

use super::*;
use celerity_broker::{connect_backend, connect_broker, BrokerError, State};
use serde_json::json;

#[tokio::test]
async fn an_unreachable_server_fails_fast_without_the_password() {
    // Port 1 on loopback: nothing listens there.
    let url = "db+postgresql://postgres:Zq9xsecret@127.0.0.1:1/postgres?connect_timeout=3";
    let started = std::time::Instant::now();
    let e = connect_backend(url)
        .await
        .err()
        .expect("connected to nothing");
    let text = e.to_string();
    assert!(matches!(e, BrokerError::Connect { .. }), "{text}");
    assert!(!text.contains("Zq9x"), "{text}");
    assert!(started.elapsed() < LONG, "took {:?}", started.elapsed());
}

#[tokio::test]
async fn a_postgres_url_is_not_a_broker() {
    let e = connect_broker("postgresql://postgres@127.0.0.1/postgres")
        .await
        .err()
        .expect("accepted as a broker")
        .to_string();
    assert!(
        e.contains("result backend") && e.contains("not a broker"),
        "{e}"
    );
}

#[tokio::test]
async fn a_role_without_privileges_gets_a_clear_error() {
    let (mut schema, b) = fresh("pg_perm", "").await;
    b.close().await.unwrap();
    let role = schema.role("noperm");
    schema.psql(&format!(
        "GRANT USAGE ON SCHEMA \"{}\" TO \"{role}\"",
        schema.name
    ));
    let url = format!(
        "db+postgresql://{role}@127.0.0.1:5432/postgres?schema={}",
        schema.name
    );
    // The tables exist, so connecting needs no privilege on them; the first write is refused.
    let weak = backend(&url).await;
    let e = weak
        .store(&TaskMeta::success(id(), json!(1)))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("permission denied") && e.contains("42501") && e.contains("SELECT, INSERT"),
        "{e}"
    );
    let e = weak.get(&id()).await.unwrap_err().to_string();
    assert!(e.contains("permission denied"), "{e}");
    weak.close().await.unwrap();

    // Without the tables and without CREATE on the schema: refused when connecting.
    let bare = PgSchema::new("pg_perm_bare");
    schema.psql(&format!(
        "GRANT USAGE ON SCHEMA \"{}\" TO \"{role}\"",
        bare.name
    ));
    let url = format!(
        "db+postgresql://{role}@127.0.0.1:5432/postgres?schema={}",
        bare.name
    );
    let e = connect_backend(&url)
        .await
        .err()
        .expect("connected")
        .to_string();
    assert!(e.contains("permission denied for schema"), "{e}");
}

#[tokio::test]
async fn an_unreadable_result_column_is_an_error_not_a_panic() {
    let (schema, b) = fresh("pg_unreadable", "&poll_interval=0.2").await;
    let (garbage, pickled) = (id(), id());
    // Bytes that are neither JSON nor pickle, and a pickled exception instance (a class reference).
    schema.psql(&format!(
        "INSERT INTO \"{s}\".celery_taskmeta (id, task_id, status, result) VALUES \
         (nextval('\"{s}\".task_id_sequence'), '{garbage}', 'SUCCESS', '\\x00ff10'::bytea), \
         (nextval('\"{s}\".task_id_sequence'), '{pickled}', 'FAILURE', \
          '\\x8002636275696c74696e730a56616c75654572726f720a71005804000000626f6f6d71018571025271032e'::bytea)",
        s = schema.name
    ));
    let e = b.get(&garbage).await.unwrap_err().to_string();
    assert!(
        e.contains("result") && e.contains(&garbage) && e.contains("not JSON"),
        "{e}"
    );
    let e = tokio::time::timeout(LONG, b.wait(&pickled, None))
        .await
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(e.contains("never loaded"), "{e}");
    // The rows are still there, and other rows still work.
    let ok = id();
    b.store(&TaskMeta::success(&ok, json!(1))).await.unwrap();
    assert_eq!(b.get(&ok).await.unwrap().status, State::Success);
    assert_eq!(
        schema.psql(&format!(
            "SELECT count(*) FROM \"{}\".celery_taskmeta",
            schema.name
        )),
        "3"
    );
    b.close().await.unwrap();
}
