//! libFuzzer target: see `interceptor::fuzzing::wal_replay` for what it covers.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| interceptor::fuzzing::wal_replay(data));
