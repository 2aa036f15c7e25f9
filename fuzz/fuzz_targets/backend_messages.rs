//! Backend messages interceptor reads: framing, then ErrorResponse/NoticeResponse fields.
#![no_main]

use interceptor::net::{frame, message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for f in frame::frames(data) {
        if matches!(f.tag, b'E' | b'N') {
            let _ = message::decode_error_fields(f.body);
            let _ = message::error_code_and_message(f.body);
        }
    }
});
