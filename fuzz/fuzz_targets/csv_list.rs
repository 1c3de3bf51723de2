//! Fuzz target: `tsusage::fuzzing::csv_list`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tsusage::fuzzing::csv_list(data));
