//! Frontend messages after startup: framing by length, then every view the relay uses.
#![no_main]

use interceptor::net::{frame, message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for f in frame::frames(data) {
        let _ = match f.tag {
            b'Q' => message::decode_query(f.body).map(|_| ()),
            b'P' => message::decode_parse(f.body).map(|_| ()),
            b'B' => message::decode_bind(f.body).map(|_| ()),
            b'E' => message::decode_execute(f.body).map(|_| ()),
            b'F' => message::decode_function_call(f.body).map(|_| ()),
            b'C' => message::decode_target(f.body, "Close").map(|_| ()),
            b'D' => message::decode_target(f.body, "Describe").map(|_| ()),
            b'p' => message::decode_sasl_initial(f.body).map(|_| ()),
            _ => Ok(()),
        };
    }
});
