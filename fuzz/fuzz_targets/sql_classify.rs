//! libFuzzer target: see `interceptor::fuzzing::sql_classify` for what it covers.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| interceptor::fuzzing::sql_classify(data));
