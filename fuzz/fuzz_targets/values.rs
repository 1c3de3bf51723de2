//! Fuzz target: `tsusage::fuzzing::values`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tsusage::fuzzing::values(data));
