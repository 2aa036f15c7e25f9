//! The startup phase: StartupMessage parameters, the SASL initial response, and the SCRAM
//! messages (with and without channel binding offered).
#![no_main]

use interceptor::identity::scram::{Mechanism, ServerExchange, Verifier};
use interceptor::net::message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = message::decode_startup_params(data);
    let _ = message::decode_sasl_initial(data);
    let verifier = Verifier::decoy("fuzz", &[0; 32]);
    let end_point = [7u8; 32];
    for (mechanism, offered) in [
        (Mechanism::ScramSha256, None),
        (Mechanism::ScramSha256, Some(&end_point[..])),
        (Mechanism::ScramSha256Plus, Some(&end_point[..])),
    ] {
        if let Ok((exchange, _)) = ServerExchange::start(verifier.clone(), mechanism, offered, data)
        {
            let _ = exchange.finish(data);
        }
    }
});
