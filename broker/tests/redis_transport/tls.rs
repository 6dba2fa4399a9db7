//! `rediss://` against `redis-server`s of the test's own that speak only TLS, with a test CA made by
//! `openssl` ([`TestPki`]): the broker and the result backend work with the CA given as
//! `ssl_ca_certs`; the system's roots, a certificate from another CA, a certificate for another host
//! name and a missing client certificate are each refused with a connect error, within the connect
//! bound; `ssl_cert_reqs=none` connects without verifying; a client certificate is given with
//! `ssl_certfile`/`ssl_keyfile`. Each test is skipped (with a note) where `openssl` or a TLS-capable
//! `redis-server` is missing; servers and files go when the test ends, also when it fails.

use celerity_broker::{connect_backend, TaskMeta};
use celerity_testsupport::{TestPki, TlsRedis};

use super::*;

/// A bound on any one connect attempt (the broker's own is 5 s): a refusal must not hang.
const CONNECT_BOUND: Duration = Duration::from_secs(20);

/// The test CA and a server presenting `cert`; `None` (the test is skipped) if they cannot be made.
async fn setup(cert: &str, require_client_cert: bool) -> Option<(TestPki, TlsRedis)> {
    let Some(pki) = TestPki::new() else {
        eprintln!("skipped: cannot make a test CA (is `openssl` installed?)");
        return None;
    };
    let Some(server) = TlsRedis::start(&pki, cert, require_client_cert).await else {
        eprintln!("skipped: cannot start redis-server with TLS");
        return None;
    };
    Some((pki, server))
}

fn url(server: &TlsRedis, host: &str, query: &str) -> String {
    let prefix = format!("celtest:{}:", uuid::Uuid::new_v4().simple());
    format!(
        "rediss://{host}:{}/0?global_keyprefix={prefix}{query}",
        server.port()
    )
}

async fn connect(raw: &str) -> Result<RedisBroker, BrokerError> {
    let url = BrokerUrl::parse(raw).unwrap();
    tokio::time::timeout(CONNECT_BOUND, RedisBroker::connect(&url))
        .await
        .unwrap_or_else(|_| panic!("connecting to {raw} hung"))
}

/// Publishes one message and consumes it back over `raw`.
async fn round_trip(raw: &str) {
    let b = connect(raw).await.unwrap_or_else(|e| panic!("{raw}: {e}"));
    b.declare_queue("tls-q").await.unwrap();
    b.publish("tls-q", &message(1, 0)).await.unwrap();
    let mut c = b.consume(&queue("tls-q"), 1).await.unwrap();
    let d = next(&mut c).await;
    assert_eq!(task_id(&d), "task-1");
    d.ack().await.unwrap();
    c.close().await.unwrap();
    b.close().await.unwrap();
}

/// The reason of a connect error, which must be one; panics otherwise.
fn refused(raw: &str, r: Result<RedisBroker, BrokerError>) -> String {
    match r {
        Err(BrokerError::Connect { reason, .. }) => {
            eprintln!("refused as expected: {reason}");
            reason
        }
        Err(other) => panic!("{raw}: expected a connect error, got {other}"),
        Ok(_) => panic!("{raw}: connected although the certificate must be refused"),
    }
}

#[tokio::test]
async fn rediss_with_the_test_ca_works_and_without_it_is_refused() {
    let Some((pki, server)) = setup("server", false).await else {
        return;
    };
    let ca = format!("&ssl_ca_certs={}", pki.file("ca.pem"));
    round_trip(&url(&server, "127.0.0.1", &ca)).await;
    round_trip(&url(
        &server,
        "127.0.0.1",
        &format!("{ca}&ssl_cert_reqs=CERT_REQUIRED"),
    ))
    .await;

    // The system's roots do not hold the test CA.
    let raw = url(&server, "127.0.0.1", "");
    let reason = refused(&raw, connect(&raw).await);
    assert!(
        reason.to_lowercase().contains("certificate") || reason.contains("UnknownIssuer"),
        "{reason}"
    );
    // ssl_cert_reqs=none: no verification at all (logged as a warning).
    round_trip(&url(&server, "127.0.0.1", "&ssl_cert_reqs=none")).await;
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    refused_even_with_the_ca("rogue", &["UnknownIssuer", "issuer"]).await;
}

