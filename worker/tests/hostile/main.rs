//! Hostile input (issue 16): thousands of generated broken messages published straight to the queue
//! of a real in-process worker, on `memory://`, the local Redis and the local RabbitMQ, with good
//! `demo.add` jobs mixed in between and hostile `celery.pidbox` control messages broadcast at it.
//!
//! Asserted: no panic anywhere (a panic hook counts them), the worker keeps serving (every good job
//! returns its sum), and every hostile message is accounted for: dead-lettered (with a reason) or
//! stored as FAILURE with a readable reason (bodies over the worker's `max_message_size`, 1 MiB:
//! dead-lettered unparsed), `NotRegistered` for a valid call of an unknown task;
//! a few valid-but-odd ones (priority 255, a far `expires`) may also simply run. Each run prints a
//! table kind → count → outcome. `CELERITY_HOSTILE_COUNT` (default 1,000 per broker) and
//! `CELERITY_HOSTILE_SEED` make a larger or a replayed run.

mod amqp;
mod control;
mod gen;
mod redis;
mod regressions;
mod run;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;

/// Panics seen by the hook, on any thread.
static PANICS: AtomicUsize = AtomicUsize::new(0);

/// Counts every panic of this process (and still prints it).
fn count_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            // A test's own failed assertion (its thread is named after it) is not the worker's.
            let name = std::thread::current().name().unwrap_or("").to_owned();
            if !name.contains("hostile_messages") {
                PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
    });
}

fn panics() -> usize {
    PANICS.load(Ordering::SeqCst)
}

fn count() -> usize {
    std::env::var("CELERITY_HOSTILE_COUNT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000)
}

fn seed() -> u64 {
    std::env::var("CELERITY_HOSTILE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_messages_on_memory() {
    count_panics();
    let name = celerity_testsupport::unique("hostile");
    let broker: std::sync::Arc<dyn celerity_broker::Broker> =
        std::sync::Arc::new(celerity_broker::memory::MemoryBroker::named(&name));
    let worker_broker: std::sync::Arc<dyn celerity_broker::Broker> = std::sync::Arc::new(
        celerity_broker::memory::MemoryBroker::named(&name).with_limits(celerity_broker::Limits {
            max_message_size: run::WORKER_MAX_MESSAGE_SIZE,
            ..celerity_broker::Limits::default()
        }),
    );
    let backend: std::sync::Arc<dyn celerity_broker::ResultBackend> = std::sync::Arc::new(
        celerity_broker::backend::memory::MemoryBackend::named(&name),
    );
    let run = run::Run::new("memory", [broker, worker_broker], backend, run::Raw::None);
    run.go(count(), seed(), Vec::new()).await;
}
