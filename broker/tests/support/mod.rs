//! Helpers shared by the integration tests (see `celerity_broker::testkit`).

#[allow(unused_imports)]
pub use celerity_broker::testkit::celery_python;
