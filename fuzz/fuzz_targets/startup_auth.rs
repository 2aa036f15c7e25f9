//! The startup phase: StartupMessage parameters and the SASL initial response.
#![no_main]

use interceptor::net::message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = message::decode_startup_params(data);
    let _ = message::decode_sasl_initial(data);
});
