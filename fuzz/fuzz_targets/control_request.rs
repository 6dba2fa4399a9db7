//! Fuzz target: a remote-control request body (`celery.pidbox`), also read as an
//! event message.
//! Input layout: `celerity_broker::fuzzing::control_request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| celerity_broker::fuzzing::control_request(data));
