//! Fuzz target: a task message (headers as JSON, a NUL, the body) through
//! `TaskMessage::decode` and what the worker does with a decoded one.
//! Input layout: `celerity_broker::fuzzing::task_message`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| celerity_broker::fuzzing::task_message(data));
