//! libFuzzer target: see `interceptor::fuzzing::mask_copy` for what it covers.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| interceptor::fuzzing::mask_copy(data));
