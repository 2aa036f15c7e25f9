//! libFuzzer target: see `interceptor::fuzzing::startup_auth` for what it covers.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| interceptor::fuzzing::startup_auth(data));
