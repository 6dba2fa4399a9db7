//! The checks on Redis, and what is particular to Redis: the pub/sub channels and envelopes are
//! kombu's.

use super::*;
use futures_util::StreamExt as _;

fn env() -> Env {
    Env::new(Transport::Redis)
}

#[tokio::test]
async fn two_subscribers_both_receive() {
    super::two_subscribers_both_receive(env()).await
}

#[tokio::test]
async fn binding_keys_select_routing_keys() {
    super::binding_keys_select_routing_keys(env()).await
}

#[tokio::test]
async fn messages_round_trip() {
    super::messages_round_trip(env()).await
}

#[tokio::test]
async fn subscription_survives_a_cut() {
    super::subscription_survives_a_cut(env()).await
}

#[tokio::test]
async fn close_ends_subscriptions() {
    super::close_ends_subscriptions(env()).await
}

#[tokio::test]
async fn celery_revoke_reaches_us() {
    super::celery_revoke_reaches_us(env()).await
}

#[tokio::test]
async fn kombu_node_receives_ours() {
    super::kombu_node_receives_ours(env()).await
}

#[tokio::test]
async fn replies_reach_only_the_asker() {
    super::replies_reach_only_the_asker(env()).await
}

/// The channels and payloads on the wire are kombu's: `<prefix>/<db>.<exchange>[/<key>]`, the
/// kombu envelope; what kombu publishes there reaches our subscribers; junk is skipped.
#[tokio::test]
async fn channels_and_envelopes_are_kombus() {
    let env = env();
    let p = env.prefix();
    let client = redis::Client::open("redis://127.0.0.1:6379/0").unwrap();
    let mut raw = client.get_async_pubsub().await.unwrap();
    raw.subscribe(&[
        format!("{p}/3.celery.pidbox"),
        format!("{p}/3.celeryev/task.succeeded"),
    ])
    .await
    .unwrap();
    // A broker on db 3 names its channels `/3.`.
    let url = format!("redis://127.0.0.1:6379/3?global_keyprefix={p}");
    let db3 = connect_broker(&url).await.unwrap();
    db3.broadcast("celery.pidbox", "", &env.message(1))
        .await
        .unwrap();
    db3.broadcast("celeryev", "task.succeeded", &env.message(2))
        .await
        .unwrap();
    let mut stream = raw.on_message();
    for (n, channel, exchange, key) in [
        (1, "/3.celery.pidbox", "celery.pidbox", ""),
        (
            2,
            "/3.celeryev/task.succeeded",
            "celeryev",
            "task.succeeded",
        ),
    ] {
        let msg = tokio::time::timeout(PATIENCE, stream.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(msg.get_channel_name(), format!("{p}{channel}"));
        let v: Value = serde_json::from_slice(msg.get_payload_bytes()).unwrap();
        let props = &v["properties"];
        assert_eq!(
            props["delivery_info"],
            json!({"exchange": exchange, "routing_key": key})
        );
        assert_eq!(props["body_encoding"], "base64");
        assert_eq!(props["delivery_mode"], 1);
        assert!(uuid::Uuid::parse_str(props["delivery_tag"].as_str().unwrap()).is_ok());
        assert_eq!(v["headers"]["clock"], json!(n));
        assert_eq!(v["content-type"], "application/json");
    }
    drop(stream);
    db3.close().await.unwrap();

    // What kombu publishes (its envelope, its channels) reaches subscribers bound as Celery's are:
    // "" for the pidbox, "#" for events. A payload that is no envelope is skipped.
    let b = env.broker().await;
    let mut pidbox = b
        .subscribe("celery.pidbox", "", "node@x.celery.pidbox")
        .await
        .unwrap();
    let mut events = b.subscribe("celeryev", "#", "celeryev.x").await.unwrap();
    let kombu_envelope = |body: &str, exchange: &str, key: &str| {
        pyjson::to_vec(&json!({
            "body": body, "content-encoding": "utf-8", "content-type": "application/json",
            "headers": {"clock": 3, "expires": 0, "test": env.uid},
            "properties": {"delivery_mode": 1,
                "delivery_info": {"exchange": exchange, "routing_key": key},
                "priority": 0, "body_encoding": "base64",
                "delivery_tag": "0b4b4f0e-8d5b-4a53-9c39-7e4c7e2b1f00"}
        }))
    };
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let publish = |channel: String, payload: Vec<u8>| {
        let mut conn = conn.clone();
        async move {
            let _: i64 = redis::cmd("PUBLISH")
                .arg(channel)
                .arg(payload)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    };
    publish(format!("{p}/0.celery.pidbox"), b"not an envelope".to_vec()).await;
    // {"method": "ping", "arguments": {"n": 3}}
    let ping = "eyJtZXRob2QiOiAicGluZyIsICJhcmd1bWVudHMiOiB7Im4iOiAzfX0=";
    publish(
        format!("{p}/0.celery.pidbox"),
        kombu_envelope(ping, "celery.pidbox", ""),
    )
    .await;
    publish(
        format!("{p}/0.celeryev/task.succeeded"),
        kombu_envelope(ping, "celeryev", "task.succeeded"),
    )
    .await;
    for sub in [&mut pidbox, &mut events] {
        let m = env.recv(sub).await;
        assert_eq!(n_of(&m), 3);
        assert_eq!(m.properties.delivery_mode, TRANSIENT);
    }
    let _: () = redis::cmd("PING").query_async(&mut conn).await.unwrap();
    b.close().await.unwrap();
}