#[tokio::test]
async fn a_certificate_for_another_host_name_is_refused() {
    // Signed by the trusted CA, but for `other.example`, while we dial 127.0.0.1.
    refused_even_with_the_ca("other", &["not valid for name", "NotValidForName"]).await;
}

/// Connects to a server presenting the `cert` certificate, trusting the test CA, and checks the
/// connection is refused for one of the `reasons`.
async fn refused_even_with_the_ca(cert: &str, reasons: &[&str]) {
    let Some((pki, server)) = setup(cert, false).await else {
        return;
    };
    let raw = url(
        &server,
        "127.0.0.1",
        &format!("&ssl_ca_certs={}", pki.file("ca.pem")),
    );
    let reason = refused(&raw, connect(&raw).await);
    assert!(reasons.iter().any(|r| reason.contains(r)), "{reason}");
}

#[tokio::test]
async fn a_client_certificate_is_given_with_ssl_certfile_and_ssl_keyfile() {
    let Some((pki, server)) = setup("server", true).await else {
        return;
    };
    let ca = format!("&ssl_ca_certs={}", pki.file("ca.pem"));
    let client = format!(
        "{ca}&ssl_certfile={}&ssl_keyfile={}",
        pki.file("client.pem"),
        pki.file("client.key")
    );
    round_trip(&url(&server, "127.0.0.1", &client)).await;
    // Without one the server hangs up (a TLS 1.3 client learns it at the first command).
    let raw = url(&server, "127.0.0.1", &ca);
    refused(&raw, connect(&raw).await);
    // A client certificate the server did not sign for (the server's own, from another CA).
    let rogue = format!(
        "{ca}&ssl_certfile={}&ssl_keyfile={}",
        pki.file("rogue.pem"),
        pki.file("rogue.key")
    );
    let raw = url(&server, "127.0.0.1", &rogue);
    refused(&raw, connect(&raw).await);
    // Errors name the option and the path, never a key's bytes.
    let key = std::fs::read_to_string(pki.path("client.key")).unwrap();
    let secret_line = key.lines().nth(1).unwrap().to_owned();
    let raw = url(
        &server,
        "127.0.0.1",
        &format!("&ssl_ca_certs={}", pki.file("client.key")),
    );
    match connect(&raw).await {
        Err(BrokerError::InvalidUrl { reason, .. }) => {
            assert!(reason.contains("ssl_ca_certs"), "{reason}");
            assert!(!reason.contains(&secret_line), "{reason}");
        }
        other => panic!("expected InvalidUrl, got {other:?}"),
    }
}

#[tokio::test]
async fn the_result_backend_over_rediss_with_the_test_ca() {
    let Some((pki, server)) = setup("server", false).await else {
        return;
    };
    let raw = format!(
        "rediss://127.0.0.1:{}/0?ssl_ca_certs={}&ssl_cert_reqs=required",
        server.port(),
        pki.file("ca.pem")
    );
    let backend = tokio::time::timeout(CONNECT_BOUND, connect_backend(&raw))
        .await
        .expect("backend connect hung")
        .unwrap();
    let tid = uuid::Uuid::new_v4().to_string();
    backend
        .store(&TaskMeta::success(tid.clone(), json!(42)))
        .await
        .unwrap();
    let got = backend.wait(&tid, Some(PATIENCE)).await.unwrap();
    assert_eq!(got.result, json!(42));
    // And the backend refuses the server without the CA, within the bound.
    let raw = format!("rediss://127.0.0.1:{}/0", server.port());
    let r = tokio::time::timeout(CONNECT_BOUND, connect_backend(&raw))
        .await
        .expect("backend connect hung");
    assert!(
        matches!(r, Err(BrokerError::Connect { .. })),
        "{:?}",
        r.err()
    );
}
