//! libFuzzer target: see `interceptor::fuzzing::mask_rows` for what it covers.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| interceptor::fuzzing::mask_rows(data));
