//! Deleting what a test made on the real brokers: Redis keys under its prefix, RabbitMQ queues and
//! exchanges. [`Cleanup`] does it when dropped, so it also happens when the test panics.

use lapin::options::ExchangeDeleteOptions;

use crate::names::AMQP;
use celerity_broker::testkit::{delete_amqp_queue, delete_redis_prefix};

/// What to delete when dropped: Redis key prefixes, RabbitMQ queues (with their same-named
/// exchanges, as Celery declares them) and exchanges.
#[derive(Debug, Default)]
pub struct Cleanup {
    redis_prefixes: Vec<String>,
    amqp_queues: Vec<String>,
    amqp_exchanges: Vec<String>,
}

impl Cleanup {
    pub fn new() -> Cleanup {
        Cleanup::default()
    }

    /// Also deletes every Redis key starting with `prefix`.
    pub fn redis_prefix(mut self, prefix: impl Into<String>) -> Cleanup {
        self.redis_prefixes.push(prefix.into());
        self
    }

    /// Also deletes the RabbitMQ queue `queue` and its same-named exchange.
    pub fn amqp_queue(mut self, queue: impl Into<String>) -> Cleanup {
        self.amqp_queues.push(queue.into());
        self
    }

    /// Also deletes the RabbitMQ exchange `exchange`.
    pub fn amqp_exchange(mut self, exchange: impl Into<String>) -> Cleanup {
        self.amqp_exchanges.push(exchange.into());
        self
    }

    /// Does nothing on drop (a child process working for a test whose parent cleans up).
    pub fn disarm(&mut self) {
        self.redis_prefixes.clear();
        self.amqp_queues.clear();
        self.amqp_exchanges.clear();
    }

    async fn run(prefixes: Vec<String>, queues: Vec<String>, exchanges: Vec<String>) {
        for prefix in &prefixes {
            delete_redis_prefix(prefix).await;
        }
        for queue in &queues {
            delete_amqp_queue(queue).await;
        }
        for exchange in &exchanges {
            delete_amqp_exchange(exchange).await;
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let prefixes = std::mem::take(&mut self.redis_prefixes);
        let queues = std::mem::take(&mut self.amqp_queues);
        let exchanges = std::mem::take(&mut self.amqp_exchanges);
        if prefixes.is_empty() && queues.is_empty() && exchanges.is_empty() {
            return;
        }
        // A runtime of its own: this may run inside a test's runtime, which must not be blocked on.
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(Cleanup::run(prefixes, queues, exchanges));
        });
        let _ = cleanup.join();
    }
}

/// Deletes an exchange on the local RabbitMQ; quietly does nothing if it cannot connect.
pub async fn delete_amqp_exchange(name: &str) {
    let Ok(conn) = lapin::Connection::connect(AMQP, lapin::ConnectionProperties::default()).await
    else {
        return;
    };
    if let Ok(ch) = conn.create_channel().await {
        let _ = ch
            .exchange_delete(name.into(), ExchangeDeleteOptions::default())
            .await;
    }
    let _ = conn.close(200, "test cleanup".into()).await;
}
