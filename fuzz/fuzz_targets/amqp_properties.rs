//! Fuzz target: AMQP content-header properties, parsed by amq-protocol as lapin
//! parses them, then read by our header reading (tables nested at most 64 levels); then a body.
//! Input layout: `celerity_broker::fuzzing::amqp_properties`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| celerity_broker::fuzzing::amqp_properties(data));
