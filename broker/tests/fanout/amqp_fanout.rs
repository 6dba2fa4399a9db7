//! The checks on RabbitMQ.

use super::*;

fn env() -> Env {
    Env::new(Transport::Amqp)
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
