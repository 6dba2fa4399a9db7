//! Fuzz target: an element of a Redis queue list (kombu's JSON envelope), and the same
//! bytes as an `unacked` record.
//! Input layout: `celerity_broker::fuzzing::redis_envelope`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| celerity_broker::fuzzing::redis_envelope(data));
