//! libFuzzer target: see `interceptor::fuzzing::frontend_messages` for what it covers.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| interceptor::fuzzing::frontend_messages(data));
