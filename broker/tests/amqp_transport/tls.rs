//! `amqps://` against a private RabbitMQ node with a TLS listener presenting a certificate of a test
//! CA made by `openssl` ([`TestPki`]; the certificate is valid for `127.0.0.1` only): publishing and
//! consuming work with the CA given as `ssl_ca_certs`; without it (the system's roots) and when
//! dialing another name (`localhost`) the connection is refused with a connect error, within the
//! connect bound; beat's AMQP lease connects with the same options; a node that requires a client certificate takes one given with
//! `ssl_certfile`/`ssl_keyfile` and refuses a client without one. Skipped (with a note) where
//! `openssl` or RabbitMQ is missing; `CELERITY_NO_RABBIT_TLS=1` skips them too (each boots a node,
//! a few seconds). Nodes and files go when the test ends, also when it fails.

use celerity_broker::lease::amqp::AmqpLease;
use celerity_broker::url::BrokerUrl;
use celerity_testsupport::{PrivateRabbit, TestPki};

use super::*;

/// A bound on one connect attempt (the transport's own is 5 s): a refusal must not hang.
const CONNECT_BOUND: Duration = Duration::from_secs(30);

async fn setup(require_client_cert: bool) -> Option<(TestPki, PrivateRabbit, u16)> {
    if std::env::var_os("CELERITY_NO_RABBIT_TLS").is_some() {
        eprintln!("skipped: CELERITY_NO_RABBIT_TLS is set");
        return None;
    }
    let Some(pki) = TestPki::new() else {
        eprintln!("skipped: cannot make a test CA (is `openssl` installed?)");
        return None;
    };
    let Some(node) = PrivateRabbit::start_tls(&pki, require_client_cert).await else {
        eprintln!("skipped: cannot start a private RabbitMQ node with TLS");
        return None;
    };
    let port = node.tls_port()?;
    Some((pki, node, port))
}

async fn connect(raw: &str) -> Result<Arc<dyn Broker>, BrokerError> {
    tokio::time::timeout(CONNECT_BOUND, connect_broker(raw))
        .await
        .unwrap_or_else(|_| panic!("connecting to {raw} hung"))
}

/// Publishes one message over `raw` and consumes it back.
async fn round_trip(raw: &str) {
    let b = connect(raw).await.unwrap_or_else(|e| panic!("{raw}: {e}"));
    let q = format!("celerity-test-tls-{}", uuid::Uuid::new_v4().simple());
    b.declare_queue(&q).await.unwrap();
    b.publish(&q, &msg(7)).await.unwrap();
    let mut c = b.consume(std::slice::from_ref(&q), 1).await.unwrap();
    let d = next_within(&mut c, 10.0)
        .await
        .expect("no delivery over amqps");
    assert_eq!(n_of(&d), 7);
    d.ack().await.unwrap();
    c.close().await.unwrap();
    b.close().await.unwrap();
}

fn refused(raw: &str, r: Result<Arc<dyn Broker>, BrokerError>) -> String {
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
async fn amqps_with_the_test_ca_works_and_an_untrusted_or_misnamed_certificate_is_refused() {
    let Some((pki, _node, port)) = setup(false).await else {
        return;
    };
    let ca = format!("ssl_ca_certs={}", pki.file("ca.pem"));
    let good = format!("amqps://guest:guest@127.0.0.1:{port}/%2f?{ca}");
    round_trip(&good).await;
    // Beat's leader lease opens its own connection: it takes the same options.
    let lease = AmqpLease::new(
        &BrokerUrl::parse(&good).unwrap(),
        "celerity-test-tls-lock",
        "test",
    );
    let mut held = None;
    for _ in 0..100 {
        held = tokio::time::timeout(CONNECT_BOUND, lease.try_acquire())
            .await
            .expect("lease hung")
            .unwrap();
        if held.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(held.is_some(), "a lone candidate leads");
    lease.release().await.unwrap();

    // The system's roots do not hold the test CA.
    let raw = format!("amqps://guest:guest@127.0.0.1:{port}/%2f");
    let reason = refused(&raw, connect(&raw).await);
    assert!(reason.contains("UnknownIssuer"), "{reason}");
    // The certificate is for 127.0.0.1; dialing `localhost` must not accept it.
    let raw = format!("amqps://guest:guest@localhost:{port}/%2f?{ca}");
    refused(&raw, connect(&raw).await);
    // lapin cannot turn verification off: asking for it is a URL error, not a silent no.
    let raw = format!("amqps://guest:guest@127.0.0.1:{port}/%2f?{ca}&ssl_cert_reqs=none");
    assert!(matches!(
        connect(&raw).await,
        Err(BrokerError::InvalidUrl { .. })
    ));
}

#[tokio::test]
async fn amqps_client_certificate_with_ssl_certfile_and_ssl_keyfile() {
    let Some((pki, _node, port)) = setup(true).await else {
        return;
    };
    let ca = format!("ssl_ca_certs={}", pki.file("ca.pem"));
    round_trip(&format!(
        "amqps://guest:guest@127.0.0.1:{port}/%2f?{ca}&ssl_certfile={}&ssl_keyfile={}",
        pki.file("client.pem"),
        pki.file("client.key")
    ))
    .await;
    let raw = format!("amqps://guest:guest@127.0.0.1:{port}/%2f?{ca}");
    refused(&raw, connect(&raw).await);
}
