//! Fuzz target: `tsusage::fuzzing::callback_body`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tsusage::fuzzing::callback_body(data));
